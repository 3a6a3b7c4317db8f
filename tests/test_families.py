"""The family matrix (issue 21): each served model family and rotary variant,
as a tiny random fp32 checkpoint, streams in vLLM sink mode and equals the oracle.

Every stream runs past 4*(S+W) and past the model's context (256): greedy tokens
identical, logprobs (generated and prompt) within 1e-4. The prompt (100 tokens) is
prefilled in 64-token chunks (torch path), decodes run the compiled C kernel; YaRN on
partial rotary also runs the Triton kernel (interpreted).
One engine per case. Also: every rotary class vLLM ships is served or refused.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from conftest import make_llm, shutdown
from families import FAMILIES, family_model
from kernel_cases import run_engine
from reference import Job, references
from test_attention_e2e import PROMPT, assert_matches, generate

from vllm_sink import rope

# (family, S, W): S+W = 31 stays in the original context of the scaled ropes (64),
# S+W = 104 goes past it (LongRoPE's long factors, YaRN's interpolated band).
CASES = [(family, 4, 27) for family in FAMILIES] + [
    ("phi3", 4, 100),
    ("yarn", 4, 100),
]


def stream_length(sink: int, window: int) -> int:
    return max(4 * (sink + window), 257) + 3


@pytest.fixture(scope="module")
def oracle_refs():
    jobs = [
        Job(family_model(f), s, w, PROMPT, stream_length(s, w) - len(PROMPT))
        for f, s, w in CASES
    ]
    return dict(zip(CASES, references(jobs)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-S{c[1]}-W{c[2]}")
def test_family_equals_oracle(case, oracle_refs):
    family, sink, window = case
    llm = make_llm(family_model(family), sink, window, max_model_len=512)
    try:
        (result,) = generate(llm, [PROMPT], [stream_length(sink, window) - len(PROMPT)])
    finally:
        shutdown(llm)
    assert_matches(result, oracle_refs[case], str(case))


def test_scaled_partial_rotary_in_the_triton_kernel():
    """YaRN's factor on a quarter of the dims through the Triton kernel (the matrix
    above runs the torch path for prefill and the C kernel for decode): S=4, W=20,
    a 40-token prompt and 60 new tokens."""
    model = family_model("yarn_partial")
    prompt = list(PROMPT[:40])
    payload = run_engine("triton", [prompt], 60, model)
    (got,) = payload["results"]
    (ref,) = references([Job(model, 4, 20, tuple(prompt), 60)])
    result = (got["tokens"], got["logprobs"], got["prompt_logprobs"])
    assert payload["calls"]["triton"] > 0
    assert_matches(result, ref, "triton")


def _vllm_rotary_classes() -> set[str]:
    package = importlib.import_module(rope._VLLM_ROTARY)
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "RotaryEmbedding" in name:
                names.add(name)
    return names


def test_every_vllm_rotary_class_is_served_or_refused():
    shipped = _vllm_rotary_classes()
    assert not set(rope.SERVED) & set(rope.REFUSED)
    assert shipped - set(rope.SERVED) - set(rope.REFUSED) == set()
    assert set(rope.SERVED) | set(rope.REFUSED) <= shipped


def test_refused_rotary_names_the_model_and_the_fix():
    from vllm.model_executor.layers.rotary_embedding import NTKScalingRotaryEmbedding

    class FooRotaryEmbedding(torch.nn.Module):  # a model's own, unlisted class
        pass

    cfg = rope.SinkConfig(4, 27)
    ntk = NTKScalingRotaryEmbedding.__new__(NTKScalingRotaryEmbedding)
    with pytest.raises(rope.SinkConfigError, match="tiny-ntk.*NTK.*Fix: drop"):
        rope._vllm_rope_table(ntk, cfg, "tiny-ntk")
    with pytest.raises(rope.SinkConfigError, match="tiny-foo.*not proven"):
        rope._vllm_rope_table(FooRotaryEmbedding(), cfg, "tiny-foo")


def test_scaled_table_is_normalised_and_uneven_rows_are_refused():
    angles = torch.arange(31.0)[:, None] * torch.tensor([1.0, 0.1, 0.01])
    table = torch.cat((angles.cos(), angles.sin()), dim=-1)
    unit = rope.unit_table(table, 6, True, "m")
    assert unit.cos_sin_cache is table and unit.qk_factor == 1.0
    scaled = rope.unit_table(1.25 * table, 6, True, "m")
    torch.testing.assert_close(scaled.cos_sin_cache, table)
    assert scaled.qk_factor == pytest.approx(1.25**2, rel=1e-6)
    uneven = table.clone()
    uneven[3] *= 1.1
    with pytest.raises(rope.SinkConfigError, match="uneven.*one magnitude"):
        rope.unit_table(uneven, 6, True, "uneven")
