"""SinkWindowManager on vLLM's real BlockPool, driven like allocate_slots."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_sink.config import SinkConfig, SinkConfigError
from vllm_sink.kv_cache import SinkWindowManager, SinkWindowSpec, sink_spec_from

BS = 4


def make_manager(sink: int, window: int, num_blocks: int, max_in_flight: int):
    spec = SinkWindowSpec(
        block_size=BS,
        num_kv_heads=1,
        head_size=8,
        dtype=torch.float32,
        sliding_window=window,
        sink=sink,
    )
    pool = BlockPool(
        num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=BS
    )
    cap = spec.max_admission_blocks_per_request(max_in_flight, max_model_len=10**9)
    manager = SinkWindowManager(
        spec,
        block_pool=pool,
        enable_caching=False,
        kv_cache_group_id=0,
        scheduler_block_size=BS,
        max_admission_blocks_per_request=cap,
    )
    return manager, pool, cap


@dataclass
class Stream:
    computed: int = 0
    alive: bool = True
    pinned: list[int] = field(default_factory=list)


def step(manager, pool, rid: str, s: Stream, chunk: int, sink: int) -> bool:
    """One scheduling step of ``chunk`` tokens, in allocate_slots' order."""
    manager.remove_skipped_blocks(rid, s.computed)
    total = s.computed + chunk
    need = manager.get_num_blocks_to_allocate(
        rid, total, [], s.computed, s.computed, total, apply_admission_cap=True
    )
    if need > pool.get_num_free_blocks():
        return False
    manager.allocate_new_blocks(rid, total, total)
    if not s.pinned:
        blocks = manager.req_to_blocks[rid]
        s.pinned = [b.block_id for b in blocks[: cdiv(sink, BS)]]
    return True


def read_positions(n: int, chunk: int, sink: int, window: int) -> set[int]:
    """Every key position the attention reads for queries n .. n+chunk-1."""
    keys = set(range(min(sink, n + chunk)))
    keys |= set(range(max(sink, n - window + 1), n + chunk))
    return keys


schedule = st.lists(
    st.tuples(
        st.integers(0, 2),  # stream
        st.sampled_from(["step", "step", "step", "decode", "abort", "preempt"]),
        st.integers(1, 12),  # chunk
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(sink=st.integers(0, 9), window=st.integers(1, 17), ops=schedule)
def test_random_schedules_keep_invariants(sink, window, ops):
    max_chunk = 12
    manager, pool, cap = make_manager(sink, window, 64, max_chunk)
    initial_free = pool.get_num_free_blocks()
    streams = {f"r{i}": Stream() for i in range(3)}
    bound = cdiv(sink, BS) + cdiv(window + max_chunk, BS) + 2  # +1 seam block
    assert cap <= bound
    for index, op, chunk in ops:
        rid = f"r{index}"
        s = streams[rid]
        if op in ("abort", "preempt"):
            manager.free(rid)
            s.computed, s.pinned = 0, []  # a preempted request recomputes
            continue
        chunk = 1 if op == "decode" else chunk
        if not step(manager, pool, rid, s, chunk, sink):
            continue
        blocks = manager.req_to_blocks[rid]
        held = [b for b in blocks if not b.is_null]
        assert len(held) <= cap, (len(held), cap)
        assert [b.block_id for b in blocks[: len(s.pinned)]] == s.pinned
        for pos in read_positions(s.computed, chunk, sink, window):
            block = blocks[pos // BS]
            assert not block.is_null, (pos, s.computed, chunk)
            assert block.ref_cnt == 1
        s.computed += chunk
        owned = [
            b.block_id
            for r in streams
            for b in manager.req_to_blocks.get(r, [])
            if not b.is_null
        ]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert pool.get_num_free_blocks() == initial_free - len(owned)
    for rid in streams:
        manager.free(rid)
    assert pool.get_num_free_blocks() == initial_free


@pytest.mark.parametrize("sink,window", [(4, 16), (0, 8), (5, 3), (16, 32)])
def test_long_stream_holds_constant_blocks(sink, window):
    manager, pool, cap = make_manager(sink, window, 40, 1)
    s = Stream()
    held = []
    for _ in range(2000):
        assert step(manager, pool, "r", s, 1, sink)
        s.computed += 1
        held.append(sum(not b.is_null for b in manager.req_to_blocks["r"]))
    assert max(held) <= cap
    assert len(set(held[-500:])) <= 2  # flat: only block-boundary jitter
    manager.free("r")
    assert pool.get_num_free_blocks() == 40 - 1  # the null block is never free


def test_admission_bound_is_independent_of_length():
    spec = make_manager(4, 2044, 8, 1)[0].kv_cache_spec
    short = spec.max_admission_blocks_per_request(512, max_model_len=8192)
    long = spec.max_admission_blocks_per_request(512, max_model_len=10**7)
    assert short == long == cdiv(4, BS) + cdiv(2043 + 512, BS) + 2


def test_spec_conversion_and_narrow_sliding_window():
    full = FullAttentionSpec(
        block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32
    )
    spec = sink_spec_from(full, SinkConfig(sink=4, window=60))
    assert isinstance(spec, SinkWindowSpec)
    assert (spec.sink, spec.sliding_window, spec.block_size) == (4, 60, 16)
    assert spec.page_size_bytes == full.page_size_bytes
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    narrow = SlidingWindowSpec(
        block_size=16,
        num_kv_heads=2,
        head_size=32,
        dtype=torch.float32,
        sliding_window=32,
    )
    with pytest.raises(SinkConfigError, match="--window"):
        sink_spec_from(narrow, SinkConfig(sink=4, window=60))


@pytest.mark.parametrize(
    "setting", [{"attention_chunk_size": 128}, {"non_causal": True}]
)
def test_spec_setting_sink_mode_cannot_honour_is_refused(setting):
    """Not dropped silently: a chunked-local or non-causal layer is refused."""
    spec = FullAttentionSpec(
        block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32, **setting
    )
    (name,) = setting
    with pytest.raises(SinkConfigError, match=f"cannot honour .*{name}="):
        sink_spec_from(spec, SinkConfig(sink=4, window=60))


def make_cached_manager(sink: int, window: int, num_blocks: int):
    """vLLM's KVCacheManager, prefix caching on, over one SinkWindowSpec group."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    spec = SinkWindowSpec(
        block_size=BS,
        num_kv_heads=1,
        head_size=8,
        dtype=torch.float32,
        sliding_window=window,
        sink=sink,
    )
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)],
    )
    manager = KVCacheManager(
        config,
        max_model_len=10**6,
        scheduler_block_size=BS,
        hash_block_size=BS,
        max_in_flight_tokens=12,
        enable_caching=True,
    )
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return manager, get_request_block_hasher(BS, hash_fn)


@dataclass
class Turn:
    """One request of a conversation, as the scheduler would run it."""

    request: object
    prompt_len: int
    out_len: int
    written: set = field(default_factory=set)  # block ids it computed itself


conversation_schedule = st.lists(
    st.tuples(
        st.integers(0, 2),  # conversation
        st.sampled_from(["step", "step", "step", "turn", "turn", "preempt"]),
        st.integers(1, 12),  # chunk, or new tokens of a turn
    ),
    min_size=80,
    max_size=300,
)


@settings(max_examples=80, deadline=None)
@given(sink=st.integers(0, 9), window=st.integers(1, 17), ops=conversation_schedule)
def test_cached_conversations_reuse_only_their_own_blocks(sink, window, ops):
    """Conversations re-send their history; hits, evictions, preemptions.

    A block reached through a cache hit must hold what the request's own
    tokens would have written there (the content of each block id is tracked
    as it is written); every key a step reads is in a block the request holds;
    nothing leaks.
    """
    from vllm import SamplingParams
    from vllm.v1.request import Request

    manager, hasher = make_cached_manager(sink, window, 40)
    pool = manager.block_pool
    initial_free = pool.get_num_free_blocks()
    content: dict[int, tuple] = {}  # block id -> the tokens its K/V was made of
    histories = {c: [] for c in range(3)}
    running: dict[int, Turn] = {}
    serial = 0

    def group_blocks(rid):
        return manager.coordinator.single_type_managers[0].req_to_blocks[rid]

    def schedule(turn: Turn, chunk: int) -> bool:
        req = turn.request
        first = req.num_computed_tokens == 0 and not group_blocks(req.request_id)
        hit_blocks, hit = None, 0
        if first:
            hit_blocks, hit, _ = manager.get_computed_blocks(req)
            for i, block in enumerate(hit_blocks.blocks[0]):
                if not block.is_null:  # a hit holds this request's own K/V
                    assert content[block.block_id] == tuple(
                        req.all_token_ids[: (i + 1) * BS]
                    )
        n = req.num_computed_tokens + hit
        chunk = min(chunk, req.num_tokens - n)
        got = manager.allocate_slots(
            req, chunk, num_new_computed_tokens=hit, new_computed_blocks=hit_blocks
        )
        if got is None:
            return False
        blocks = group_blocks(req.request_id)
        for pos in read_positions(n, chunk, sink, window):
            block = blocks[pos // BS]
            assert not block.is_null and block.ref_cnt >= 1, (pos, n, chunk)
        for pos in range(n, n + chunk):  # written now, by this request
            block = blocks[pos // BS]
            content[block.block_id] = tuple(req.all_token_ids[: (pos // BS + 1) * BS])
        req.num_computed_tokens = n + chunk
        return True

    def step(conv: int, turn: Turn, chunk: int) -> None:
        req = turn.request
        if not schedule(turn, 1 if req.num_computed_tokens else chunk):
            return
        if req.num_computed_tokens < req.num_tokens:
            return  # a prefill chunk; no token sampled yet
        if req.num_output_tokens == turn.out_len:
            manager.free(req)
            histories[conv] = list(req.all_token_ids)
            del running[conv]
        else:
            req.append_output_token_ids((conv * 31 + req.num_tokens * 7) % 997)

    for conv, op, size in ops:
        turn = running.get(conv)
        if op == "turn" and turn is None:
            history = histories[conv]
            history += [(conv * 1000 + len(history) + j) % 997 for j in range(size)]
            serial += 1
            req = Request(
                f"c{conv}-{serial}",
                list(history),
                SamplingParams(max_tokens=3),
                None,
                block_hasher=hasher,
            )
            running[conv] = Turn(req, len(history), 3)
        elif op == "preempt" and turn is not None:
            manager.free(turn.request)
            turn.request.num_computed_tokens = 0
        elif op == "step":  # one scheduler step: every running turn, in order
            for c, t in list(running.items()):
                step(c, t, size)
        held = [
            b.block_id
            for t in running.values()
            for b in group_blocks(t.request.request_id)
            if not b.is_null
        ]
        in_use = initial_free - pool.get_num_free_blocks()
        assert in_use <= len(held)  # shared hit blocks count once in the pool
        assert len(set(held)) == in_use
    for turn in running.values():
        manager.free(turn.request)
    assert pool.get_num_free_blocks() == initial_free


def test_model_runners_never_null_the_sink_blocks():
    """vLLM >= 0.33's V2 runners null a SlidingWindowSpec group's block-table
    entries below num_retained_tokens (0 turns it off): SinkWindowSpec says 0,
    also after 0.33's planner adds extra_retained_tokens (dataclasses.replace)."""
    import dataclasses

    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    args = dict(block_size=BS, num_kv_heads=1, head_size=8, dtype=torch.float32)
    spec = SinkWindowSpec(**args, sliding_window=28, sink=4)
    assert spec.num_retained_tokens == 0
    plain = SlidingWindowSpec(**args, sliding_window=28)
    if hasattr(plain, "num_retained_tokens"):  # vLLM >= 0.33: the override matters
        assert plain.num_retained_tokens == 27
    if "extra_retained_tokens" in {f.name for f in dataclasses.fields(spec)}:
        grown = dataclasses.replace(spec, extra_retained_tokens=8)
        assert isinstance(grown, SinkWindowSpec) and grown.num_retained_tokens == 0
