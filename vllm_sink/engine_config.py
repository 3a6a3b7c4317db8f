"""Sink mode where vLLM builds its config: checks against the model and the
engine, what sink mode switches off, and the KV-memory error it explains.

Hooks (front-end and every engine process, through ``patching``):
``EngineArgs.create_engine_config`` (validate, then ``apply_to_vllm_config``;
``patches/0002-engine-config-sink-mode.diff``) and
``get_kv_cache_configs`` as the engine core calls it (a pool too small for one
sink-mode request names the sink-mode fix; ``patches/0010-kv-memory-advice.diff``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm_sink.config import (
    CONFIG_KEY,
    SinkConfig,
    SinkConfigError,
    SinkModelLen,
    local_window,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm_sink")


def check_model(cfg: SinkConfig, vllm_config: VllmConfig) -> None:
    """Refuse models and settings sink mode cannot serve (README, Supported models)."""
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
    local = local_window(hf)
    refusals = [
        (model_config.uses_mrope, "multimodal rotary embeddings (mrope)"),
        (model_config.use_mla, "multi-head latent attention (MLA)"),
        (model_config.is_hybrid, "hybrid attention/mamba layers"),
        (model_config.is_attention_free, "no attention layers"),
        (
            len(layer_types) > 1 and local is None,
            f"these mixed attention layer types ({layer_types}; served: "
            "sliding_attention + full_attention, Gemma 3 style)",
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
    if local is not None and local > cfg.window:
        raise SinkConfigError(
            f"{name}'s local layers attend their own {local}-token window, wider "
            f"than --window {cfg.window} of its global layers: a stream continued "
            "past --max-model-len keeps only the global window's keys. Fix: "
            f"--window {local} or larger."
        )
    sliding = model_config.get_sliding_window()
    if local is None and sliding is not None and sliding < cfg.span:
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


def rope_fusion_passes(pass_config: Any) -> list[str]:
    """The compilation passes that may fuse rotary into another op: every switch
    of vLLM's ``PassConfig`` naming rope (``fuse_rope_kvcache``,
    ``fuse_qk_norm_rope_kvcache``, ``enable_qk_norm_rope_fusion``, ... in 0.32),
    found by name pattern so that a renamed or new one is caught too."""
    return [
        name
        for name, value in vars(pass_config).items()
        if "rope" in name.lower() and (value is None or isinstance(value, bool))
    ]


def switch_off_rope_fusion(pass_config: Any) -> list[str]:
    """Sink mode rotates keys at read, so a rotary fused into the KV-cache write
    or q/k-norm would rotate them twice. Returns the passes switched off."""
    names = rope_fusion_passes(pass_config)
    if not names:
        raise SinkConfigError(
            "vllm-sink: this vLLM's compilation PassConfig has no rotary-fusion "
            "switch the plugin knows (fuse_rope_kvcache, ...): it cannot make sure "
            "that keys are not rotated twice. Fix: run with --enforce-eager, or "
            "use a vLLM the plugin supports (vllm_sink.SUPPORTED_VLLM)."
        )
    switched = [name for name in names if getattr(pass_config, name) is not False]
    for name in switched:  # None: vLLM would pick by optimization level
        setattr(pass_config, name, False)
    return switched


def apply_to_vllm_config(cfg: SinkConfig, vllm_config: VllmConfig) -> None:
    """Switch off what would bypass or contradict sink attention."""
    switched = switch_off_rope_fusion(vllm_config.compilation_config.pass_config)
    if switched:
        logger.info("vllm-sink: switched off rotary fusion passes %s", switched)
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


def kv_memory_message(
    cfg: SinkConfig, vllm_config: VllmConfig, specs: dict, available: int
) -> str:
    """Why one sink-mode request does not fit the KV pool, and the fix.

    A request holds at most ``ceil(S/bs) + ceil((W - 1 + in_flight)/bs) + 2``
    blocks (``SinkWindowSpec.max_admission_blocks_per_request``), whatever
    max_model_len; ``in_flight`` is what one step may add to it, the chunk
    size (``--max-num-batched-tokens``) per concurrent batch.
    """
    from vllm_sink.kv_cache import widest_spec

    spec = widest_spec(specs.values())
    bs, batches = spec.block_size, vllm_config.max_concurrent_batches
    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    need = spec.max_admission_blocks_per_request(
        vllm_config.max_in_flight_tokens, vllm_config.model_config.max_model_len
    )
    override = vllm_config.cache_config.num_gpu_blocks_override
    per_block = sum(s.page_size_bytes for s in specs.values())
    pool = (override or available // per_block) - 1  # one is the null block
    fit = ((pool - spec.num_pinned_blocks - 2) * bs - (cfg.window - 1)) // batches
    fix = (
        f"--max-num-batched-tokens {fit} (or less), or more KV-cache memory"
        if fit >= 1
        else "more KV-cache memory or a smaller --window"
    )
    return (
        f"In sink mode a request holds at most {need} KV blocks of {bs} tokens "
        f"whatever its length: the {spec.num_pinned_blocks} sink block(s), the "
        f"--window {cfg.window} and the {chunk} tokens one step may add "
        f"(--max-num-batched-tokens), and two more. The KV pool has {pool} "
        f"blocks. vLLM's advice (a smaller max_model_len) does not apply: "
        f"max_model_len does not bound a sink-mode request, the chunk size does. "
        f"Fix: {fix} (--gpu-memory-utilization, VLLM_CPU_KVCACHE_SPACE on CPU)."
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

    import vllm.v1.engine.core as engine_core
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink.config import get_sink_config
    from vllm_sink.patching import wrap_method

    @wrap_method(
        engine_core,
        "get_kv_cache_configs",
        kind="function",
        reason="a KV pool too small for one sink-mode request names the fix",
        diff="0010-kv-memory-advice.diff",
        params=("vllm_config", "kv_cache_specs", "available_memory"),
    )
    def get_kv_cache_configs(original, vllm_config, specs, available, *args):
        try:
            return original(vllm_config, specs, available, *args)
        except ValueError as error:
            cfg = get_sink_config(vllm_config)
            if cfg is None or "max seq len" not in str(error):
                raise
            message = kv_memory_message(cfg, vllm_config, specs[0], available[0])
            raise SinkConfigError(message) from error

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
