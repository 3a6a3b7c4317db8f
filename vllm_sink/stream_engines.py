"""Streams in vLLM's engines: ``LLMEngine`` (offline ``LLM``) and ``AsyncLLM``.

Each front-end keeps a ``StreamTable``; a request that needs rollover (see
``streams.plan_stream``) is added as its first segment, each finished segment
that must roll over is followed by the next, outputs are mapped back to the
user's request, and an abort reaches the segment now running. A prompt that
extends a stream the engine core caches starts from its blocks
(``EngineCore.sink_lookup``, see ``seams``); a stream that ends before its last
segment drops what the engine core holds for it (``EngineCore.sink_release``).
"""

from __future__ import annotations

from typing import Any

from vllm_sink import metrics
from vllm_sink.seams import SeamMarker
from vllm_sink.streams import Segment, Stream, StreamTable, plan_stream, wants_lookup


def continue_cached(stream: Stream, found: tuple[int, int]) -> None:
    stream.continue_from(*found)
    metrics.count_continuation(stream.continued)


def _table(engine: Any) -> StreamTable:
    table = engine.__dict__.get("_sink_streams")
    if table is None:
        table = engine.__dict__["_sink_streams"] = StreamTable()
    return table


def _engine_stream(
    engine: Any, request_id: str, prompt: Any, params: Any
) -> Stream | None:
    from vllm_sink.config import get_sink_config

    vllm_config = getattr(engine, "vllm_config", None)
    cfg = get_sink_config(vllm_config)
    if cfg is None:
        return None
    cache_config = vllm_config.cache_config
    stream = plan_stream(
        request_id,
        prompt,
        params,
        cfg,
        vllm_config.model_config.max_model_len,
        _tokenizer(engine),
        cache_config.block_size,
    )
    if stream is not None:
        stream.reuse = bool(cache_config.enable_prefix_caching)
    return stream


def _utility(engine: Any, name: str, *args: Any) -> Any:
    """Call an engine-core utility (offline engine: in-process or not)."""
    client = engine.engine_core
    if hasattr(client, "call_utility"):
        return client.call_utility(name, *args)
    return getattr(client.engine_core, name)(*args)


def _lookup(engine: Any, stream: Stream) -> None:
    """Start from a held seed when the prompt continues a cached stream."""
    if wants_lookup(stream):
        found = _utility(engine, "sink_lookup", stream.request_id, stream.prompt_ids)
        continue_cached(stream, tuple(found))


def _release(engine: Any, stream: Stream) -> None:
    """Drop the blocks the engine core may hold for a stream that ends."""
    if stream.may_be_held:
        _utility(engine, "sink_release", stream.request_id)


async def _end_async(engine: Any, stream: Stream, outputs: Any) -> None:
    """Stop what still runs of a stream that ends, then drop its holds. In that
    order: a segment still running when the release lands could end capped after
    it and hold again (the caller left while an output was handed over: vLLM's
    abort then waits until the segment's generator is collected)."""
    if not stream.may_be_held:
        return
    if outputs is not None:
        await outputs.aclose()  # vLLM aborts the segment it still serves
    if not stream.done and stream.current is not None:
        # one cancelled while being added has no queue, so vLLM sends no abort
        await engine.abort(stream.current.engine_id)
    await engine.engine_core.call_utility_async("sink_release", stream.request_id)


def _tokenizer(engine: Any) -> Any:
    """The engine's tokenizer; None when it runs without one (token ids only)."""
    if engine.vllm_config.model_config.skip_tokenizer_init:
        return None
    return engine.get_tokenizer()


def install() -> None:
    """Rollover in the offline engine (LLM) and the async engine (server)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    from vllm_sink.patching import wrap_method

    diff = "0006-streams-past-max-model-len.diff"

    from vllm.v1.engine.detokenizer import (
        BaseIncrementalDetokenizer,
        IncrementalDetokenizer,
    )

    @wrap_method(
        IncrementalDetokenizer,
        "from_new_request",
        reason="stop strings spanning a seam",
        diff="0009-stop-strings-across-seams.diff",
        kind="classmethod",
    )
    def from_new_request(original, tokenizer, request):
        detokenizer = original(tokenizer, request)
        marker = SeamMarker.of(request)
        carry = marker.carry_text if marker is not None else ""
        if carry and isinstance(detokenizer, BaseIncrementalDetokenizer):
            detokenizer.output_text = carry  # never in a delta (offset past it)
            detokenizer._last_output_text_offset = len(carry)
        return detokenizer

    @wrap_method(
        LLMEngine, "add_request", reason="streams past max_model_len", diff=diff
    )
    def add_request(original, self, request_id, prompt, params, *args, **kwargs):
        stream = _engine_stream(self, request_id, prompt, params)
        if stream is None:
            return original(self, request_id, prompt, params, *args, **kwargs)
        _lookup(self, stream)
        kwargs.pop("prompt_text", None)  # the text of the first segment's prompt only
        stream.engine_options = (args, kwargs)  # lora, priority, ... each segment
        original_add(self, _table(self).start(stream), stream)
        return request_id

    @wrap_method(LLMEngine, "step", reason="streams past max_model_len", diff=diff)
    def step(original, self):
        outputs = original(self)
        table = self.__dict__.get("_sink_streams")
        if table is None or not table.by_engine:
            return outputs
        result = []
        for out in outputs:
            stream = table.by_engine.get(out.request_id)
            if stream is None:
                result.append(out)
                continue
            user, roll = stream.accept(out)
            if roll:
                metrics.count_rollover()
                original_add(self, table.advance(stream), stream)
            elif stream.done:
                table.finish(stream)
                _release(self, stream)
            if user is not None:
                result.append(user)
        return result

    original_add_request = LLMEngine.add_request.__wrapped__

    def original_add(engine, segment: Segment, stream: Stream) -> None:
        """Add a segment; a refused one ends its stream and drops its holds."""
        args, kwargs = stream.engine_options
        try:
            original_add_request(
                engine,
                segment.engine_id,
                stream.engine_input(segment),
                segment.params,
                *args,
                **kwargs,
            )
        except BaseException:
            _table(engine).finish(stream)
            _release(engine, stream)
            raise

    @wrap_method(
        LLMEngine, "abort_request", reason="streams past max_model_len", diff=diff
    )
    def abort_request(original, self, request_ids, *args, **kwargs):
        table = self.__dict__.get("_sink_streams")
        if table is not None:
            ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
            request_ids = table.engine_ids(ids, forget=True)
        return original(self, request_ids, *args, **kwargs)

    @wrap_method(AsyncLLM, "generate", reason="streams past max_model_len", diff=diff)
    def generate(original, self, prompt, sampling_params, request_id, *args, **kwargs):
        stream = _engine_stream(self, request_id, prompt, sampling_params)
        if stream is None:
            return original(self, prompt, sampling_params, request_id, *args, **kwargs)
        kwargs.pop("prompt_text", None)
        return _generate_stream(original, self, stream, args, kwargs)

    async def _generate_stream(original, engine, stream: Stream, args, kwargs):
        table, outputs = _table(engine), None
        try:
            if wants_lookup(stream):
                found = await engine.engine_core.call_utility_async(
                    "sink_lookup", stream.request_id, stream.prompt_ids
                )
                continue_cached(stream, tuple(found))
            segment = table.start(stream)
            while True:
                roll = False
                outputs = original(
                    engine,
                    stream.engine_input(segment),
                    segment.params,
                    segment.engine_id,
                    *args,
                    **kwargs,
                )
                async for out in outputs:
                    user, roll = stream.accept(out)
                    if user is not None:
                        yield user
                if not roll:
                    return
                metrics.count_rollover()
                segment = table.advance(stream)
        finally:
            table.finish(stream)
            await _end_async(engine, stream, outputs)

    @wrap_method(AsyncLLM, "abort", reason="streams past max_model_len", diff=diff)
    async def abort(original, self, request_id, *args, **kwargs):
        table = self.__dict__.get("_sink_streams")
        if table is not None:
            ids = [request_id] if isinstance(request_id, str) else list(request_id)
            request_id = table.engine_ids(ids)
        return await original(self, request_id, *args, **kwargs)
