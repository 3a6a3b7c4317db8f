"""The one place the plugin replaces vLLM attributes at run time.

Every replacement is recorded with the reason and the upstream-ready diff in
``patches/`` that would make it unnecessary, so the set of monkeypatches can be
listed and checked (see ``installed_patches``). Each replacement keeps vLLM's
behaviour unchanged unless the vLLM config in play enables sink mode.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The signature of every wrapped vLLM callable in the vLLM releases the plugin is
# tested with (``python -m vllm_sink.patching --record`` adds the installed one's).
SIGNATURES = Path(__file__).with_name("signatures.json")


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


class ReachError(RuntimeError):
    """A hook target is missing or changed in the installed vLLM."""


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # pragma: no cover - vLLM is a dependency
        return "?"


def _reach_error(target: str, problem: str, reason: str) -> ReachError:
    return ReachError(
        f"vllm-sink: {target} {problem} in vLLM {_vllm_version()}; the plugin "
        f"needs it for: {reason}. This vLLM is not one the plugin supports "
        f"(see vllm_sink.SUPPORTED_VLLM and the README)."
    )


def find_attr(
    module: str, name: str, *, reason: str, required: bool = True
) -> Any | None:
    """``module.name`` (a dotted name inside the module), found by feature.

    Hook targets are looked up by what exists, not by the version string. A
    missing target fails start-up naming it and why the plugin reaches for it,
    or gives None with ``required=False`` (a target only some supported
    versions have).
    """
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        if not required:
            return None
        raise _reach_error(module, f"cannot be imported ({e})", reason) from e
    for part in name.split("."):
        if not hasattr(obj, part):
            if not required:
                return None
            raise _reach_error(f"{module}.{name}", "does not exist", reason)
        obj = getattr(obj, part)
    return obj


def _check_params(func: Any, params: tuple[str, ...], target: str, reason: str) -> None:
    """The wrapped callable must still take the parameters the wrapper uses."""
    if not params:
        return
    try:
        have = inspect.signature(func).parameters
    except (TypeError, ValueError) as e:
        raise _reach_error(target, f"has no readable signature ({e})", reason) from e
    missing = [p for p in params if p not in have]
    if missing:
        raise _reach_error(
            target,
            f"has no parameter {', '.join(missing)} (signature {func.__name__}"
            f"{inspect.signature(func)})",
            reason,
        )


def signature_of(func: Any) -> str:
    """A callable's parameters by name and kind (annotations and default
    values left out: they change without changing how the plugin calls it)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return "(?)"
    prefix = {
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    out, star = [], False
    for p in params:
        if p.kind == inspect.Parameter.KEYWORD_ONLY and not star:
            out.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        default = "=" if p.default is not inspect.Parameter.empty else ""
        out.append(prefix.get(p.kind, "") + p.name + default)
    return "(" + ", ".join(out) + ")"


_recorded: dict[str, list[str]] | None = None  # set while recording (--record)


@functools.cache
def _tested_signatures() -> dict[str, list[str]]:
    return json.loads(SIGNATURES.read_text())


def _check_signature(func: Any, target: str, reason: str, diff: str) -> None:
    """Start-up fails when a wrapped callable is not as tested: a vLLM let in by
    VLLM_SINK_ALLOW_ANY_VLLM=1 fails here, naming the patch, not later with
    wrong arguments."""
    have = signature_of(func)
    if _recorded is not None:
        _recorded.setdefault(target, [])
        if have not in _recorded[target]:
            _recorded[target].append(have)
        return
    tested = _tested_signatures().get(target, [])
    if have not in tested:
        raise _reach_error(
            target,
            f"has the signature {have}, not one the plugin is tested with "
            f"({' or '.join(tested) or 'none recorded'}); patches/{diff} needs "
            "porting (then record it: python -m vllm_sink.patching --record)",
            reason,
        )


def wrap_method(
    owner: Any,
    name: str,
    *,
    reason: str,
    diff: str,
    kind: str = "method",
    params: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace ``owner.name`` by the decorated function, once per process.

    The decorated function receives the original (unbound) callable as its
    first argument. ``kind`` is "method", "classmethod", "staticmethod",
    "property" (the getter is wrapped) or "function" (``owner`` is a module).
    ``params``: parameters the original must take (the wrapper reads or passes
    them by name); a missing target or parameter fails start-up naming it.
    """

    def decorate(wrapper: Callable[..., Any]) -> Callable[..., Any]:
        if (owner, name) in _PATCHES:
            return wrapper
        target = Patch(owner, name, reason, diff).target
        raw = owner.__dict__.get(name)
        if raw is None and not hasattr(owner, name):
            raise _reach_error(target, "does not exist", reason)
        original = getattr(owner, name) if raw is None else raw
        unwrapped = original
        if isinstance(original, (classmethod, staticmethod)):
            unwrapped = original.__func__
        elif isinstance(original, property):
            unwrapped = original.fget
        _check_params(unwrapped, params, target, reason)
        _check_signature(unwrapped, target, reason, diff)
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


def record_signatures() -> int:
    """Install every hook into this vLLM and add the signatures of what they wrap
    to SIGNATURES (after porting the patches to a new vLLM)."""
    global _recorded
    import vllm

    import vllm_sink

    _recorded = json.loads(SIGNATURES.read_text()) if SIGNATURES.exists() else {}
    vllm_sink.check_vllm_version = lambda version: None  # recording ports it
    vllm_sink.register()
    SIGNATURES.write_text(json.dumps(_recorded, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(_recorded)} signatures of vLLM {vllm.__version__}")
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m vllm_sink.patching --record")
    from vllm_sink import patching  # this module as the hooks import it

    sys.exit(patching.record_signatures())
