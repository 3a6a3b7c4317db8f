"""A stream that ends between two of its segments returns the blocks held for it.

When a segment ends capped, the engine core holds the stream's pinned and
window blocks for the next segment (``seams.Holds``). If the caller goes away
while that next segment is being added (a disconnect or a client timeout in the
server: the cancellation lands in ``AsyncLLM.add_request``), vLLM sends no abort
(it has no queue for the request yet) and the hold stays: the blocks leak. Found
by ``benchmarks/server_soak.py`` (KV usage 21% after the load ended, the pinned
gauge at 0); the front-end now drops the hold (``EngineCore.sink_release``). Here
the cancellation is made to land exactly there.

Two more orders, found when CI's soak leaked 8 blocks after the fix above: the
caller leaves while a segment still runs and vLLM's abort comes late (the
segment ends capped first, and vLLM then sends no abort), and an abort that
reaches the engine core just after its segment ended capped (vLLM had suffixed
the segment's id, so the id alone no longer named the stream).
"""

from __future__ import annotations

import asyncio

import pytest
from vllm import SamplingParams

SINK, WINDOW, MAX_LEN = 4, 20, 128


def async_engine(model: str):
    """A sink-mode AsyncLLM that rolls a stream over every MAX_LEN tokens."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model,
            dtype="float32",
            enforce_eager=True,
            block_size=16,
            max_model_len=MAX_LEN,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            additional_config={"attention_sink": {"sink": SINK, "window": WINDOW}},
        )
    )


def test_cancel_while_the_next_segment_is_added_frees_the_hold(tiny_llama, monkeypatch):
    from vllm.v1.engine.async_llm import AsyncLLM

    original_add = AsyncLLM.add_request
    calls = []

    async def add_request(self, request_id, *args, **kwargs):
        calls.append(request_id)
        if len(calls) == 2:  # the stream's second segment: the caller is gone
            raise asyncio.CancelledError
        return await original_add(self, request_id, *args, **kwargs)

    async def run() -> bool:
        engine = async_engine(tiny_llama)
        try:
            assert await engine.reset_prefix_cache()  # nothing held yet
            monkeypatch.setattr(AsyncLLM, "add_request", add_request)
            params = SamplingParams(max_tokens=3 * MAX_LEN, ignore_eos=True)
            with pytest.raises(asyncio.CancelledError):
                prompt = {"prompt_token_ids": list(range(40, 80))}
                async for _ in engine.generate(prompt, params, "leak"):
                    pass
            monkeypatch.setattr(AsyncLLM, "add_request", original_add)
            assert len(calls) == 2  # it did roll over, and was cancelled there
            await asyncio.sleep(1.0)
            # Fails while any block is still referenced (a leaked hold).
            return await engine.reset_prefix_cache()
        finally:
            engine.shutdown()

    assert asyncio.run(run())


def test_caller_leaving_mid_segment_frees_the_hold_after_the_abort(
    tiny_llama, monkeypatch
):
    """The caller closes the stream while its first segment still runs, and
    vLLM's abort is slow: the segment ends capped (the engine core holds its
    blocks) and vLLM then sends no abort at all. The front-end's release must
    come after the abort, not before the segment ended."""
    from vllm.v1.engine.async_llm import AsyncLLM

    wrapped_abort = AsyncLLM.abort

    async def late_abort(self, *args, **kwargs):
        await asyncio.sleep(2.0)  # the segment ends capped meanwhile
        return await wrapped_abort(self, *args, **kwargs)

    async def run() -> bool:
        engine = async_engine(tiny_llama)
        try:
            assert await engine.reset_prefix_cache()
            monkeypatch.setattr(AsyncLLM, "abort", late_abort)
            params = SamplingParams(max_tokens=3 * MAX_LEN, ignore_eos=True)
            prompt = {"prompt_token_ids": list(range(40, 80))}
            outputs = engine.generate(prompt, params, "late")
            first = await outputs.__anext__()
            assert not first.finished
            await outputs.aclose()  # the caller leaves mid-segment
            monkeypatch.undo()
            await asyncio.sleep(1.0)
            return await engine.reset_prefix_cache()
        finally:
            engine.shutdown()

    assert asyncio.run(run())


def test_an_abort_crossing_the_capped_end_frees_the_hold(tiny_llama):
    """An abort that reaches the engine core after its segment ended capped (in
    flight as the segment ended) finds the hold the segment made, although vLLM
    suffixed the segment's id."""
    from conftest import make_llm, shutdown

    from vllm_sink.seams import SeamMarker, holds_of

    llm = make_llm(tiny_llama, SINK, WINDOW, max_model_len=MAX_LEN)
    try:
        core = llm.llm_engine.engine_core.engine_core
        marker = SeamMarker(stream="s", first_block=1, cap_tokens=None, hold=True)
        params = SamplingParams(
            max_tokens=MAX_LEN - 40,
            ignore_eos=True,
            extra_args=marker.to_extra_args(None),
        )
        llm.generate([{"prompt_token_ids": list(range(40, 80))}], params)
        (segment_id,) = holds_of(core.scheduler).made_by.values()
        held_before = not llm.reset_prefix_cache()
        core.abort_requests([segment_id])
        freed = llm.reset_prefix_cache()
    finally:
        shutdown(llm)
    assert held_before and segment_id != "s"
    assert freed


def test_a_segment_of_an_ended_stream_is_dropped_and_a_lost_hold_recomputes(
    tiny_llama,
):
    """A segment whose add reaches the engine core after its stream ended (the
    front-end's abort and release overtook it) is dropped there, holding nothing;
    a segment that finds no hold for a stream that did not end recomputes its
    seed (not exact, alive) instead of stopping the engine core."""
    from conftest import make_llm, shutdown
    from vllm.v1.request import Request

    from vllm_sink.seams import SeamMarker, holds_of

    def params(stream: str, hold: bool) -> SamplingParams:
        marker = SeamMarker(
            stream=stream, first_block=3, cap_tokens=48, hold=hold, segment=2
        )
        return SamplingParams(
            max_tokens=8, ignore_eos=True, extra_args=marker.to_extra_args(None)
        )

    llm = make_llm(tiny_llama, SINK, WINDOW, max_model_len=MAX_LEN)
    prompt = list(range(40, 100))
    try:
        core = llm.llm_engine.engine_core.engine_core
        core.sink_release("gone")  # the front-end ended stream "gone"
        orphan = Request(
            "gone~sink2-0a1b2c3d",
            prompt,
            params("gone", hold=True),
            None,
            block_hasher=core.request_block_hasher,
        )
        core.scheduler.add_request(orphan)
        dropped = orphan.is_finished() and not core.scheduler.requests
        (out,) = llm.generate([{"prompt_token_ids": prompt}], params("lost", False))
        freed = llm.reset_prefix_cache()
        held = dict(holds_of(core.scheduler).held)
    finally:
        shutdown(llm)
    assert dropped
    assert len(out.outputs[0].token_ids) == 8  # ran, from a recomputed seed
    assert freed and not held
