"""Streams that continue: exact seams, sink-aware prefix caching, conversations.

A stream served as several engine requests (rollover at max_model_len) must
equal the same stream served as one; a conversation that re-sends its history
must give what it gives without any reuse, whether the history's blocks are
cached, evicted or preempted. fp32 tiny Llama, S=4, W=20, blocks of 16.
"""

from __future__ import annotations

import random

import pytest
from conftest import make_llm, shutdown
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

SINK, WINDOW = 4, 20
SHORT = 128  # max_model_len that forces seams
ASCII = list(range(32, 127))
PROMPT = [(i * 7) % 250 + 3 for i in range(300)]


def metric(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def prompt_logprobs(out) -> list[float]:
    ids = out.prompt_token_ids
    return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]


def sample_logprobs(out) -> list[float]:
    c = out.outputs[0]
    return [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]


def stream_run(llm) -> dict:
    scored = SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=0
    )
    (a,) = llm.generate([{"prompt_token_ids": PROMPT}], scored)
    long = SamplingParams(
        max_tokens=600,
        temperature=0,
        ignore_eos=True,
        logprobs=0,
        allowed_token_ids=ASCII,
    )
    (b,) = llm.generate([{"prompt_token_ids": list(range(40, 80))}], long)
    return {
        "prompt_lp": prompt_logprobs(a),
        "after_prompt": a.outputs[0].token_ids,
        "tokens": b.outputs[0].token_ids,
        "lp": sample_logprobs(b),
    }


@pytest.fixture(scope="module")
def unbroken(tiny_llama) -> dict:
    llm = make_llm(tiny_llama, SINK, WINDOW, max_model_len=4096)
    try:
        return stream_run(llm)
    finally:
        shutdown(llm)


@pytest.mark.parametrize("max_num_batched_tokens", [64, 40])
def test_seams_equal_one_unbroken_request(tiny_llama, unbroken, max_num_batched_tokens):
    llm = make_llm(
        tiny_llama,
        SINK,
        WINDOW,
        max_model_len=SHORT,
        max_num_batched_tokens=max_num_batched_tokens,
        disable_log_stats=False,
    )
    try:
        seams = stream_run(llm)
        rollovers = metric(llm, "vllm:sink_rollovers")
        hits = metric(llm, "vllm:prefix_cache_hits")
    finally:
        shutdown(llm)
    assert rollovers >= 8  # 300-token prompt and 600 tokens out, in 128-token requests
    assert hits > 0  # seeds came from the cache, not recomputed
    assert len(seams["prompt_lp"]) == len(unbroken["prompt_lp"]) == len(PROMPT) - 1
    diff = max(abs(a - b) for a, b in zip(seams["prompt_lp"], unbroken["prompt_lp"]))
    assert diff < 1e-5, diff
    assert seams["after_prompt"] == unbroken["after_prompt"]
    assert seams["tokens"] == unbroken["tokens"]
    assert max(abs(a - b) for a, b in zip(seams["lp"], unbroken["lp"])) < 1e-5


def chat(
    llm, turns: int, *, reset_before: int | None = None, new: int = 40, out: int = 24
):
    """A conversation that re-sends its whole history every turn (token ids)."""
    rng = random.Random(0)
    history: list[int] = []
    results = []
    params = SamplingParams(
        max_tokens=out,
        temperature=0,
        ignore_eos=True,
        logprobs=0,
        allowed_token_ids=ASCII,
    )
    for turn in range(turns):
        if turn == reset_before:
            llm.reset_prefix_cache()
        # The "template" re-renders the last 3 tokens of the previous answer.
        if history:
            history = history[:-3] + [rng.randrange(3, 250) for _ in range(3)]
        history += [rng.randrange(3, 250) for _ in range(new)]
        (o,) = llm.generate(
            [{"prompt_token_ids": list(history)}], params, use_tqdm=False
        )
        results.append((list(o.outputs[0].token_ids), sample_logprobs(o)))
        history += list(o.outputs[0].token_ids)
    return results


def assert_same_chat(a, b) -> None:
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


@pytest.fixture(scope="module")
def chat_without_reuse(tiny_llama):
    llm = make_llm(
        tiny_llama, SINK, WINDOW, max_model_len=SHORT, enable_prefix_caching=False
    )
    try:
        return chat(llm, 8)
    finally:
        shutdown(llm)


def test_conversation_past_max_model_len_continues_cached_stream(
    tiny_llama, chat_without_reuse
):
    llm = make_llm(
        tiny_llama, SINK, WINDOW, max_model_len=SHORT, disable_log_stats=False
    )
    counters = ("vllm:sink_stream_continuations", "vllm:sink_stream_restreams")
    try:
        before = [metric(llm, name) for name in counters]
        reused = chat(llm, 8)
        continued, restreamed = (metric(llm, n) - b for n, b in zip(counters, before))
        hits = metric(llm, "vllm:prefix_cache_hits")
        fallback = chat(llm, 8, reset_before=5)  # blocks gone: re-stream, still exact
        restreamed_after = metric(llm, counters[1]) - before[1]
    finally:
        shutdown(llm)
    assert_same_chat(reused, chat_without_reuse)
    assert continued >= 4 and restreamed == 0 and hits > 0
    assert_same_chat(fallback, chat_without_reuse)
    assert restreamed_after >= 1


def test_a_turn_refused_after_its_lookup_holds_nothing(tiny_llama):
    """The blocks a continuation holds are dropped when vLLM refuses the turn."""
    llm = make_llm(
        tiny_llama, SINK, WINDOW, max_model_len=SHORT, disable_log_stats=False
    )
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        (first,) = llm.generate([{"prompt_token_ids": PROMPT}], params)
        history = PROMPT + list(first.outputs[0].token_ids)
        before = metric(llm, "vllm:sink_stream_continuations")
        with pytest.raises(VLLMValidationError, match="out of vocabulary"):
            llm.generate([{"prompt_token_ids": history + [10**6]}], params)
        continued = metric(llm, "vllm:sink_stream_continuations") - before
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)  # a step after it
        usage = metric(llm, "vllm:kv_cache_usage_perc")
    finally:
        shutdown(llm)
    assert continued == 1  # the refused turn had found and held the stream
    assert usage == 0


def test_conversation_within_context_reuses_window_blocks(tiny_llama):
    """Below max_model_len vLLM's own prefix caching serves sinks + window."""
    results = {}
    for caching in (False, True):
        llm = make_llm(
            tiny_llama,
            SINK,
            WINDOW,
            max_model_len=4096,
            enable_prefix_caching=caching,
            disable_log_stats=False,
        )
        try:
            results[caching] = chat(llm, 6)
            hits = metric(llm, "vllm:prefix_cache_hits")
        finally:
            shutdown(llm)
        assert (hits > 0) == caching
    assert_same_chat(results[True], results[False])


def test_preempted_streams_resume_exactly(tiny_llama):
    """A pool too small for every stream forces preemption; outputs do not change."""
    params = SamplingParams(
        max_tokens=300,
        temperature=0,
        ignore_eos=True,
        logprobs=0,
        allowed_token_ids=ASCII,
    )
    prompts = [
        {"prompt_token_ids": [(i * 13 + k) % 250 + 3 for i in range(90)]}
        for k in range(6)
    ]
    outs = {}
    for blocks in (None, 24):
        llm = make_llm(
            tiny_llama,
            SINK,
            WINDOW,
            max_model_len=SHORT,
            num_gpu_blocks_override=blocks,
            disable_log_stats=False,
        )
        try:
            outs[blocks] = llm.generate(prompts, params, use_tqdm=False)
            preemptions = metric(llm, "vllm:num_preemptions")
            usage = metric(llm, "vllm:kv_cache_usage_perc")
        finally:
            shutdown(llm)
        if blocks:
            assert preemptions > 0
        assert usage == 0  # nothing held once every stream ended
    for small, large in zip(outs[24], outs[None]):
        assert small.outputs[0].token_ids == large.outputs[0].token_ids
        assert (
            max(
                abs(a - b)
                for a, b in zip(sample_logprobs(small), sample_logprobs(large))
            )
            < 1e-5
        )
