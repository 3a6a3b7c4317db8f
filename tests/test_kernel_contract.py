"""One kernel contract (vllm_sink/attention/inputs.py) and the builder's per-step work.

Every path takes ``SinkAttentionInputs``; the metadata builder plans the batch
once per step and hands every layer the same preallocated workspace; the
contract module stays vLLM-free for the GPU check. Exactness against float64
lives in test_cpu_kernel.py and test_triton_kernel.py.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kernel_cases import CASES, TOL, make_batch, reference64, rel_err
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata

from vllm_sink.attention import backend, cpu_kernel, inputs, torch_path, triton_path

ROOT = Path(__file__).resolve().parents[1]


def test_every_path_takes_the_typed_inputs() -> None:
    """The argument list is written once: each entry point's first parameter."""
    for entry in (
        torch_path.sink_attention,
        triton_path.sink_attention_triton,
        cpu_kernel.sink_decode,
    ):
        first = next(iter(inspect.signature(entry).parameters.values()))
        assert first.annotation == "SinkAttentionInputs", entry.__qualname__


def test_contract_and_gpu_check_import_without_vllm() -> None:
    """inputs/torch_path/triton_path and gpu_kernel_check.py --estimate run
    where vLLM cannot be imported (the GPU machine has only torch and Triton)."""
    code = (
        "import sys, runpy; sys.modules['vllm'] = None\n"
        "import vllm_sink.attention.inputs, vllm_sink.attention.torch_path\n"
        "import vllm_sink.attention.triton_path\n"
        "sys.argv = ['gpu_kernel_check.py', '--estimate']\n"
        "runpy.run_path('benchmarks/gpu_kernel_check.py', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU command:" in proc.stdout


@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("compiled", [False, True])
def test_qk_factor_is_honoured_by_every_cpu_path(rotary_dim, compiled) -> None:
    """A table carrying ``qk_factor = m^2`` equals the unit table with the
    query's rotated dims (or the scale) multiplied by it, in torch and C."""
    case = replace(CASES[0], rotary_dim=rotary_dim)
    batch = make_batch(case)
    factor = 1.7
    scaled = replace(batch.inputs, rope=replace(batch.inputs.rope, qk_factor=factor))
    query = batch.inputs.query.clone()
    query[..., :rotary_dim] *= factor
    manual = replace(batch.inputs, query=query)
    outs = []
    for call in (scaled, manual):
        out = torch.full_like(call.query, 7.0)
        torch_path.sink_attention(call, out, compiled_decode=compiled)
        outs.append(out)
    total = int(batch.inputs.layout.query_start_loc[-1])
    assert rel_err(outs[0][:total], outs[1][:total].double()) < 1e-6
    assert rel_err(outs[0][:total], reference64(case, batch)[:total]) > 1e-3


def _common_metadata(batch) -> CommonAttentionMetadata:
    layout = batch.inputs.layout
    return CommonAttentionMetadata(
        query_start_loc=layout.query_start_loc,
        query_start_loc_cpu=layout.query_start_loc.clone(),
        seq_lens=layout.seq_lens,
        num_reqs=layout.num_reqs,
        num_actual_tokens=int(layout.query_start_loc[-1]),
        max_query_len=layout.max_query_len,
        max_seq_len=int(layout.seq_lens.max()),
        block_table_tensor=layout.block_table,
        slot_mapping=torch.zeros(int(layout.query_start_loc[-1]), dtype=torch.long),
    )


def _builder(kernel: str, case) -> backend.SinkAttentionMetadataBuilder:
    """The builder's state without a VllmConfig (its __init__ needs a model)."""
    builder = object.__new__(backend.SinkAttentionMetadataBuilder)
    builder.kernel = kernel
    builder.workspace = backend.allocate_workspace(
        kernel, case.num_heads, case.num_kv_heads, case.head_size, "cpu"
    )
    return builder


def _impl(kernel: str, batch) -> backend.SinkAttentionImpl:
    impl = object.__new__(backend.SinkAttentionImpl)
    impl.kernel = kernel
    impl.scale = batch.inputs.scale
    impl.variant = batch.inputs.variant
    return impl


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_builder_plans_once_per_step_and_reuses_workspace(kernel, monkeypatch) -> None:
    """build() makes the batch plan; no layer plans again; every layer and
    step gets the builder's one workspace (the C decode writes into it)."""
    case = CASES[5]  # bfloat16, GQA 4: decodes and chunks
    batch = make_batch(case)
    builder = _builder(kernel, case)
    steps = [builder.build(0, _common_metadata(batch)) for _ in range(2)]
    for metadata in steps:
        plan = metadata.layout.plan
        assert (
            plan is not None
            and plan.starts == batch.inputs.layout.query_start_loc.tolist()
        )
        assert metadata.workspace is builder.workspace
    assert (builder.workspace is None) == (kernel == "torch")

    def no_replanning(*args, **kwargs):
        raise AssertionError("a layer planned the batch again")

    monkeypatch.setattr(inputs, "plan_batch", no_replanning)
    monkeypatch.setattr(torch_path, "plan_batch", no_replanning)
    seen = []
    sink_decode = cpu_kernel.sink_decode

    def spy(call, out=None, *, workspace=None):
        seen.append(workspace)
        return sink_decode(call, out, workspace=workspace)

    monkeypatch.setattr(cpu_kernel, "sink_decode", spy)
    if builder.workspace is not None:
        builder.workspace.fill_(float("nan"))
    layer = SimpleNamespace(sink_rope=batch.inputs.rope)
    impl = _impl(kernel, batch)
    total = int(batch.inputs.layout.query_start_loc[-1])
    expected = reference64(case, batch)[:total]
    for metadata in steps:
        for _ in range(2):  # two layers of one step
            output = torch.full_like(batch.inputs.query, 7.0)
            impl.forward(layer, batch.inputs.query, None, None,
                         batch.inputs.kv_cache, metadata, output)  # fmt: skip
            assert rel_err(output[:total], expected) < TOL[case.dtype]
    if kernel == "cpu":
        assert len(seen) == 4 and all(ws is builder.workspace for ws in seen)
        assert not torch.isnan(builder.workspace).all(), "workspace unused"
    else:
        assert seen == []


def test_compiled_decode_uses_the_given_workspace() -> None:
    """The C kernel's scratch is the caller's buffer (no malloc per request,
    head and layer); a buffer too small is replaced for that call only."""
    case = CASES[1]
    batch = make_batch(case).decodes()
    ref = reference64(case, batch)
    threads = torch.get_num_threads()
    floats = cpu_kernel.scratch_floats(
        case.num_heads, case.num_kv_heads, case.head_size, threads
    )
    group, tile = case.num_heads // case.num_kv_heads, 32
    d = case.head_size
    assert floats == threads * (group * tile + 2 * group + (2 + tile + 2 * group) * d)
    workspace = torch.full((floats,), float("nan"))
    out = cpu_kernel.sink_decode(batch.inputs, workspace=workspace)
    assert rel_err(out, ref) < TOL[case.dtype]
    assert not torch.isnan(workspace).all(), "the kernel did not use the workspace"
    small = torch.full((1,), float("nan"))
    again = cpu_kernel.sink_decode(batch.inputs, workspace=small)
    assert torch.equal(out, again) and torch.isnan(small).all()


@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (8, 1, 256), (4, 4, 80)])
def test_triton_workspace_bounds_every_batch(heads, monkeypatch) -> None:
    """The builder's Triton workspace holds the split-KV partials of any batch
    size under the automatic split rule (H100: 132 SMs), so decode steps
    allocate nothing and can be captured in a CUDA graph."""
    num_heads, num_kv_heads, head_size = heads
    monkeypatch.setattr(triton_path, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda")
    floats = triton_path.workspace_floats(num_heads, num_kv_heads, head_size, cuda)
    d_pad = triton_path._d_pad(head_size)
    tiles = triton_path.TritonTiles()
    for num_reqs in range(1, 1025):
        splits = triton_path._num_kv_splits(tiles, cuda, num_reqs, num_kv_heads, 1000)
        if splits > 1:
            assert num_reqs * num_heads * splits * (d_pad + 2) <= floats
    assert floats * 4 < 8 << 20, "a few MiB at most"
    assert triton_path.workspace_floats(32, 8, 128, torch.device("cpu")) == 0


def test_cudagraph_support_is_declared_per_kernel(monkeypatch) -> None:
    """Full CUDA graphs of decode-only steps with the Triton kernel on CUDA;
    none for the torch/CPU paths (host plan, per-request loops)."""
    builder = backend.SinkAttentionMetadataBuilder
    assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    monkeypatch.setattr(backend.current_platform, "device_type", "cuda")
    monkeypatch.delenv(backend.KERNEL_ENV, raising=False)
    assert (
        builder.get_cudagraph_support(None, None)
        == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )
    monkeypatch.setenv(backend.KERNEL_ENV, "torch")
    assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER


@pytest.mark.parametrize(("rotary_dim", "neox"), [(64, True), (64, False), (16, True)])
def test_vllm_rotary_op_equals_the_torch_rotation(rotary_dim, neox) -> None:
    """On CPU ``rotate`` runs vLLM's rotary op (negative positions through a
    sign-flipped copy of the table); the torch ops it replaces, which the GPU
    check uses without vLLM, agree for every shape the paths pass."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's ops, as every engine does)

    assert torch_path._vllm_rotary_op() is not None
    angles = torch.arange(40.0)[:, None] * 10000 ** -(
        torch.arange(0, rotary_dim, 2) / rotary_dim
    )
    rope = inputs.RopeTable(
        torch.cat((angles.cos(), angles.sin()), dim=-1), rotary_dim, neox
    )
    generator = torch.Generator().manual_seed(0)
    cases = [  # (x, positions) as prefill queries/keys and decode keys pass them
        (torch.randn(30, 9, 64, generator=generator), torch.arange(30) - 10),
        (torch.randn(30, 3, 3, 64, generator=generator), torch.arange(30)[:, None]),
        (
            torch.randn(4, 30, 3, 64, generator=generator),
            torch.randint(-39, 40, (4, 30), generator=generator),
        ),
        (torch.randn(30, 3, 128, generator=generator)[..., :64], torch.arange(30)),
        (torch.randn(30, 9, 64, generator=generator).bfloat16(), torch.arange(30)),
        (torch.randn(0, 3, 64), torch.arange(0)),  # no sinks (S = 0)
    ]
    for x, positions in cases:
        got = torch_path.rotate(x, positions, rope)
        expected = torch_path.rotate_torch(x, positions, rope)
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert x.numel() == 0 or not torch.equal(got, x.float())  # it rotated


@pytest.mark.parametrize("case", CASES[:3], ids=str)
@pytest.mark.parametrize("vllm_kernel", [True, False])
def test_dense_prefill_runs_vllms_kernel_or_sdpa(case, vllm_kernel, monkeypatch):
    """Requests below S+W are dense causal attention: on CPU with vLLM through
    vLLM's own attention kernel (over a scratch cache), else one SDPA call; both
    equal the float64 reference."""
    calls = {"vllm": 0}
    vllm_dense = torch_path._vllm_dense

    def counted(*args):
        out = vllm_dense(*args) if vllm_kernel else None
        calls["vllm"] += out is not None
        return out

    monkeypatch.setattr(torch_path, "_vllm_dense", counted)
    wide = replace(case, window=2000)  # every request below S+W
    batch = make_batch(wide)
    out = torch.full_like(batch.inputs.query, 7.0)
    torch_path.sink_attention(batch.inputs, out)
    total = int(batch.inputs.layout.query_start_loc[-1])
    assert rel_err(out[:total], reference64(wide, batch)[:total]) < TOL[case.dtype]
    assert (calls["vllm"] > 0) == vllm_kernel
