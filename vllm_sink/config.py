"""Sink-mode configuration: the value type and its validation.

The configuration travels to every vLLM process inside
``VllmConfig.additional_config["attention_sink"] = {"sink": S, "window": W}``
(pickled with the config), so every process reads it from there and nowhere else.
Where vLLM builds its config (checks against the model, what sink mode switches
off) is ``engine_config``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig


CONFIG_KEY = "attention_sink"

DEFAULT_SINK = 4


class SinkConfigError(ValueError):
    """A sink-mode setting is invalid; the message names the flag and the fix."""


class SinkModelLen(int):
    """``max_model_len`` of a sink-mode engine: a cap per engine request, not on
    the stream.

    vLLM's front-end length checks (``TokenizeParams``, ``get_max_tokens``) see
    only this number, copied from the engine's ``ModelConfig``. Its type tells
    them the engine streams past it, so each engine in a process keeps its own
    rules (a plain engine next to a sink engine keeps vLLM's checks).
    """

    def __repr__(self) -> str:
        return int.__repr__(self)

    def __reduce__(self):
        # Other processes (engine cores) get a plain int: only the front-end
        # checks need the type, and vLLM's msgpack encoding refuses int subclasses.
        return (int, (int(self),))


def streams_past(max_model_len: object) -> bool:
    """Whether a length limit is a sink-mode engine's (see SinkModelLen)."""
    return isinstance(max_model_len, SinkModelLen)


def _as_count(name: str, value: Any, minimum: int) -> int:
    flag = {"sink": "--attention-sink", "window": "--window"}.get(
        name, "--" + name.replace("_", "-")
    )
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise SinkConfigError(
                f"{flag} ({CONFIG_KEY}.{name}) must be an integer, got {value!r}. "
                f"Fix: pass a whole number, e.g. {flag} "
                f"{DEFAULT_SINK if name == 'sink' else 2048}."
            )
    if value < minimum:
        raise SinkConfigError(
            f"{flag} ({CONFIG_KEY}.{name}) must be >= {minimum}, got {value}. "
            f"Fix: pass {flag} {max(minimum, DEFAULT_SINK if name == 'sink' else 1)} "
            "or larger."
        )
    return value


@dataclass(frozen=True)
class SinkConfig:
    """StreamingLLM attention: ``sink`` first tokens plus the last ``window``.

    Invariants: ``sink >= 0`` (0 is plain window attention, the paper's failing
    baseline) and ``window >= 1`` (the current token is always in the window).
    """

    sink: int = DEFAULT_SINK
    window: int = 2048
    zero_sink: bool = False  # softmax off-by-one: exp(0) added to every denominator
    sink_token_id: int | None = None  # put at position 0 of every stream

    def __post_init__(self) -> None:
        object.__setattr__(self, "sink", _as_count("sink", self.sink, 0))
        object.__setattr__(self, "window", _as_count("window", self.window, 1))
        if not isinstance(self.zero_sink, bool):
            raise SinkConfigError(
                f"--zero-sink ({CONFIG_KEY}.zero_sink) must be true or false, got "
                f"{self.zero_sink!r}."
            )
        if self.sink_token_id is not None:
            token = _as_count("sink_token_id", self.sink_token_id, 0)
            object.__setattr__(self, "sink_token_id", token)
            if self.sink < 1:
                raise SinkConfigError(
                    "--sink-token-id needs a sink slot: it counts among the "
                    "--attention-sink tokens. Fix: --attention-sink 1 or more."
                )

    @property
    def span(self) -> int:
        """Largest number of keys any query sees; positions stay below it."""
        return self.sink + self.window

    def to_dict(self) -> dict[str, Any]:
        """The additional_config entry; variant keys only when they are set."""
        data = asdict(self)
        if not self.zero_sink:
            del data["zero_sink"]
        if self.sink_token_id is None:
            del data["sink_token_id"]
        return data

    def additional_config(self) -> dict[str, dict[str, int]]:
        """The value to pass as ``LLM(..., additional_config=...)``."""
        return {CONFIG_KEY: self.to_dict()}

    @classmethod
    def from_value(cls, value: Any) -> SinkConfig:
        """Parse ``additional_config["attention_sink"]`` (a dict or a SinkConfig)."""
        if isinstance(value, SinkConfig):
            return value
        if not isinstance(value, dict):
            raise SinkConfigError(
                f'additional_config["{CONFIG_KEY}"] must be a dict like '
                f'{{"sink": 4, "window": 2048}}, got {value!r}.'
            )
        keys = {"sink", "window", "zero_sink", "sink_token_id"}
        unknown = set(value) - keys
        if unknown:
            raise SinkConfigError(
                f'additional_config["{CONFIG_KEY}"] has unknown keys '
                f"{sorted(unknown)}; the keys are {sorted(keys)}."
            )
        if "window" not in value:
            raise SinkConfigError(
                "--window is required in sink mode (the number of recent tokens "
                "kept). Fix: add --window 2048 (or "
                f'additional_config["{CONFIG_KEY}"]["window"]).'
            )
        return cls(
            sink=value.get("sink", DEFAULT_SINK),
            window=value["window"],
            zero_sink=value.get("zero_sink", False),
            sink_token_id=value.get("sink_token_id"),
        )


def from_flags(
    sink: int | None,
    window: int | None,
    zero_sink: bool = False,
    sink_token_id: int | None = None,
) -> SinkConfig | None:
    """Resolve the CLI flags; ``--window`` alone means ``--attention-sink 4``."""
    if sink is None and window is None and not zero_sink and sink_token_id is None:
        return None
    if window is None:
        given = (
            "--attention-sink"
            if sink is not None
            else ("--zero-sink" if zero_sink else "--sink-token-id")
        )
        raise SinkConfigError(
            f"{given} needs --window (how many recent tokens to keep). "
            "Fix: add --window 2048, e.g. --attention-sink 4 --window 2048."
        )
    return SinkConfig(
        sink=DEFAULT_SINK if sink is None else sink,
        window=window,
        zero_sink=bool(zero_sink),
        sink_token_id=sink_token_id,
    )


LOCAL_LAYER, GLOBAL_LAYER = "sliding_attention", "full_attention"


def local_window(hf_config: Any) -> int | None:
    """The native window of a hybrid local/global model's local layers, or None.

    Hybrid: ``layer_types`` mixes ``sliding_attention`` and ``full_attention``
    (Gemma 3). Sink mode keeps the local layers' own window (no sinks) and gives
    the global ones the flags' sinks and window; a model whose every layer has
    one sliding window (Mistral v0.1 style) is not hybrid: the flags replace it.
    """
    types = set(getattr(hf_config, "layer_types", None) or ())
    if types == {LOCAL_LAYER, GLOBAL_LAYER}:
        return getattr(hf_config, "sliding_window", None)
    return None


def layer_config(
    cfg: SinkConfig, vllm_config: VllmConfig | None, sliding_window: int | None
) -> SinkConfig:
    """The rule of one attention layer whose native window is ``sliding_window``:
    the flags' sinks and window, or, on a hybrid model's local layer, its own
    window and no sinks (``local_window``)."""
    model_config = getattr(vllm_config, "model_config", None)
    if sliding_window is None or model_config is None:
        return cfg
    if local_window(model_config.hf_text_config) is None:
        return cfg
    return SinkConfig(sink=0, window=sliding_window)


def get_sink_config(vllm_config: VllmConfig | None) -> SinkConfig | None:
    """The sink configuration of a vLLM config, or None outside sink mode."""
    if vllm_config is None:
        return None
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict) or extra.get(CONFIG_KEY) is None:
        return None
    return SinkConfig.from_value(extra[CONFIG_KEY])


def current_sink_config() -> SinkConfig | None:
    """The sink configuration of the vLLM config being built or run, if any."""
    from vllm.config import get_current_vllm_config_or_none

    return get_sink_config(get_current_vllm_config_or_none())
