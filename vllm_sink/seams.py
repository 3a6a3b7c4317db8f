"""Seams: a stream's K/V handed from one engine request to the next, exactly.

A stream longer than ``max_model_len`` is served as a chain of engine requests
(segments, see ``streams.py``). The contract, in stream block indices (``bs``
the block size, ``p = ceil(S / bs)`` pinned blocks):

- A segment continuing a stream of ``L`` known tokens has the prompt
  ``stream[0 : p*bs] + stream[k0*bs : L] + new tokens`` (the *seed*, then new
  tokens), with ``(k0, hb) = seed_blocks(L, ...)``: stream blocks ``[k0, hb)``
  and the pinned ones are expected cached; recomputation starts at ``hb*bs``.
  Every query it computes then has its window start past the pinned blocks, so
  ``V(t)`` and every rotary rank computed from engine indices equal the stream's
  (the non-sink slots of the pinned blocks are masked by the window rule).
- Its engine block ``p + i`` holds stream block ``k0 + i``; the scheduler
  re-chains the hashes of blocks ``p..`` from the hash of stream block
  ``k0 - 1``, so each block's hash names the stream block it holds, and a
  prefix-cache hit hands it the previous segment's blocks: nothing is
  recomputed. ``kv_cache.SinkWindowManager`` says why such a hit is exact.
- The segment names its stream and seed in a ``SeamMarker``, carried in
  ``SamplingParams.extra_args[MARKER_KEY]`` (pickled/serialized with the request
  through vLLM's own path to the engine core).

Holds keep a stream's blocks out of the pool's reach while they are needed, so
a seam never misses:

- stream hold (``"stream:" + id``): made when a segment marked ``hold`` ends
  capped (it will be continued), from the blocks it still has, and by
  ``sink_lookup`` (a new request continuing a cached stream);
- seed hold (the segment's engine id): at ``add_request`` the next segment takes
  the stream hold and keeps the pinned blocks and ``[k0, hb)`` until it ends,
  so a preempted seam request always resumes from its seed;
- an abort of any segment of the stream drops both (also one landing just after
  its segment ended capped: the hold remembers the segment that made it), and
  the front-end drops the stream hold (utility ``EngineCore.sink_release``) when
  a stream ends early, after aborting what still runs of it (its client left,
  the next segment was refused, or a segment marked to hold ended early).

Hooks (engine core, all through ``patching``; ``patches/0007-stream-seams.diff``):
``Scheduler.add_request`` (re-chain, take the hold), ``Scheduler._free_request``
(make the stream hold, drop the seed hold), ``Scheduler.finish_requests`` (an
abort drops holds), ``KVCacheManager.get_computed_blocks`` (a seam request's
hit is capped at its plan) and the utilities ``EngineCore.sink_lookup`` and
``EngineCore.sink_release``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger("vllm.vllm_sink.seams")  # under vLLM's handler

MARKER_KEY = "vllm_sink"
MAX_ENDED = 4096  # streams remembered as ended, per scheduler
SEGMENT_SEP = "~sink"
_SEGMENT_SUFFIX = re.compile(re.escape(SEGMENT_SEP) + r"\d+$")


def pinned_blocks(sink: int, block_size: int) -> int:
    return -(-sink // block_size)


def seed_blocks(
    stream_len: int, recompute_last: bool, sink: int, window: int, block_size: int
) -> tuple[int, int]:
    """``(k0, hb)`` of a seed continuing a stream of ``stream_len`` tokens.

    ``hb``: stream blocks kept (the last token's block is recomputed when
    ``recompute_last``: a seed with no new tokens, or prompt logprobs wanted).
    ``k0``: first window block kept, the block of the window start of token
    ``hb*bs``; ``k0 == p`` means no gap (the seed is the stream's prefix).
    """
    p = pinned_blocks(sink, block_size)
    last = stream_len - 1 if recompute_last else stream_len
    hb = max(0, last) // block_size
    first_key = hb * block_size - window + 1
    k0 = max(p, first_key // block_size) if first_key > 0 else p
    return min(k0, max(hb, p)), hb


def largest_seed(sink: int, window: int, block_size: int) -> int:
    """Most tokens a seed can hold: the pinned blocks plus ``L - k0*bs``, where
    ``k0*bs >= hb*bs - window - bs + 2`` and ``L <= hb*bs + bs``."""
    return pinned_blocks(sink, block_size) * block_size + window + 2 * block_size - 2


def stream_key(request_id: str) -> str:
    """The user request id of a segment's engine id."""
    return _SEGMENT_SUFFIX.sub("", request_id)


@dataclass(frozen=True)
class SeamMarker:
    """What a segment tells the engine core about its place in the stream."""

    stream: str  # the user's request id
    first_block: int  # k0: the stream block at engine block p
    cap_tokens: int | None  # largest prefix-cache hit allowed (its seed), or None
    hold: bool  # keep the blocks for the next segment when this one ends capped
    carry_text: str = ""  # stream text before the seam, for stop strings (front-end)
    segment: int = 0  # its index in the stream (0: the stream starts)

    def to_extra_args(self, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        return {**(extra_args or {}), MARKER_KEY: asdict(self)}

    @classmethod
    def of(cls, request: Any) -> SeamMarker | None:
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        data = extra.get(MARKER_KEY)
        return None if data is None else cls(**data)


class Holds:
    """Block references held for streams between and under seams (one scheduler).

    A hold maps stream block index -> the blocks (one per KV-cache group that
    still has it) and keeps their stream hashes, so the next segment can
    re-chain from them.
    """

    def __init__(self, scheduler: Any) -> None:
        from vllm.utils.hashing import get_hash_fn_by_name

        manager = scheduler.kv_cache_manager
        spec = _sink_spec(scheduler)
        self.pool = manager.block_pool
        self.manager = manager
        self.block_size = spec.block_size
        self.pinned = spec.num_pinned_blocks
        self.sink, self.window = spec.sink, spec.sliding_window
        self.hash_fn = get_hash_fn_by_name(
            scheduler.cache_config.prefix_caching_hash_algo
        )
        self.held: dict[str, dict[int, Any]] = {}  # key -> stream block -> blocks
        self.hashes: dict[str, dict[int, Any]] = {}  # key -> stream block -> hash
        self.made_by: dict[str, str] = {}  # stream hold key -> segment that made it
        self.ended: dict[str, None] = {}  # streams ended early, oldest first

    # -- making holds -------------------------------------------------------

    def _hold(self, key: str, blocks: dict[int, Any], hashes: dict[int, Any]) -> None:
        self.release(key)
        for group_blocks in blocks.values():
            self.pool.touch(group_blocks)
        self.held[key], self.hashes[key] = blocks, hashes

    def hold_finished(self, request: Any, marker: SeamMarker) -> None:
        """Keep a capped segment's blocks for the segment that continues it."""
        shift = marker.first_block - self.pinned
        groups = self.manager.get_blocks(request.request_id).blocks
        blocks: dict[int, list] = {}
        for index in range(len(groups[0])):
            row = _live(g[index] for g in groups)
            if row:
                blocks[_stream_block(index, self.pinned, shift)] = row
        hashes = {
            _stream_block(i, self.pinned, shift): h
            for i, h in enumerate(request.block_hashes)
        }
        key = "stream:" + marker.stream
        self._hold(key, blocks, hashes)
        self.made_by[key] = request.request_id

    def lookup(self, key: str, token_ids: list[int]) -> tuple[int, int]:
        """Longest exact hit on a stream prefix, held for its next segment.

        Returns ``(k0, hb)`` as ``seed_blocks`` would for a stream of ``hb*bs``
        tokens, or ``(p, 0)`` when no seam is worth it (a prefix hit of the
        plain first segment then finds what is cached).
        """
        self.ended.pop(key, None)  # a new stream with that id
        if not self.manager.enable_caching:
            return self.pinned, 0
        hashes = self._chain(token_ids, 0, len(token_ids) // self.block_size, None)
        groups, hit_tokens, _ = self.manager.coordinator.find_longest_cache_hit(
            hashes, len(token_ids) - 1
        )
        k0, hb = seed_blocks(hit_tokens, False, self.sink, self.window, self.block_size)
        if k0 <= self.pinned:
            return self.pinned, 0
        keep = [i for i in range(hb) if i < self.pinned or i >= k0]
        blocks = {i: _live(g[i] for g in groups) for i in keep}
        self._hold("stream:" + key, blocks, {k0 - 1: hashes[k0 - 1]})
        return k0, hb

    # -- using them ---------------------------------------------------------

    def admit(self, request: Any, marker: SeamMarker) -> bool:
        """Re-chain a segment's hashes and turn the stream hold into its seed hold.

        False for an orphan: a segment of a stream that already ended (its add
        overtaken by the stream's abort and release), which must not run.
        """
        if marker.segment == 0:
            self.ended.pop(marker.stream, None)  # a new stream with that id
        key = "stream:" + marker.stream
        blocks, hashes = self.held.pop(key, None), self.hashes.pop(key, {})
        self.made_by.pop(key, None)
        k0 = marker.first_block
        if k0 > self.pinned and k0 - 1 not in hashes:
            if marker.stream in self.ended:
                return False
            # Not exact (its seed is recomputed as a plain prompt), but alive.
            logger.warning(
                "vllm-sink: segment %s continues stream %s at block %d, but the "
                "engine holds nothing for it; it recomputes its seed.",
                request.request_id,
                marker.stream,
                k0,
            )
        elif k0 > self.pinned:
            self._rechain(request, hashes[k0 - 1])
        if blocks is None:
            return True
        cap_blocks = (marker.cap_tokens or 0) // self.block_size - self.pinned + k0
        seed = {
            i: row
            for i, row in blocks.items()
            if i < self.pinned or k0 <= i < cap_blocks
        }
        self.pool.free_blocks(
            b for i, row in blocks.items() if i not in seed for b in row
        )
        self.held[request.request_id] = seed
        return True

    def end(self, stream: str) -> None:
        """A stream ended early: drop its hold, and refuse a segment of it that
        arrives later (remembering the last ``MAX_ENDED`` streams)."""
        self.release("stream:" + stream)
        self.ended[stream] = None
        if len(self.ended) > MAX_ENDED:
            del self.ended[next(iter(self.ended))]

    def release(self, key: str) -> None:
        blocks = self.held.pop(key, None)
        self.hashes.pop(key, None)
        self.made_by.pop(key, None)
        if blocks:
            self.pool.free_blocks(b for row in blocks.values() for b in row)

    def _rechain(self, request: Any, parent: Any) -> None:
        p = self.pinned
        count = len(request.block_hashes)
        if count > p:
            request.block_hashes[p:] = self._chain(
                request.all_token_ids, p, count, parent, request
            )

    def _chain(
        self,
        token_ids: Any,
        first: int,
        end: int,
        parent: Any,
        request: Any = None,
    ) -> list:
        from vllm.v1.core.kv_cache_utils import (
            generate_block_hash_extra_keys,
            hash_block_tokens,
        )

        bs, out = self.block_size, []
        for index in range(first, end):
            start = index * bs
            extra = None
            if request is not None:
                extra, _ = generate_block_hash_extra_keys(request, start, start + bs, 0)
            parent = hash_block_tokens(
                self.hash_fn, parent, token_ids[start : start + bs], extra
            )
            out.append(parent)
        return out


def _live(row: Any) -> list:
    """A block index's blocks in every group, less the groups that freed it (a
    hybrid model's local layers free blocks their window no longer reads)."""
    return [block for block in row if not block.is_null]


def _stream_block(engine_block: int, pinned: int, shift: int) -> int:
    return engine_block if engine_block < pinned else engine_block + shift


def stream_of(scheduler: Any, request_id: str) -> str:
    """The stream an aborted engine id belongs to. vLLM suffixes the ids it
    schedules, so the id alone does not name it: a live request names it in its
    marker, and a finished one that left a hold is remembered with it (an abort
    can arrive after its segment ended capped). Otherwise the id is the stream's
    or a segment's id as the front-end made it."""
    marker = SeamMarker.of(scheduler.requests.get(request_id))
    if marker is not None:
        return marker.stream
    holds = scheduler.__dict__.get("_sink_holds")
    for key, maker in (holds.made_by if holds else {}).items():
        if maker == request_id:
            return key.removeprefix("stream:")
    return stream_key(request_id)


def _sink_spec(scheduler: Any) -> Any:
    """The global layers' spec: seeds are sized by the widest window (a hybrid
    model's local windows are no wider, ``engine_config.check_model``)."""
    from vllm_sink.kv_cache import widest_spec

    groups = scheduler.kv_cache_config.kv_cache_groups
    return widest_spec(group.kv_cache_spec for group in groups)


def holds_of(scheduler: Any) -> Holds:
    holds = scheduler.__dict__.get("_sink_holds")
    if holds is None:
        holds = scheduler.__dict__["_sink_holds"] = Holds(scheduler)
    return holds


def install() -> None:
    """Engine-core hooks (scheduler process)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.request import RequestStatus

    from vllm_sink.patching import add_method, wrap_method

    diff = "0007-stream-seams.diff"

    @wrap_method(Scheduler, "add_request", reason="seams: re-chain, hold", diff=diff)
    def add_request(original, self, request):
        marker = SeamMarker.of(request)
        if marker is None or not self.kv_cache_manager.enable_caching:
            return original(self, request)
        if holds_of(self).admit(request, marker):
            return original(self, request)
        # Its stream ended: vLLM's front-end forgot it, so nothing waits for it.
        logger.info("vllm-sink: dropped %s (its stream ended)", request.request_id)
        result = original(self, request)
        self.finish_requests(request.request_id, RequestStatus.FINISHED_ABORTED)
        return result

    @wrap_method(Scheduler, "_free_request", reason="seams: hold blocks", diff=diff)
    def free_request(original, self, request, *args, **kwargs):
        marker = SeamMarker.of(request)
        if marker is not None and self.kv_cache_manager.enable_caching:
            holds = holds_of(self)
            capped = request.status == RequestStatus.FINISHED_LENGTH_CAPPED
            if marker.hold and capped:
                holds.hold_finished(request, marker)
            holds.release(request.request_id)
        return original(self, request, *args, **kwargs)

    @wrap_method(
        Scheduler, "finish_requests", reason="seams: aborts drop holds", diff=diff
    )
    def finish_requests(original, self, request_ids, finished_status):
        holds = self.__dict__.get("_sink_holds")
        if holds is not None and finished_status == RequestStatus.FINISHED_ABORTED:
            ids = [request_ids] if isinstance(request_ids, str) else request_ids
            for request_id in list(ids or ()):
                holds.end(stream_of(self, request_id))
        return original(self, request_ids, finished_status)

    @wrap_method(
        KVCacheManager,
        "get_computed_blocks",
        reason="seams: a seam request's hit is its seed",
        diff=diff,
        params=("request",),
    )
    def get_computed_blocks(original, self, request, *args, **kwargs):
        # vLLM 0.33 added max_cache_hit_length (an upper bound on the hit):
        # passed through, and honoured below.
        marker = SeamMarker.of(request)
        cap = None if marker is None else marker.cap_tokens
        if cap is None or not self.prefix_cache_lookup_enabled(request):
            return original(self, request, *args, **kwargs)
        # Look up to the seed's end, not trim a longer hit: a longer hit's gap
        # (null blocks) can cover the seed's window blocks.
        limit = min(cap, request.num_tokens - 1)
        bound = kwargs.get("max_cache_hit_length", args[0] if args else None)
        if bound is not None:
            limit = min(limit, bound)
        groups, num_tokens, _ = self.coordinator.find_longest_cache_hit(
            request.block_hashes, limit
        )
        return self.create_kv_cache_blocks(groups), num_tokens, 0

    from vllm.v1.outputs import LogprobsTensors

    @wrap_method(
        LogprobsTensors,
        "empty_cpu",
        reason="seams: prompt logprobs of a seed's cached positions are zeros",
        diff=diff,
        kind="staticmethod",
    )
    def empty_cpu(original, num_positions, num_tokens_per_position):
        # A seam segment reads its seed from the cache but wants prompt logprobs
        # of its new tokens: the seed's rows are never written. Zeros decode.
        tensors = original(num_positions, num_tokens_per_position)
        for tensor in (tensors.logprob_token_ids, tensors.selected_token_ranks):
            tensor.zero_()
        return tensors

    def sink_lookup(self, stream: str, token_ids: list[int]) -> tuple[int, int]:
        """Utility: the held seed of a new request continuing a cached stream."""
        return holds_of(self.scheduler).lookup(stream, list(token_ids))

    add_method(EngineCore, "sink_lookup", sink_lookup, reason="seams", diff=diff)

    def sink_release(self, stream: str) -> None:
        """Utility: drop what is held for a stream that ended between segments."""
        holds_of(self.scheduler).end(stream)

    add_method(EngineCore, "sink_release", sink_release, reason="seams", diff=diff)
