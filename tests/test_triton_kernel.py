"""The Triton sink-attention kernel against the torch path and a float64 reference.

On CPU the kernels run under the Triton interpreter. Triton reads
TRITON_INTERPRET when a ``@triton.jit`` function is decorated, and that
includes its own library (``tl.cdiv``, the reductions' combine functions),
decorated when triton is first imported. So the flag works in-process only if
it is set before anything imports triton. When the whole suite runs in one
pytest process, vLLM (imported by other test modules) has usually loaded
triton already; then the kernel tests re-run themselves once in a child pytest
with the flag set, and each test here reports its child's outcome.

Batches and the float64 reference come from kernel_cases.py.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_cases import (  # noqa: E402
    CASES,
    TOL,
    Case,
    make_batch,
    reference64,
    rel_err,
    run_engine,
)

from vllm_sink.attention import torch_path  # noqa: E402
from vllm_sink.attention import triton_path as _triton_path  # noqa: E402
from vllm_sink.attention.inputs import SinkAttentionInputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Can kernels run here? (triton's own jit functions are interpreted too)
IN_PROCESS = DEVICE == "cuda" or type(tl.cdiv).__name__ == "InterpretedFunction"
CHILD_TESTS = (
    "test_kernel_matches_float64_and_torch_path",
    "test_max_query_len_given_equals_computed",
    "test_decode_only_batch_with_splits_equals_unsplit",
    "test_zero_sink_matches_torch_path",
    "test_split_partials_live_in_the_given_workspace",
    "test_padding_requests_are_skipped",
)


def _load_triton_path():
    """``triton_path`` with interpreted kernels on CPU (reloaded if needed)."""
    module = _triton_path
    kernel = type(module._sink_attn_kernel).__name__
    if DEVICE == "cpu" and IN_PROCESS and kernel != "InterpretedFunction":
        module = importlib.reload(module)
    return module


triton_path = _load_triton_path()


@pytest.fixture(scope="module")
def child_outcomes(tmp_path_factory) -> dict[str, str] | None:
    """name -> failure text ('' if passed) of the kernel tests run in a child.

    None when this process runs the kernels itself.
    """
    if IN_PROCESS:
        return None
    report = tmp_path_factory.mktemp("triton_kernel") / "junit.xml"
    nodes = [f"{Path(__file__).name}::{name}" for name in CHILD_TESTS]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *nodes, "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=1200,
    )  # fmt: skip
    if not report.exists():
        pytest.fail(f"child pytest gave no report:\n{proc.stdout[-3000:]}")
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        problems = [el for el in case if el.tag in ("failure", "error", "skipped")]
        text = "; ".join(
            f"{el.tag}: {el.get('message', '')}\n{el.text or ''}" for el in problems
        )
        outcomes[case.get("name")] = text
    return outcomes


def ran_in_child(request, outcomes: dict[str, str] | None) -> bool:
    """True if the child ran this test (and it passed there); fail otherwise."""
    if outcomes is None:
        return False
    name = request.node.name
    assert name in outcomes, f"{name} did not run in the child pytest"
    assert not outcomes[name], outcomes[name][-3000:]
    return True


def tiles_of(case: Case):
    return triton_path.TritonTiles(
        block_q=case.block_q, block_n=case.block_n, num_kv_splits=case.splits
    )


def run_kernel(case: Case, inputs: SinkAttentionInputs, workspace=None) -> torch.Tensor:
    out = torch.full_like(inputs.query, 7.0)
    triton_path.sink_attention_triton(
        inputs, out, tiles=tiles_of(case), workspace=workspace
    )
    return out


def run_torch(inputs: SinkAttentionInputs) -> torch.Tensor:
    out = torch.full_like(inputs.query, 7.0)
    torch_path.sink_attention(inputs, out)
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_float64_and_torch_path(
    case: Case, child_outcomes, request
) -> None:
    if ran_in_child(request, child_outcomes):
        return
    batch = make_batch(case, DEVICE)
    total = int(batch.inputs.layout.query_start_loc[-1])
    ref = reference64(case, batch)[:total]
    out = run_kernel(case, batch.inputs).cpu()
    assert torch.isfinite(out[:total]).all(), "NaN/inf: a stray read or bad mask"
    assert (out[total:] == 7.0).all(), "padding tokens were written"
    err = rel_err(out[:total], ref)
    assert err < TOL[case.dtype], f"triton vs float64: {err:.2e}"
    if case.rotary_dim:
        expected = run_torch(batch.inputs).cpu()[:total]
        assert torch.isfinite(expected).all()
        assert rel_err(expected, ref) < TOL[case.dtype]
        diff = rel_err(out[:total], expected.double())
        assert diff < TOL[case.dtype], f"triton vs torch path: {diff:.2e}"


def test_max_query_len_given_equals_computed(child_outcomes, request) -> None:
    """The sync-free call (caller passes max_query_len) gives the same output."""
    if ran_in_child(request, child_outcomes):
        return
    case = CASES[0]
    batch = make_batch(case, DEVICE)
    inputs = batch.inputs
    assert inputs.layout.max_query_len == max(q for _, q in batch.requests)
    unknown = replace(inputs, layout=replace(inputs.layout, max_query_len=None))
    assert torch.equal(run_kernel(case, inputs), run_kernel(case, unknown))


def test_decode_only_batch_with_splits_equals_unsplit(child_outcomes, request) -> None:
    """Flash-decoding merge equals one program per request (decodes only)."""
    if ran_in_child(request, child_outcomes):
        return
    case = Case(torch.float32, 64, 4, 2, 64, True, 4, 61, block_n=16)
    inputs = make_batch(case, DEVICE).decodes().call(scale=0.1)
    assert inputs.layout.max_query_len == 1
    outs = [run_kernel(replace(case, splits=s), inputs) for s in (1, 5)]
    assert torch.isfinite(outs[0]).all()
    for other in outs[1:]:
        assert rel_err(other, outs[0].double()) < 1e-6


@pytest.mark.parametrize("splits", [1, 3])
def test_zero_sink_matches_torch_path(splits, child_outcomes, request) -> None:
    """Softmax off-by-one (exp(0) in every denominator), prefill and split decode."""
    if ran_in_child(request, child_outcomes):
        return
    case = Case(torch.float32, 64, 4, 2, 64, True, 0, 23, splits=splits)
    batch = make_batch(case, DEVICE)
    total = int(batch.inputs.layout.query_start_loc[-1])
    zero_sink = batch.call(scale=0.125, zero_sink=True)
    out = run_kernel(case, zero_sink).cpu()[:total]
    expected = run_torch(zero_sink).cpu()[:total]
    plain = run_torch(batch.call(scale=0.125)).cpu()[:total]
    assert torch.isfinite(out).all()
    assert rel_err(out, expected.double()) < 1e-5
    assert rel_err(plain, expected.double()) > 1e-3  # the variant changes outputs


def test_split_partials_live_in_the_given_workspace(
    child_outcomes, request, monkeypatch
) -> None:
    """Split-KV partials are views of the caller's workspace, the same buffer
    on every call (the builder preallocates it once); output unchanged."""
    if ran_in_child(request, child_outcomes):
        return
    case = Case(torch.float32, 64, 4, 2, 64, True, 4, 23, splits=3)
    inputs = make_batch(case, DEVICE).inputs
    d_pad, num_reqs = 64, inputs.layout.num_reqs
    floats = num_reqs * case.num_heads * case.splits * (d_pad + 2)
    workspace = torch.empty(floats, dtype=torch.float32, device=DEVICE)
    buffers = []
    reduce_splits = triton_path._reduce_splits

    def spy(args, part_acc, part_ml, out):
        buffers.append((part_acc.data_ptr(), part_ml.data_ptr()))
        return reduce_splits(args, part_acc, part_ml, out)

    monkeypatch.setattr(triton_path, "_reduce_splits", spy)
    fresh = run_kernel(case, inputs)
    outs = [run_kernel(case, inputs, workspace=workspace) for _ in range(2)]
    start = workspace.data_ptr()
    acc_end = start + 4 * num_reqs * case.num_heads * case.splits * d_pad
    assert buffers[1:] == [(start, acc_end)] * 2
    assert buffers[0][0] != start, "without a workspace the call allocates"
    assert torch.equal(outs[0], fresh) and torch.equal(outs[1], fresh)


@pytest.mark.parametrize("splits", [1, 2])
def test_padding_requests_are_skipped(splits, child_outcomes, request) -> None:
    """A decode step padded as for a CUDA graph (vLLM: padding requests have
    query length 0 and seq_len 0): same outputs, padding rows untouched."""
    if ran_in_child(request, child_outcomes):
        return
    case = Case(torch.float32, 64, 4, 2, 64, True, 4, 23, splits=splits)
    inputs = make_batch(case, DEVICE).decodes().inputs
    layout, pad = inputs.layout, 3
    num_reqs = layout.num_reqs
    qsl = torch.cat((layout.query_start_loc, layout.query_start_loc[-1:].repeat(pad)))
    padded_layout = replace(
        layout,
        query_start_loc=qsl,
        seq_lens=torch.cat((layout.seq_lens, layout.seq_lens.new_zeros(pad))),
        block_table=torch.cat((layout.block_table, layout.block_table[:pad])),
    )
    query = torch.cat((inputs.query, inputs.query[:pad]))
    padded = replace(inputs, query=query, layout=padded_layout)
    out = run_kernel(case, padded)
    assert torch.equal(out[:num_reqs], run_kernel(case, inputs))
    assert (out[num_reqs:] == 7.0).all(), "a padding request wrote its row"


def test_engine_with_triton_kernel_equals_oracle(tiny_llama: str) -> None:
    """vLLM on the tiny llama with VLLM_SINK_KERNEL=triton matches the oracle.

    Two streams (40- and 90-token prompts, the latter prefilled in two chunks
    next to the other's decodes) run 60 greedy tokens each, past S+W = 24.
    """
    from reference import Job, references

    prompts = [[(i * 37) % 250 + 3 for i in range(n)] for n in (40, 90)]
    new_tokens = 60
    payload = run_engine("triton", prompts, new_tokens)
    assert payload["calls"]["triton"] > 0 and payload["calls"]["torch"] == 0
    jobs = [Job(tiny_llama, 4, 20, tuple(p), new_tokens) for p in prompts]
    for i, (got, ref) in enumerate(zip(payload["results"], references(jobs))):
        assert got["tokens"] == ref.tokens, f"stream {i}: greedy tokens differ"
        lp_err = max(abs(a - b) for a, b in zip(got["logprobs"], ref.logprobs))
        plp_err = max(
            abs(a - b) for a, b in zip(got["prompt_logprobs"], ref.prompt_logprobs)
        )
        assert lp_err < 1e-4 and plp_err < 1e-4, (i, lp_err, plp_err)


def test_gpu_kernel_check_tiny_runs() -> None:
    """benchmarks/gpu_kernel_check.py --tiny: correctness + a small timing table."""
    env = {**os.environ, "TRITON_INTERPRET": "1"} if DEVICE == "cpu" else None
    script = ROOT / "benchmarks" / "gpu_kernel_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUMMARY" in proc.stdout and "decode" in proc.stdout
    # The full size's plan, printed for whoever gets a GPU: well inside 8 minutes.
    assert "GPU command: timeout 480 python3 benchmarks/gpu_kernel_check.py" in (
        proc.stdout
    )
    estimated = re.search(r"estimated (\d+) s on an H100", proc.stdout)
    assert estimated and int(estimated.group(1)) < 0.6 * 480
