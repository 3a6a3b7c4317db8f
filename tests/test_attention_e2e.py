"""The plugin inside real vLLM (CPU) equals the independent oracle.

Streams run past 4*(S+W) and past the tiny models' max_position_embeddings
(256); prompts longer than W are prefilled in several chunks
(max_num_batched_tokens=64), so prompt_logprobs check the Λ-shaped mask.
"""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown
from reference import Job, references
from vllm import SamplingParams

TOL = 1e-4
PROMPT = tuple((i * 37) % 250 + 3 for i in range(100))


def generate(llm, prompts, max_tokens):
    """Greedy streams: (tokens, chosen-token logprobs, prompt logprobs) each."""
    params = [
        SamplingParams(
            max_tokens=n, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0
        )
        for n in max_tokens
    ]
    outs = llm.generate(
        [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False
    )
    results = []
    for prompt, out in zip(prompts, outs):
        tokens = list(out.outputs[0].token_ids)
        lps = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, tokens)]
        plps = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        results.append((tokens, lps, plps))
    return results


def assert_matches(result, ref, label=""):
    tokens, lps, plps = result
    assert tokens == ref.tokens, f"{label}: greedy tokens differ from the oracle"
    assert max(abs(a - b) for a, b in zip(lps, ref.logprobs)) < TOL, label
    assert max(abs(a - b) for a, b in zip(plps, ref.prompt_logprobs)) < TOL, label


CONFIGS = [
    ("llama", 0, 24),
    ("llama", 1, 20),
    ("llama", 4, 27),
    ("llama", 16, 16),  # S = block size
    ("llama", 19, 21),  # S = block size + 3
    ("gpt_neox", 4, 27),  # partial rotary through the Transformers backend
    ("gpt_neox", 0, 24),
]
NEW_TOKENS = 240


@pytest.fixture(scope="module")
def oracle_refs(tiny_llama, tiny_neox):
    paths = {"llama": tiny_llama, "gpt_neox": tiny_neox}
    jobs = [Job(paths[a], s, w, PROMPT, NEW_TOKENS) for a, s, w in CONFIGS]
    return dict(zip(CONFIGS, references(jobs)))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-S{c[1]}-W{c[2]}")
def test_stream_equals_oracle(config, oracle_refs, tiny_llama, tiny_neox):
    arch, sink, window = config
    assert len(PROMPT) + NEW_TOKENS >= max(4 * (sink + window), 257)
    llm = make_llm(tiny_llama if arch == "llama" else tiny_neox, sink, window)
    try:
        (result,) = generate(llm, [PROMPT], [NEW_TOKENS])
    finally:
        shutdown(llm)
    assert_matches(result, oracle_refs[config], str(config))


def test_continuous_batching_each_equals_solo_oracle(tiny_llama):
    """Five streams, three slots: some finish, others are admitted mid-run."""
    sink, window = 4, 27
    prompts = [PROMPT[:n] for n in (7, 100, 33, 64, 2)]
    max_tokens = [180, 60, 150, 20, 200]
    jobs = [Job(tiny_llama, sink, window, p, n) for p, n in zip(prompts, max_tokens)]
    refs = references(jobs)
    llm = make_llm(tiny_llama, sink, window, max_num_seqs=3)
    try:
        results = generate(llm, prompts, max_tokens)
    finally:
        shutdown(llm)
    for i, (result, ref) in enumerate(zip(results, refs)):
        assert_matches(result, ref, f"stream {i}")


def test_short_streams_equal_plain_vllm(tiny_llama, tiny_neox):
    """Below S+W sink mode is dense attention: same outputs as vLLM's own."""
    prompts = [PROMPT[:40], PROMPT[:9]]
    max_tokens = [120, 150]  # every stream stays under S+W = 204
    for model in (tiny_llama, tiny_neox):
        runs = []
        for window in (None, 200):
            llm = make_llm(
                model, 4, window, block_size=32, max_model_len=256, max_num_seqs=2
            )
            try:
                runs.append(generate(llm, prompts, max_tokens))
            finally:
                shutdown(llm)
        for plain, sink in zip(*runs):
            assert plain[0] == sink[0]
            assert max(abs(a - b) for a, b in zip(plain[1], sink[1])) < TOL
            assert max(abs(a - b) for a, b in zip(plain[2], sink[2])) < TOL
