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
    Batch,
    Case,
    make_batch,
    reference64,
    rel_err,
    run_engine,
)

from vllm_sink.attention import torch_path  # noqa: E402
from vllm_sink.attention import triton_path as _triton_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Can kernels run here? (triton's own jit functions are interpreted too)
IN_PROCESS = DEVICE == "cuda" or type(tl.cdiv).__name__ == "InterpretedFunction"
CHILD_TESTS = (
    "test_kernel_matches_float64_and_torch_path",
    "test_max_query_len_given_equals_computed",
    "test_decode_only_batch_with_splits_equals_unsplit",
    "test_zero_sink_matches_torch_path",
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


def run_kernel(case: Case, batch: Batch, scale: float, **kw) -> torch.Tensor:
    out = torch.full_like(batch.query, 7.0)
    tiles = triton_path.TritonTiles(
        block_q=case.block_q, block_n=case.block_n, num_kv_splits=case.splits
    )
    triton_path.sink_attention_triton(
        batch.query,
        batch.kv_cache,
        batch.block_table,
        batch.query_start_loc,
        batch.seq_lens,
        batch.cos_sin_cache,
        case.rotary_dim,
        case.neox,
        case.sink,
        case.window,
        scale,
        out,
        tiles=tiles,
        **kw,
    )
    return out


def run_torch(case: Case, batch: Batch, scale: float, **kw) -> torch.Tensor:
    out = torch.full_like(batch.query, 7.0)
    torch_path.sink_attention(
        batch.query,
        batch.kv_cache,
        batch.block_table,
        batch.query_start_loc,
        batch.seq_lens,
        batch.cos_sin_cache,
        case.rotary_dim,
        case.neox,
        case.sink,
        case.window,
        scale,
        out,
        **kw,
    )
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_float64_and_torch_path(
    case: Case, child_outcomes, request
) -> None:
    if ran_in_child(request, child_outcomes):
        return
    batch = make_batch(case, DEVICE)
    scale = case.head_size**-0.5
    total = int(batch.query_start_loc[-1])
    ref = reference64(case, batch, scale)[:total]
    out = run_kernel(case, batch, scale).cpu()
    assert torch.isfinite(out[:total]).all(), "NaN/inf: a stray read or bad mask"
    assert (out[total:] == 7.0).all(), "padding tokens were written"
    err = rel_err(out[:total], ref)
    assert err < TOL[case.dtype], f"triton vs float64: {err:.2e}"
    if case.rotary_dim:
        expected = run_torch(case, batch, scale).cpu()[:total]
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
    max_q = max(q for _, q in batch.requests)
    a = run_kernel(case, batch, 0.125)
    b = run_kernel(case, batch, 0.125, max_query_len=max_q)
    assert torch.equal(a, b)


def test_decode_only_batch_with_splits_equals_unsplit(child_outcomes, request) -> None:
    """Flash-decoding merge equals one program per request (decodes only)."""
    if ran_in_child(request, child_outcomes):
        return
    case = Case(torch.float32, 64, 4, 2, 64, True, 4, 61, block_n=16)
    batch = make_batch(case, DEVICE)
    decodes = [r for r, (_, q) in enumerate(batch.requests) if q == 1]
    rows = torch.tensor(decodes)
    tokens = batch.query_start_loc[:-1].long()[rows]
    batch.query = batch.query[tokens]
    batch.block_table = batch.block_table[rows]
    batch.seq_lens = batch.seq_lens[rows]
    batch.query_start_loc = torch.arange(len(decodes) + 1, dtype=torch.int32)
    outs = [
        run_kernel(Case(**{**case.__dict__, "splits": s}), batch, 0.1, max_query_len=1)
        for s in (1, 5)
    ]
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
    total = int(batch.query_start_loc[-1])
    out = run_kernel(case, batch, 0.125, zero_sink=True).cpu()[:total]
    expected = run_torch(case, batch, 0.125, zero_sink=True).cpu()[:total]
    plain = run_torch(case, batch, 0.125).cpu()[:total]
    assert torch.isfinite(out).all()
    assert rel_err(out, expected.double()) < 1e-5
    assert rel_err(plain, expected.double()) > 1e-3  # the variant changes outputs


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
