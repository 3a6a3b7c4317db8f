"""KV-cache policy for sink mode: pin the sink page, free the oldest pages.

Importing this module registers ``SinkWindowSpec`` with vLLM's KV-cache spec
registry (after the built-ins, which registering first would skip). The engine
core imports it when it unpickles a worker's spec, so the registration happens
in every process that manages blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import (
    AttentionSpec,
    FullAttentionSpec,
    KVCacheSpec,
    SlidingWindowSpec,
)
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sink.config import (
    SinkConfig,
    SinkConfigError,
    get_sink_config,
    layer_config,
)
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
    def num_retained_tokens(self) -> int:
        """0: no model runner may null this group's block-table entries.

        vLLM >= 0.33's V2 runners null a ``SlidingWindowSpec`` group's entries
        below ``num_retained_tokens`` before a step's first position (0 turns
        that off): that would drop the pinned sink blocks. ``SinkWindowManager``
        nulls the freed entries itself.
        """
        return 0

    def is_uniform_with_collection(self, kv_cache_specs: dict) -> bool:
        """One KV-cache group per (window, sinks): a hybrid model's local layers
        (their own window, no sinks) never share a manager with global ones."""
        return all(
            isinstance(spec, SinkWindowSpec)
            and (spec.sliding_window, spec.sink) == (self.sliding_window, self.sink)
            for spec in kv_cache_specs.values()
        )

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks holding the sink tokens, kept for the request's lifetime."""
        return cdiv(self.sink, self.block_size)

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        """Pinned blocks + the window and in-flight tokens + two blocks.

        Bound: ceil(S/bs) + ceil((W - 1 + in_flight)/bs) + 2 (one misaligned
        block, one retained for seams, see ``SinkWindowManager``), never more
        than a full-attention request of max_model_len tokens would hold.
        """
        window_tokens = self.sliding_window - 1 + max_in_flight_tokens
        bound = self.num_pinned_blocks + cdiv(window_tokens, self.block_size) + 2
        return min(bound, cdiv(max_model_len, self.block_size))


class SinkWindowManager(FullAttentionManager):
    """Frees the blocks between the pinned sink blocks and the window.

    Before a step whose first query is token ``n`` (``n`` computed tokens),
    the window starts at ``ws = max(S, n - W + 1)``; the freed gap is the
    blocks wholly inside ``[ceil(S / bs) * bs, ws - bs)``, i.e. block indices
    ``[ceil(S / bs), max(0, ws - bs) // bs)``. One block more than the window
    needs is retained, so that when the request ends, the blocks a seam seed
    starts from (``seams.seed_blocks``: at most one block before the window of
    the last token) are still the request's. Freed entries become the null
    block, so the worker's block table never points at a block another request
    now owns; freed blocks keep their hashes until the pool reuses them.

    Prefix-cache hit (``find_longest_cache_hit``): token ``j``'s pre-RoPE K/V
    is a pure function of the stream tokens ``0..j`` (its queries saw only
    earlier tokens of the same stream under the same S, W and sink variant,
    which are fixed per engine), and a block's hash chains over exactly those
    tokens, so a cached block holds the K/V this request would compute. A hit
    of ``h`` tokens is exact when every key a recomputed query ``t >= h``
    reads is cached: the pinned blocks ``[0, p)`` and the blocks from the
    window start of ``h``, ``[max(p, (h - W + 1) // bs), h // bs)``. The
    evicted middle is never read and comes back as null blocks.
    """

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink: int = kv_cache_spec.sink
        self.window: int = kv_cache_spec.sliding_window
        self.num_pinned: int = kv_cache_spec.num_pinned_blocks
        self.pinned_of: dict[str, int] = {}  # request -> its blocks counted pinned

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        del num_prompt_tokens
        window_start = max(self.sink, processed_computed_tokens - self.window + 1)
        first_gap_block = self.num_pinned
        last_gap_block = max(0, window_start - self.block_size) // self.block_size
        free_before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, first_gap_block, last_gap_block)
        engine_stats.update(
            self.block_pool.get_num_free_blocks() - free_before,
            self._count_pinned(request_id),
        )

    def free(self, request_id: str) -> None:
        super().free(request_id)
        engine_stats.update(0, -self.pinned_of.pop(request_id, 0))

    def _count_pinned(self, request_id: str) -> int:
        """The change of this request's pinned blocks (a running total: O(1))."""
        now = min(self.num_pinned, len(self.req_to_blocks.get(request_id, ())))
        change = now - self.pinned_of.get(request_id, 0)
        self.pinned_of[request_id] = now
        return change

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        """Pinned blocks + the contiguous run covering the window at the hit."""
        assert isinstance(kv_cache_spec, SinkWindowSpec)
        bs = kv_cache_spec.block_size
        groups = len(kv_cache_group_ids)
        if drop_eagle_block or alignment_tokens != bs or dcp_world_size > 1:
            return tuple([] for _ in range(groups)), 0  # refused at start-up
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, bs)
        cached = _CachedLookup(hashes, block_pool, kv_cache_group_ids)
        pinned = kv_cache_spec.num_pinned_blocks
        window_blocks = cdiv(kv_cache_spec.sliding_window - 1, bs)
        num_blocks = min(max_length // bs, len(hashes))
        hit = sink_hit_blocks(num_blocks, pinned, window_blocks, cached.has)
        null = block_pool.null_block
        computed = tuple([null] * hit for _ in range(groups))
        for i, found in cached.found.items():
            if i < min(pinned, hit) or hit - window_blocks <= i < hit:
                for blocks, block in zip(computed, found):
                    blocks[i] = block
        return computed, hit * bs


class _CachedLookup:
    """Block-pool lookups by block index, remembering what was found."""

    def __init__(self, hashes, block_pool, group_ids: list[int]) -> None:
        self.hashes, self.pool, self.group_ids = hashes, block_pool, group_ids
        self.found: dict[int, list] = {}

    def has(self, index: int) -> bool:
        blocks = self.pool.get_cached_block(self.hashes[index], self.group_ids)
        if blocks:
            self.found[index] = blocks
        return bool(blocks)


def sink_hit_blocks(num_blocks: int, pinned: int, window_blocks: int, has) -> int:
    """Longest exact hit, in blocks, among the first ``num_blocks``.

    ``has(i)`` says whether block ``i`` is cached. A hit of ``h`` blocks needs
    blocks ``[0, min(p, h))`` and ``[max(p, h - window_blocks), h)`` cached,
    with ``window_blocks = ceil((W - 1) / bs)``.
    """
    for i in range(min(pinned, num_blocks)):
        if not has(i):
            return i  # a plain prefix hit
    run = 0
    for i in range(num_blocks - 1, pinned - 1, -1):
        if not has(i):
            run = 0
            continue
        run += 1
        if run >= window_blocks or i == pinned:
            return i + min(run, max(window_blocks, 1))
    return min(pinned, num_blocks)


def widest_spec(specs: Iterable[KVCacheSpec]) -> SinkWindowSpec:
    """The sink-mode spec with the widest window and most sinks: the global
    layers' (the flags'), which seams and the KV-memory advice are sized by."""
    sink_specs = [s for s in specs if isinstance(s, SinkWindowSpec)]
    if not sink_specs:
        raise RuntimeError("vllm-sink: no sink-mode KV-cache group")
    return max(sink_specs, key=lambda s: (s.sliding_window, s.sink))


def sink_spec_from(spec: KVCacheSpec, cfg: SinkConfig) -> KVCacheSpec:
    """The sink-mode spec replacing a decoder layer's full or windowed spec;
    ``cfg`` is the layer's rule (``config.layer_config``)."""
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
    _refuse_settings_dropped(spec)
    kwargs = {name: getattr(spec, name) for name in _CARRIED}
    return SinkWindowSpec(**kwargs, sliding_window=cfg.window, sink=cfg.sink)


# What SinkWindowSpec takes over from a layer's spec; the window it replaces by
# its own rule; any other setting is refused.
_CARRIED = frozenset(f.name for f in fields(AttentionSpec))
_REPLACED = {"sliding_window"}


def _refuse_settings_dropped(spec: KVCacheSpec) -> None:
    """A layer's spec setting that SinkWindowSpec does not carry (and its value
    is not the default) is one sink mode cannot honour: refuse it by name."""
    dropped = [
        f"{f.name}={getattr(spec, f.name)!r}"
        for f in fields(spec)
        if f.name not in _CARRIED | _REPLACED and getattr(spec, f.name) != _default(f)
    ]
    if dropped:
        raise SinkConfigError(
            f"Sink mode cannot honour this attention layer's KV-cache setting "
            f"{', '.join(dropped)} ({type(spec).__name__}): chunked local, "
            "non-causal and similar attention are not StreamingLLM attention. "
            "Fix: drop --attention-sink/--window for this model."
        )


def _default(field):
    if field.default_factory is not MISSING:
        return field.default_factory()
    return field.default


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
        params=("vllm_config",),
    )
    def get_kv_cache_spec(original, self, vllm_config: VllmConfig):
        spec = original(self, vllm_config)
        cfg = get_sink_config(vllm_config)
        if cfg is None or spec is None:
            return spec
        native = getattr(spec, "sliding_window", None)
        return sink_spec_from(spec, layer_config(cfg, vllm_config, native))


_register_spec()
