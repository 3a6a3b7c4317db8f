"""KV-cache policy for sink mode: pin the sink page, free the oldest pages.

Importing this module registers ``SinkWindowSpec`` with vLLM's KV-cache spec
registry (after the built-ins, which registering first would skip). The engine
core imports it when it unpickles a worker's spec, so the registration happens
in every process that manages blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheSpec,
    SlidingWindowSpec,
)
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sink.config import SinkConfig, SinkConfigError, get_sink_config
from vllm_sink.metrics import engine_stats

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """KV cache of a sink-mode attention layer.

    ``sliding_window`` is the window W; ``sink`` the S pinned tokens. Per
    request at most ``max_admission_blocks_per_request`` blocks are held,
    whatever the stream length.
    """

    sink: int

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks holding the sink tokens, kept for the request's lifetime."""
        return cdiv(self.sink, self.block_size)

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        """Pinned blocks + the window and in-flight tokens + one misaligned block.

        Bound: ceil(S/bs) + ceil((W - 1 + in_flight)/bs) + 1, never more than
        a full-attention request of max_model_len tokens would hold.
        """
        window_tokens = self.sliding_window - 1 + max_in_flight_tokens
        bound = self.num_pinned_blocks + cdiv(window_tokens, self.block_size) + 1
        return min(bound, cdiv(max_model_len, self.block_size))


class SinkWindowManager(FullAttentionManager):
    """Frees the blocks between the pinned sink blocks and the window.

    Before a step whose first query is token ``n`` (``n`` computed tokens),
    the window starts at ``ws = max(S, n - W + 1)``; the freed gap is the
    blocks wholly inside ``[ceil(S / bs) * bs, ws)``, i.e. block indices
    ``[ceil(S / bs), ws // bs)``. Freed entries become the null block, so the
    worker's block table never points at a block another request now owns.
    """

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink: int = kv_cache_spec.sink
        self.window: int = kv_cache_spec.sliding_window

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        del num_prompt_tokens
        window_start = max(self.sink, processed_computed_tokens - self.window + 1)
        first_gap_block = cdiv(self.sink, self.block_size)
        last_gap_block = window_start // self.block_size  # exclusive
        free_before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, first_gap_block, last_gap_block)
        engine_stats.update(
            self.block_pool.get_num_free_blocks() - free_before, self._pinned_blocks()
        )

    def free(self, request_id: str) -> None:
        super().free(request_id)
        engine_stats.update(0, self._pinned_blocks())

    def _pinned_blocks(self) -> int:
        pinned = cdiv(self.sink, self.block_size)
        return sum(min(pinned, len(b)) for b in self.req_to_blocks.values())


def sink_spec_from(spec: KVCacheSpec, cfg: SinkConfig) -> KVCacheSpec:
    """The sink-mode spec replacing a decoder layer's full or windowed spec."""
    if isinstance(spec, SinkWindowSpec) or not isinstance(
        spec, (FullAttentionSpec, SlidingWindowSpec)
    ):
        return spec
    if isinstance(spec, SlidingWindowSpec) and spec.sliding_window < cfg.span:
        raise SinkConfigError(
            f"A sliding-window layer of {spec.sliding_window} tokens is narrower "
            f"than --attention-sink + --window = {cfg.span}. Fix: choose "
            f"--window {max(1, spec.sliding_window - cfg.sink)} or smaller."
        )
    shared = {f.name for f in fields(SlidingWindowSpec)} - {"sliding_window"}
    kwargs = {
        name: getattr(spec, name)
        for name in shared
        if hasattr(spec, name) and name != "extra_retained_tokens"
    }
    return SinkWindowSpec(**kwargs, sliding_window=cfg.window, sink=cfg.sink)


def _register_spec() -> None:
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec
    )


def install() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_sink.patching import wrap_method

    @wrap_method(
        Attention,
        "get_kv_cache_spec",
        reason="decoder attention layers use SinkWindowSpec in sink mode",
        diff="0003-attention-sink-kv-cache-spec.diff",
    )
    def get_kv_cache_spec(original, self, vllm_config: VllmConfig):
        spec = original(self, vllm_config)
        cfg = get_sink_config(vllm_config)
        if cfg is None or spec is None:
            return spec
        return sink_spec_from(spec, cfg)


_register_spec()
