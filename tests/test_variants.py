"""The paper's other sink variants: zero sink (softmax off-by-one), sink token."""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown
from reference import Job, references
from test_attention_e2e import PROMPT, assert_matches, generate

from vllm_sink import SinkConfig, SinkConfigError
from vllm_sink.tiny_models import BOS_ID

NEW = 200


def variant_llm(model, sink, window, **variant):
    cfg = SinkConfig(sink=sink, window=window, **variant)
    return make_llm(model, additional_config=cfg.additional_config())


@pytest.mark.parametrize(
    "sink, window, variant",
    [
        (0, 24, {"zero_sink": True}),
        (4, 27, {"zero_sink": True}),
        (4, 27, {"sink_token_id": BOS_ID}),
        (4, 27, {"zero_sink": True, "sink_token_id": BOS_ID}),
    ],
    ids=["zero-S0", "zero-S4", "token", "zero+token"],
)
def test_variant_equals_oracle(tiny_llama, sink, window, variant):
    token = variant.get("sink_token_id")
    stream = (token, *PROMPT) if token is not None else PROMPT
    (ref,) = references(
        [Job(tiny_llama, sink, window, stream, NEW, variant.get("zero_sink", False))]
    )
    llm = variant_llm(tiny_llama, sink, window, **variant)
    try:
        (result,) = generate(llm, [PROMPT], [NEW])
        if token is not None:  # the user's prompt already starting with it
            (again,) = generate(llm, [(token, *PROMPT)], [NEW])
            assert again[0] == result[0]
    finally:
        shutdown(llm)
    tokens, lps, plps = result
    if token is not None:
        # The hidden sink token: prompt logprobs start at the user's 2nd token.
        ref.prompt_logprobs = ref.prompt_logprobs[1:]
    assert_matches((tokens, lps, plps), ref, str(variant))


def test_sink_token_is_hidden_from_prompt_and_usage(tiny_llama):
    from vllm import SamplingParams

    llm = variant_llm(tiny_llama, 4, 27, sink_token_id=BOS_ID)
    try:
        params = SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=0)
        (out,) = llm.generate([{"prompt_token_ids": list(PROMPT[:10])}], params)
    finally:
        shutdown(llm)
    assert out.prompt_token_ids == list(PROMPT[:10])
    assert len(out.prompt_logprobs) == 10 and out.prompt_logprobs[0] is None


def test_variant_settings_are_validated():
    with pytest.raises(SinkConfigError, match="--sink-token-id needs a sink slot"):
        SinkConfig(sink=0, window=8, sink_token_id=1)
    with pytest.raises(SinkConfigError, match="--zero-sink"):
        SinkConfig(sink=4, window=8, zero_sink="yes")
    cfg = SinkConfig.from_value({"window": 8, "zero_sink": True, "sink_token_id": 3})
    assert cfg.to_dict() == {
        "sink": 4,
        "window": 8,
        "zero_sink": True,
        "sink_token_id": 3,
    }
    assert SinkConfig(4, 8).to_dict() == {"sink": 4, "window": 8}


def test_sink_token_outside_the_vocabulary_is_refused(tiny_llama):
    with pytest.raises(SinkConfigError, match="outside"):
        variant_llm(tiny_llama, 4, 27, sink_token_id=10**6)
