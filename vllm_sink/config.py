"""Sink-mode configuration: what the user asked for, validated at start-up.

The configuration travels to every vLLM process inside
``VllmConfig.additional_config["attention_sink"] = {"sink": S, "window": W}``
(pickled with the config), so every process reads it from there and nowhere else.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm_sink")

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


def check_model(cfg: SinkConfig, vllm_config: VllmConfig) -> None:
    """Refuse models and settings sink mode cannot serve (DESIGN.md §3)."""
    model_config = vllm_config.model_config
    name = model_config.model
    hf = model_config.hf_text_config
    max_pos = getattr(hf, "max_position_embeddings", None)
    if max_pos is not None and cfg.span > max_pos:
        raise SinkConfigError(
            f"--attention-sink {cfg.sink} + --window {cfg.window} = {cfg.span} "
            f"exceeds {name}'s max_position_embeddings ({max_pos}): rotary "
            "positions in sink mode go up to sink+window-1. Fix: choose "
            f"--window {max(1, max_pos - cfg.sink)} or smaller."
        )
    layer_types = sorted(set(getattr(hf, "layer_types", None) or ()))
    refusals = [
        (model_config.uses_mrope, "multimodal rotary embeddings (mrope)"),
        (model_config.use_mla, "multi-head latent attention (MLA)"),
        (model_config.is_hybrid, "hybrid attention/mamba layers"),
        (model_config.is_attention_free, "no attention layers"),
        (
            len(layer_types) > 1,
            f"hybrid local/global attention layers (Gemma 3 style: {layer_types}), "
            "not supported yet",
        ),
        (vllm_config.speculative_config is not None, "speculative decoding"),
    ]
    for refused, what in refusals:
        if refused:
            raise SinkConfigError(
                f"Sink mode (--attention-sink/--window) does not support {what} "
                f"({name}). Fix: drop --attention-sink/--window, or use a decoder "
                "model with standard rotary embeddings (Llama, Mistral, Qwen2, "
                "GPT-NeoX, ...) without speculative decoding."
            )
    vocab = model_config.get_vocab_size()
    if cfg.sink_token_id is not None and cfg.sink_token_id >= vocab:
        raise SinkConfigError(
            f"--sink-token-id {cfg.sink_token_id} is outside {name}'s vocabulary "
            f"(size {vocab}). Fix: pass the id of the model's sink/placeholder token."
        )
    _check_room_for_seeds(cfg, vllm_config)
    sliding = model_config.get_sliding_window()
    if sliding is not None and sliding < cfg.span:
        raise SinkConfigError(
            f"{name} has built-in sliding-window layers of {sliding} tokens, "
            f"narrower than --attention-sink + --window = {cfg.span}. Fix: choose "
            f"--window {max(1, sliding - cfg.sink)} or smaller."
        )


def _check_room_for_seeds(cfg: SinkConfig, vllm_config: VllmConfig) -> None:
    """Warn when requests past max_model_len will be refused (see streams)."""
    from vllm_sink.seams import largest_seed

    block_size = vllm_config.cache_config.block_size or 16
    seed = largest_seed(cfg.sink, cfg.window, block_size)
    max_len = vllm_config.model_config.max_model_len
    if max_len < seed + 2:
        logger.warning(
            "vllm-sink: --max-model-len %d is too short to continue a stream past "
            "it (a continuation starts with up to %d cached tokens); such requests "
            "will be refused. Fix: --max-model-len %d or more, or a smaller "
            "--window.",
            max_len,
            seed,
            2 * (seed + 2),
        )


def apply_to_vllm_config(cfg: SinkConfig, vllm_config: VllmConfig) -> None:
    """Switch off what would bypass or contradict sink attention."""
    passes = vllm_config.compilation_config.pass_config
    # These passes fuse rotary into the KV-cache write or q/k-norm; sink mode
    # rotates at read, so a fused rotary would silently rotate keys twice.
    for name in (
        "fuse_rope_kvcache",
        "fuse_qk_norm_rope_kvcache",
        "enable_qk_norm_rope_fusion",
    ):
        if getattr(passes, name, None):
            setattr(passes, name, False)
    model_config = vllm_config.model_config
    # Not through pydantic's assignment validation, which would coerce to int.
    object.__setattr__(
        model_config, "max_model_len", SinkModelLen(model_config.max_model_len)
    )
    logger.info(
        "vllm-sink: sink mode on: %d sink tokens + %d-token window "
        "(rotary positions stay below %d).",
        cfg.sink,
        cfg.window,
        cfg.span,
    )


def _max_model_len_beyond_model(engine_args: Any) -> bool:
    return bool(engine_args.max_model_len) and engine_args.max_model_len > 0


def _clear_vllm_env_cache() -> None:
    """vLLM caches env reads once an engine runs; drop them so ours are seen."""
    import vllm.envs as envs

    if envs._is_envs_cache_enabled():
        envs.__getattr__.cache_clear()


def install() -> None:
    """Validate and apply sink mode wherever vLLM builds its config."""
    import os

    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink.patching import wrap_method

    @wrap_method(
        EngineArgs,
        "create_engine_config",
        reason="validate sink mode and switch off what contradicts it",
        diff="0002-engine-config-sink-mode.diff",
    )
    def create_engine_config(original, self, *args, **kwargs):
        extra = (
            self.additional_config if isinstance(self.additional_config, dict) else {}
        )
        if extra.get(CONFIG_KEY) is None:
            return original(self, *args, **kwargs)
        cfg = SinkConfig.from_value(extra[CONFIG_KEY])
        self.additional_config = {**extra, CONFIG_KEY: cfg.to_dict()}
        if self.attention_backend is None:
            # CUSTOM is this plugin's backend (registered by register()).
            self.attention_backend = "CUSTOM"
        # Positions stay below S+W in sink mode, so a max_model_len beyond the
        # model's context is sound here (vLLM refuses it by default).
        key = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"
        saved = os.environ.get(key)
        if _max_model_len_beyond_model(self):
            os.environ[key] = "1"
        try:
            _clear_vllm_env_cache()
            vllm_config = original(self, *args, **kwargs)
        finally:
            if saved is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved
            _clear_vllm_env_cache()
        check_model(cfg, vllm_config)
        apply_to_vllm_config(cfg, vllm_config)
        from vllm_sink import metrics

        metrics.start_front_end(cfg)
        return vllm_config
