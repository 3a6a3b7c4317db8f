"""The one place the plugin replaces vLLM attributes at run time.

Every replacement is recorded with the reason and the upstream-ready diff in
``patches/`` that would make it unnecessary, so the set of monkeypatches can be
listed and checked (see ``installed_patches``). Each replacement keeps vLLM's
behaviour unchanged unless the vLLM config in play enables sink mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Patch:
    """One replaced attribute: ``owner.name`` now points at our wrapper."""

    owner: Any  # a class, or a module for kind="function"
    name: str
    reason: str
    diff: str  # file name under patches/
    added: bool = False  # a new attribute (nothing replaced)

    @property
    def target(self) -> str:
        if isinstance(self.owner, type):
            return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"
        return f"{self.owner.__name__}.{self.name}"


_PATCHES: dict[tuple[Any, str], Patch] = {}


def installed_patches() -> list[Patch]:
    """The monkeypatches installed in this process, in installation order."""
    return list(_PATCHES.values())


def wrap_method(
    owner: Any,
    name: str,
    *,
    reason: str,
    diff: str,
    kind: str = "method",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace ``owner.name`` by the decorated function, once per process.

    The decorated function receives the original (unbound) callable as its
    first argument. ``kind`` is "method", "classmethod", "staticmethod",
    "property" (the getter is wrapped) or "function" (``owner`` is a module).
    """

    def decorate(wrapper: Callable[..., Any]) -> Callable[..., Any]:
        if (owner, name) in _PATCHES:
            return wrapper
        raw = owner.__dict__.get(name)
        original = getattr(owner, name) if raw is None else raw
        if kind == "method":
            func = original

            @functools.wraps(func)
            def method(*args: Any, **kwargs: Any) -> Any:
                return wrapper(func, *args, **kwargs)

            new: Any = method
        elif kind == "classmethod":
            func = original.__func__ if isinstance(original, classmethod) else original

            @functools.wraps(func)
            def cmethod(cls: type, *args: Any, **kwargs: Any) -> Any:
                return wrapper(func.__get__(cls), *args, **kwargs)

            new = classmethod(cmethod)
        elif kind == "property":
            func = original.fget

            @functools.wraps(func)
            def getter(self: Any) -> Any:
                return wrapper(func, self)

            new = property(getter)
        elif kind == "function":  # a module-level function: owner is the module
            func = original

            @functools.wraps(func)
            def function(*args: Any, **kwargs: Any) -> Any:
                return wrapper(func, *args, **kwargs)

            new = function
        elif kind == "staticmethod":
            func = original.__func__ if isinstance(original, staticmethod) else original

            @functools.wraps(func)
            def smethod(*args: Any, **kwargs: Any) -> Any:
                return wrapper(func, *args, **kwargs)

            new = staticmethod(smethod)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        setattr(owner, name, new)
        _PATCHES[(owner, name)] = Patch(owner, name, reason, diff)
        return wrapper

    return decorate


def add_method(
    owner: type, name: str, func: Callable[..., Any], *, reason: str, diff: str
) -> None:
    """Give ``owner`` a method it does not have (an engine-core utility, say)."""
    if (owner, name) in _PATCHES:
        return
    if name in owner.__dict__:
        raise RuntimeError(
            f"vllm-sink: {owner.__qualname__}.{name} exists in this vLLM; the "
            f"plugin would replace it ({diff}). Check the vLLM version."
        )
    setattr(owner, name, func)
    _PATCHES[(owner, name)] = Patch(owner, name, reason, diff, added=True)
