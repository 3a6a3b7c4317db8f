"""The stream state machine (``vllm_sink.streams``), driven without an engine.

A scripted "engine" answers each segment: its token for stream position ``i``
is ``token_at(i)``, so every seed, offset and merged output can be checked
against the one stream the segments must add up to.
"""

from __future__ import annotations

import pytest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_sink.config import SinkConfig
from vllm_sink.seams import MARKER_KEY, SeamMarker, stream_key
from vllm_sink.streams import Stream, StreamTable, plan_stream

BS = 16
CFG = SinkConfig(sink=4, window=20)
MAX_LEN = 128


def token_at(position: int) -> int:
    return position % 97 + 3


def stream_of(prompt: list[int], length: int) -> list[int]:
    """The unbroken stream: the prompt, then the scripted engine's tokens."""
    return prompt + [token_at(i) for i in range(len(prompt), length)]


def run(stream: Stream, table: StreamTable, chunk: int | None = None):
    """Serve ``stream`` to the end; every segment and user output, in order.

    The engine emits each segment's tokens in outputs of ``chunk`` tokens (one
    final output when None) and stops at the segment's max_tokens.
    """
    segments, outputs = [], []
    segment = table.start(stream)
    while True:
        segments.append(segment)
        start = segment.offset + len(segment.prompt_ids) - segment.num_seed
        n = segment.params.max_tokens
        new = [token_at(start + i) for i in range(n)]
        ends = list(range(chunk, n, chunk)) if chunk else []
        roll = False
        for begin, end in zip([0, *ends], [*ends, n]):
            out = engine_output(segment, new, begin, end)
            user, roll = stream.accept(out)
            if user is not None:
                outputs.append(user)
        if not roll:
            return segments, outputs
        segment = table.advance(stream)


def engine_output(segment, new: list[int], begin: int, end: int) -> RequestOutput:
    delta = segment.params.output_kind == RequestOutputKind.DELTA
    ids = new[begin:end] if delta else new[:end]
    done = end == len(new)
    completion = CompletionOutput(
        index=0,
        text="".join(chr(65 + t % 26) for t in ids),
        token_ids=ids,
        cumulative_logprob=-0.5 * len(ids),
        logprobs=None,
        finish_reason="length" if done else None,
    )
    return RequestOutput(
        segment.engine_id, None, segment.prompt_ids, None, [completion], done
    )


def marker_of(segment) -> SeamMarker:
    return SeamMarker(**segment.params.extra_args[MARKER_KEY])


def plan(prompt: list[int], **params) -> Stream:
    stream = plan_stream(
        "user-1",
        {"prompt_token_ids": prompt},
        SamplingParams(**{"temperature": 0.0, **params}),
        CFG,
        MAX_LEN,
        block_size=BS,
    )
    assert stream is not None
    return stream


def test_generation_rolls_over_into_segments_seeded_from_the_stream():
    prompt = list(range(3, 13))
    stream = plan(prompt, max_tokens=400)
    segments, outputs = run(stream, StreamTable())

    whole = stream_of(prompt, len(prompt) + 400)
    assert len(segments) >= 4
    assert [s.engine_id for s in segments][:2] == ["user-1", "user-1~sink1"]
    assert {stream_key(s.engine_id) for s in segments} == {"user-1"}
    for seg in segments:
        assert len(seg.prompt_ids) + seg.params.max_tokens <= MAX_LEN
        marker = marker_of(seg)
        if seg.num_seed == 0:
            assert seg.prompt_ids == prompt and marker.cap_tokens is None
            continue
        k0, kept = marker.first_block, (seg.offset - 1) // BS
        seed = whole[:BS] + whole[k0 * BS : seg.offset]
        assert seg.prompt_ids == seed and seg.num_seed == len(seed)
        # Cached: the pinned block and [k0, kept); the last token's block is
        # recomputed, and its first token's whole window is in the seed.
        assert marker.cap_tokens == (1 + kept - k0) * BS
        assert k0 * BS <= max(BS, kept * BS - CFG.window + 1)
    final = outputs[-1]
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert list(final.outputs[0].token_ids) == whole[len(prompt) :]
    assert final.request_id == "user-1" and final.prompt_token_ids == prompt
    for early in outputs[:-1]:
        assert not early.finished and early.outputs[0].finish_reason is None


def test_deltas_across_seams_add_up_to_the_stream():
    prompt = list(range(3, 13))
    stream = plan(prompt, max_tokens=300, output_kind=RequestOutputKind.DELTA)
    segments, outputs = run(stream, StreamTable(), chunk=7)

    whole = stream_of(prompt, len(prompt) + 300)
    tokens = [t for out in outputs for t in out.outputs[0].token_ids]
    assert len(segments) >= 3
    assert tokens == whole[len(prompt) :]
    assert "".join(o.outputs[0].text for o in outputs) == "".join(
        chr(65 + t % 26) for t in tokens
    )
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished


def test_long_prompt_streams_through_prefill_only_segments():
    prompt = [token_at(i) for i in range(300)]
    stream = plan(prompt, max_tokens=5)
    segments, outputs = run(stream, StreamTable())

    feeding, last = segments[:-1], segments[-1]
    assert feeding and all(s.prefill_only for s in feeding)
    for seg in feeding:  # one token sampled and dropped, only the final output
        assert seg.params.max_tokens == 1
        assert seg.params.output_kind == RequestOutputKind.FINAL_ONLY
        assert marker_of(seg).hold
    assert not last.prefill_only
    fed = [t for s in segments for t in s.prompt_ids[s.num_seed :]]
    assert fed == prompt  # every prompt token fed once, in order
    assert len(outputs) == 1
    assert list(outputs[0].outputs[0].token_ids) == stream_of(prompt, 305)[300:]
    assert outputs[0].prompt_token_ids == prompt


def test_continuing_a_cached_stream_starts_after_its_hit():
    prompt = [token_at(i) for i in range(200)]
    stream = plan(prompt, max_tokens=5)
    stream.continue_from(first_block=9, hit_blocks=11)
    segment = StreamTable().start(stream)

    assert stream.continued
    assert segment.prompt_ids[: segment.num_seed] == prompt[:BS] + prompt[9 * BS : 176]
    assert segment.prompt_ids[segment.num_seed :] == prompt[176:]
    assert segment.offset == 176 and not segment.prefill_only
    assert marker_of(segment).first_block == 9


def test_no_continuation_without_a_hit():
    prompt = [token_at(i) for i in range(200)]
    stream = plan(prompt, max_tokens=5)
    stream.continue_from(first_block=1, hit_blocks=0)
    segment = StreamTable().start(stream)
    assert not stream.continued and segment.num_seed == 0
    assert segment.prompt_ids == prompt[: MAX_LEN - 1] and segment.prefill_only


def test_sink_token_is_fed_but_never_shown():
    cfg = SinkConfig(sink=4, window=20, sink_token_id=2)
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0)
    stream = plan_stream("u", {"prompt_token_ids": [5, 6, 7]}, params, cfg, MAX_LEN)
    assert stream.prompt_ids == [2, 5, 6, 7] and stream.hidden == 1
    _, outputs = run(stream, StreamTable())
    assert outputs[-1].prompt_token_ids == [5, 6, 7]


def test_requests_that_fit_are_left_to_vllm():
    assert (
        plan_stream(
            "u",
            {"prompt_token_ids": [1] * 10},
            SamplingParams(max_tokens=20),
            CFG,
            MAX_LEN,
        )
        is None
    )
    assert (
        plan_stream(
            "u",
            {"prompt_token_ids": [1] * 10},
            SamplingParams(max_tokens=20),
            None,
            MAX_LEN,
        )
        is None
    )


def test_n_above_one_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="n=1"):
        plan([1] * 10, max_tokens=500, n=2, temperature=1.0)


def test_abort_reaches_the_segment_now_running():
    table = StreamTable()
    stream = plan(list(range(3, 13)), max_tokens=200)
    first = table.start(stream)
    assert table.engine_ids(["user-1", "other"]) == [first.engine_id, "other"]
    second = table.advance(stream)
    assert table.by_engine == {second.engine_id: stream}
    assert table.engine_ids(["user-1"], forget=True) == [second.engine_id]
    assert not table.by_user and not table.by_engine


def test_abort_during_a_prefill_only_segment_ends_the_stream():
    stream = plan([token_at(i) for i in range(300)], max_tokens=5)
    segment = StreamTable().start(stream)
    assert segment.prefill_only
    aborted = CompletionOutput(0, "", [], None, None, finish_reason="abort")
    out = RequestOutput(segment.engine_id, None, [], None, [aborted], True)
    user, roll = stream.accept(out)
    assert not roll and stream.done
    assert user.finished and user.outputs[0].finish_reason == "abort"
    assert user.request_id == "user-1"


def test_no_room_for_a_seed_is_refused_before_anything_runs():
    params = SamplingParams(max_tokens=500)
    prompt = {"prompt_token_ids": [1] * 10}
    wide = SinkConfig(sink=4, window=240)
    with pytest.raises(ValueError, match="--max-model-len 576 or more"):
        plan_stream("u", prompt, params, wide, 256, block_size=16)
    fits = SamplingParams(max_tokens=100)
    assert plan_stream("u", prompt, fits, wide, 256, block_size=16) is None


def letters(ids: list[int]) -> str:
    return "".join(chr(65 + t % 26) for t in ids)


@pytest.mark.parametrize(
    "kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA]
)
def test_stop_string_spanning_a_seam_ends_the_stream(kind):
    """The next segment gets the stream's last characters to check stop strings
    over (vLLM's detokenizer starts from them); the user never sees what the
    stop string cuts."""
    prompt = list(range(3, 13))
    stream = plan(prompt, max_tokens=400, stop=["@@#", "x"], output_kind=kind)
    table = StreamTable()
    first = table.start(stream)
    n = first.params.max_tokens
    ids = [token_at(len(prompt) + i) for i in range(n)]
    text = letters(ids[:-2]) + "@@"  # the stop string's first two characters
    done = CompletionOutput(0, text, ids, -1.0, None, finish_reason="length")
    user, roll = stream.accept(
        RequestOutput(first.engine_id, None, [], None, [done], True)
    )
    assert roll and not user.finished
    shown = user.outputs[0].text
    assert shown == text[:-2]  # held back: a stop string may still claim them

    second = table.advance(stream)
    assert marker_of(second).carry_text == "@@"
    # vLLM's check over "@@" + "#": the stop starts in the carry, the text is
    # cut there, the token that completed it is kept.
    stop = CompletionOutput(0, "", [7], -0.5, None, finish_reason="stop")
    stop.stop_reason = "@@#"
    final, roll = stream.accept(
        RequestOutput(second.engine_id, None, [], None, [stop], True)
    )
    assert not roll and stream.done and final.finished
    completion = final.outputs[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "@@#")
    if kind == RequestOutputKind.DELTA:
        assert completion.text == "" and list(completion.token_ids) == [7]
    else:
        assert completion.text == text[:-2]
        assert list(completion.token_ids) == ids + [7]


def test_without_stop_strings_nothing_is_held_back():
    stream = plan(list(range(3, 13)), max_tokens=400)
    first = StreamTable().start(stream)
    ids = [5] * first.params.max_tokens
    done = CompletionOutput(0, letters(ids), ids, None, None, finish_reason="length")
    user, roll = stream.accept(
        RequestOutput(first.engine_id, None, [], None, [done], True)
    )
    assert roll and user.outputs[0].text == letters(ids)
    assert stream.next_segment().params.extra_args[MARKER_KEY]["carry_text"] == ""
