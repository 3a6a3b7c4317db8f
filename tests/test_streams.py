"""Offline LLM.generate past max_model_len: rollover and long prompts."""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown
from reference import Job, references
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

MAX_LEN = 128
SINK, WINDOW = 4, 20
ASCII = list(range(32, 127))
LONG_PROMPT = tuple((i * 7) % 250 + 3 for i in range(300))


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = make_llm(tiny_llama, SINK, WINDOW, max_model_len=MAX_LEN)
    yield engine
    shutdown(engine)


def test_generation_far_past_max_model_len_is_one_stream(llm):
    params = SamplingParams(
        max_tokens=6 * MAX_LEN,
        temperature=0,
        ignore_eos=True,
        logprobs=0,
        allowed_token_ids=ASCII,
    )
    (out,) = llm.generate([{"prompt_token_ids": list(range(40, 80))}], params)
    completion = out.outputs[0]
    assert len(completion.token_ids) == 6 * MAX_LEN
    assert completion.finish_reason == "length"
    assert len(completion.logprobs) == 6 * MAX_LEN
    assert out.prompt_token_ids == list(range(40, 80))
    tokenizer = llm.get_tokenizer()
    assert completion.text == tokenizer.decode(completion.token_ids)


def test_prompt_longer_than_max_model_len_streams_through(llm, tiny_llama):
    params = SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=0
    )
    (out,) = llm.generate([{"prompt_token_ids": list(LONG_PROMPT)}], params)
    assert len(out.outputs[0].token_ids) == 20
    lps = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], LONG_PROMPT[1:])]
    assert len(lps) == len(LONG_PROMPT) - 1
    # The first segment is an exact stream: equal to the oracle there.
    (ref,) = references([Job(tiny_llama, SINK, WINDOW, LONG_PROMPT, 1)])
    first = MAX_LEN - 2
    assert max(abs(a - b) for a, b in zip(lps[:first], ref.prompt_logprobs)) < 1e-4


def test_seeded_sampling_is_reproducible_across_rollovers(llm):
    params = SamplingParams(
        max_tokens=3 * MAX_LEN, temperature=1.0, seed=7, ignore_eos=True
    )
    prompt = [{"prompt_token_ids": list(range(3, 30))}]
    first = llm.generate(prompt, params)[0].outputs[0].token_ids
    second = llm.generate(prompt, params)[0].outputs[0].token_ids
    assert first == second and len(first) == 3 * MAX_LEN


def test_abort_stops_a_rolled_over_stream(llm):
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=10 * MAX_LEN, temperature=0, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": list(range(3, 20))}, params)
    steps = 0
    while steps < 3 * MAX_LEN:  # past at least two rollovers
        engine.step()
        steps += 1
    engine.abort_request(["long"])
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.has_unfinished_requests()
    assert not engine.__dict__["_sink_streams"].by_user


def run_engine(
    llm, request_id: str, prompt: list[int], params
) -> tuple[str, list, str]:
    """Drive LLMEngine step by step: (all text, all token ids, last output)."""
    engine = llm.llm_engine
    engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    text, tokens, last = "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            completion = out.outputs[0]
            if params.output_kind == RequestOutputKind.DELTA:
                text += completion.text
                tokens += completion.token_ids
            else:
                text, tokens = completion.text, list(completion.token_ids)
            last = completion
    return text, tokens, last


@pytest.mark.parametrize("kind", ["final", "delta"])
def test_stop_string_spanning_a_seam_is_detected(llm, kind):
    prompt = list(range(40, 80))
    free = SamplingParams(
        max_tokens=300, temperature=0, ignore_eos=True, allowed_token_ids=ASCII
    )
    (plain,) = llm.generate([{"prompt_token_ids": prompt}], free, use_tqdm=False)
    text, tokens = plain.outputs[0].text, list(plain.outputs[0].token_ids)
    seam = MAX_LEN - len(prompt)  # the first segment's last token
    stop = text[seam - 3 : seam + 1]
    assert text.find(stop) == seam - 3  # its first occurrence spans the seam
    params = SamplingParams(
        max_tokens=300,
        temperature=0,
        ignore_eos=True,
        allowed_token_ids=ASCII,
        stop=[stop],
        output_kind=RequestOutputKind.DELTA
        if kind == "delta"
        else RequestOutputKind.FINAL_ONLY,
    )
    got_text, got_tokens, last = run_engine(llm, f"stop-{kind}", prompt, params)
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)
    assert got_text == text[: seam - 3]
    assert got_tokens == tokens[: seam + 1]


def test_plain_engine_beside_a_sink_engine_keeps_vllms_length_checks(llm, tiny_llama):
    """Length rules are per engine: building a plain engine changes no sink one's.

    Last in this module: two in-process engines share torch.distributed state, so
    the plain one is shut down only after both were used.
    """
    plain = make_llm(tiny_llama, max_model_len=MAX_LEN, block_size=32)
    prompts = ({"prompt_token_ids": list(LONG_PROMPT)}, "word " * 400)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    try:
        for prompt in prompts:
            with pytest.raises(VLLMValidationError, match="maximum context length"):
                plain.generate([prompt], params, use_tqdm=False)
            (out,) = llm.generate([prompt], params, use_tqdm=False)
            assert len(out.outputs[0].token_ids) == 4
    finally:
        shutdown(plain)
