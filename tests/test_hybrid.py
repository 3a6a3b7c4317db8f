"""Hybrid local/global models (Gemma 3 style, issue 21) across seams and turns.

The tiny Gemma 3 (tests/families.py): two local layers of a native 16-token window
(their own rotary table) per global layer. In sink mode the global layers get the
flags' S=4, W=20, the local ones keep their window with no sinks; each layer kind is
its own KV-cache group and frees blocks by its own rule. Oracle equality past the
model's context is in test_families; here: the groups, seams and conversations.
"""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown
from families import family_model
from test_seams import SHORT, assert_same_chat, chat, metric, stream_run
from vllm import SamplingParams
from vllm.utils.math_utils import cdiv

SINK, WINDOW, LOCAL, BLOCK = 4, 20, 16, 16


@pytest.fixture(scope="module")
def gemma3() -> str:
    return family_model("gemma3")


@pytest.fixture(scope="module")
def unbroken(gemma3) -> dict:
    llm = make_llm(gemma3, SINK, WINDOW, max_model_len=4096)
    try:
        return stream_run(llm)
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def chat_without_reuse(gemma3):
    llm = make_llm(
        gemma3, SINK, WINDOW, max_model_len=SHORT, enable_prefix_caching=False
    )
    try:
        return chat(llm, 8)
    finally:
        shutdown(llm)


def live_blocks(core, rule: dict) -> list[tuple[int, int]]:
    """Per KV-cache group of the one running request: (live blocks, bound), the
    bound ceil(S/bs) + ceil(W/bs) + 2 by the group's own (S, W)."""
    (request_id,) = core.scheduler.requests
    groups = core.scheduler.kv_cache_config.kv_cache_groups
    blocks = core.scheduler.kv_cache_manager.get_blocks(request_id).blocks
    out = []
    for group, row in zip(groups, blocks):
        spec = group.kv_cache_spec
        assert (spec.sink, spec.sliding_window) == rule[group.layer_names[0]]
        bound = cdiv(spec.sink, BLOCK) + cdiv(spec.sliding_window, BLOCK) + 2
        out.append((sum(not b.is_null for b in row), bound))
    return out


def decode_live_blocks(llm) -> list[list[tuple[int, int]]]:
    core = llm.llm_engine.engine_core.engine_core
    rule = {f"model.layers.{i}.self_attn.attn": (0, LOCAL) for i in (0, 1)}
    rule["model.layers.2.self_attn.attn"] = (SINK, WINDOW)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    llm.llm_engine.add_request("r", {"prompt_token_ids": list(range(3, 103))}, params)
    seen = []
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        running = list(core.scheduler.requests.values())
        if running and running[0].num_computed_tokens > 100:  # decoding
            seen.append(live_blocks(core, rule))
    return seen


def test_groups_seams_and_turns(gemma3, unbroken, chat_without_reuse):
    llm = make_llm(gemma3, SINK, WINDOW, max_model_len=SHORT, disable_log_stats=False)
    try:
        steps = decode_live_blocks(llm)
        seams = stream_run(llm)
        rollovers = metric(llm, "vllm:sink_rollovers")
        continued = metric(llm, "vllm:sink_stream_continuations")
        reused = chat(llm, 8)
        continued = metric(llm, "vllm:sink_stream_continuations") - continued
    finally:
        shutdown(llm)
    assert len(steps) >= 20
    for groups in steps:
        assert all(live <= bound for live, bound in groups), groups
    local, _, global_ = zip(*(((a[0], b[0], c[0])) for a, b, c in steps))
    assert max(local) < max(global_)  # the local window frees sooner
    assert rollovers >= 8
    assert seams["tokens"] == unbroken["tokens"]
    assert seams["after_prompt"] == unbroken["after_prompt"]
    diff = max(abs(a - b) for a, b in zip(seams["prompt_lp"], unbroken["prompt_lp"]))
    assert diff < 1e-5, diff
    assert max(abs(a - b) for a, b in zip(seams["lp"], unbroken["lp"])) < 1e-5
    assert_same_chat(reused, chat_without_reuse)
    assert continued >= 4
