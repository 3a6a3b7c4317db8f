"""A stream that ends between two of its segments returns the blocks held for it.

When a segment ends capped, the engine core holds the stream's pinned and
window blocks for the next segment (``seams.Holds``). If the caller goes away
while that next segment is being added (a disconnect or a client timeout in the
server: the cancellation lands in ``AsyncLLM.add_request``), vLLM sends no abort
(it has no queue for the request yet) and the hold stays: the blocks leak. Found
by ``benchmarks/server_soak.py`` (KV usage 21% after the load ended, the pinned
gauge at 0); the front-end now drops the hold (``EngineCore.sink_release``). Here
the cancellation is made to land exactly there.
"""

from __future__ import annotations

import asyncio

import pytest
from vllm import SamplingParams

SINK, WINDOW, MAX_LEN = 4, 20, 128


def test_cancel_while_the_next_segment_is_added_frees_the_hold(tiny_llama, monkeypatch):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    original_add = AsyncLLM.add_request
    calls = []

    async def add_request(self, request_id, *args, **kwargs):
        calls.append(request_id)
        if len(calls) == 2:  # the stream's second segment: the caller is gone
            raise asyncio.CancelledError
        return await original_add(self, request_id, *args, **kwargs)

    async def run() -> bool:
        engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=tiny_llama,
                dtype="float32",
                enforce_eager=True,
                block_size=16,
                max_model_len=MAX_LEN,
                max_num_seqs=4,
                max_num_batched_tokens=64,
                additional_config={"attention_sink": {"sink": SINK, "window": WINDOW}},
            )
        )
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
