"""Engine-level KV policy: a pool of a few windows serves streams 20x its size."""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown
from vllm import SamplingParams

from vllm_sink.metrics import engine_stats
from vllm_sink.tiny_models import make_tiny_model

BLOCK = 16
POOL_BLOCKS = 16  # 256 tokens of KV in all
SINK, WINDOW = 4, 32
STREAM_TOKENS = 20 * POOL_BLOCKS * BLOCK  # 5120 per stream


def kv_usage(llm) -> float:
    """vLLM's own KV-cache usage gauge (Prometheus, fraction of the pool)."""
    for metric in llm.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc":
            return metric.value
    raise AssertionError("vllm:kv_cache_usage_perc not reported")


def test_streams_far_beyond_the_pool_keep_kv_usage_flat(tiny_llama):
    llm = make_llm(
        tiny_llama,
        SINK,
        WINDOW,
        num_gpu_blocks_override=POOL_BLOCKS,
        max_model_len=STREAM_TOKENS + 64,
        max_num_batched_tokens=32,
        disable_log_stats=False,
    )
    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=STREAM_TOKENS - 10, temperature=0, ignore_eos=True
    )
    for i in range(2):
        engine.add_request(f"s{i}", {"prompt_token_ids": list(range(3, 13))}, params)
    usage, pinned, finished, steps = [], [], {}, 0
    pinned_before = engine_stats.pinned_blocks  # a running total per process
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = len(out.outputs[0].token_ids)
            steps += 1
            if steps % 64 == 0:
                usage.append(kv_usage(llm))
                pinned.append(engine_stats.pinned_blocks - pinned_before)
    finally:
        shutdown(llm)
    assert finished == {"s0": STREAM_TOKENS - 10, "s1": STREAM_TOKENS - 10}
    assert set(pinned) == {2}  # one sink block per stream
    assert engine_stats.pinned_blocks == pinned_before  # both freed
    after_fill = usage[4:-2]  # the window is full after 64 steps
    print(
        f"KV usage: start {usage[0]:.3f} end {after_fill[-1]:.3f} "
        f"min {min(after_fill):.3f} max {max(after_fill):.3f}"
    )
    assert max(after_fill) - min(after_fill) <= 2 / POOL_BLOCKS  # boundary jitter
    assert max(after_fill) < 1.0


def test_plain_vllm_cannot_hold_one_such_stream():
    # Same weights shape, but a context long enough for vLLM to accept the length.
    long_context = make_tiny_model("llama", max_position_embeddings=8192)
    with pytest.raises(ValueError, match="(?i)kv cache|memory|blocks"):
        make_llm(
            long_context,
            block_size=32,
            num_gpu_blocks_override=POOL_BLOCKS // 2,  # the same 256 tokens
            max_model_len=STREAM_TOKENS + 64,
            enable_prefix_caching=False,
        )
