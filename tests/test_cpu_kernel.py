"""The compiled CPU decode kernel (cpu_decode.c) against float64 and the torch path.

Batches come from kernel_cases.py: shuffled blocks, a permuted-stride cache
view, NaN in every slot a query may not read. The kernel only runs decodes
(one query per request); ``sink_attention(compiled_decode=True)`` runs it on
the decodes of a mixed batch and the torch path on the prefill chunks.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from kernel_cases import (
    CASES,
    TOL,
    Case,
    make_batch,
    reference64,
    rel_err,
    run_engine,
)

from vllm_sink.attention import backend, cpu_kernel, torch_path
from vllm_sink.attention.inputs import SinkAttentionInputs
from vllm_sink.config import SinkConfigError


def run(inputs: SinkAttentionInputs, **kw) -> torch.Tensor:
    out = torch.full_like(inputs.query, 7.0)
    torch_path.sink_attention(inputs, out, **kw)
    return out


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_kernel.library() is not None, "the CPU decode kernel did not build"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decodes_match_float64_and_torch_path(case: Case) -> None:
    """Every dtype, GQA ratio, rotary width/style, S, W and block size."""
    batch = make_batch(case).decodes()
    ref = reference64(case, batch)
    out = cpu_kernel.sink_decode(batch.inputs)
    assert torch.isfinite(out).all(), "NaN/inf: a stray read or a bad mask"
    assert rel_err(out, ref) < TOL[case.dtype]
    expected = run(batch.inputs)
    assert rel_err(out, expected.double()) < TOL[case.dtype]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_output_dtype_and_strided_rows(out_dtype: torch.dtype) -> None:
    """A 16-bit cache and query, the output written in place in another dtype,
    into rows of a wider buffer (vLLM hands views of fused projections)."""
    case = CASES[5]  # bfloat16, GQA 4
    batch = make_batch(case).decodes()
    ref = reference64(case, batch)
    shape = (len(batch.requests), case.num_heads + 3, case.head_size)
    wide = torch.full(shape, 7.0, dtype=out_dtype)
    out = wide[:, : case.num_heads]
    result = cpu_kernel.sink_decode(batch.inputs, out)
    assert result is out and out.stride(0) == (case.num_heads + 3) * case.head_size
    assert rel_err(out, ref) < TOL[case.dtype]
    assert (wide[:, case.num_heads :] == 7.0).all(), "wrote past its rows"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_equals_torch_path(dtype: torch.dtype) -> None:
    """Keys/values from a fused projection into a permuted cache, padding
    slots skipped: byte-identical to torch_path.write_kv."""
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d, bs = 4, 2, 32, 16
    qkv = torch.randn(9, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    key = qkv[:, hq * d : (hq + hkv) * d].view(9, hkv, d)
    value = qkv[:, (hq + hkv) * d :].view(9, hkv, d)
    slots = torch.tensor([5, 40, -1, 47, 0, 33, 17, -1])  # 8 slots: 9th token is pad
    compiled = torch.zeros(3, bs, hkv, 2 * d, dtype=dtype).permute(0, 2, 1, 3)
    reference = torch.zeros(3, hkv, bs, 2 * d, dtype=dtype)
    assert cpu_kernel.write_kv(key, value, compiled, slots)
    torch_path.write_kv(key, value, reference, slots)
    assert torch.equal(compiled, reference) and reference.abs().sum() > 0
    assert not cpu_kernel.write_kv(key.float(), value, compiled, slots) or (
        dtype == torch.float32
    ), "mixed dtypes must fall back to torch"


@pytest.mark.parametrize("case", CASES[:3] + CASES[5:6], ids=str)
@pytest.mark.parametrize("zero_sink", [False, True])
def test_mixed_batch_compiled_equals_torch(case: Case, zero_sink: bool) -> None:
    """Decodes batched next to prefill chunks; padding tokens stay untouched."""
    batch = make_batch(case)
    total = int(batch.inputs.layout.query_start_loc[-1])
    inputs = batch.call(zero_sink=zero_sink)
    out = run(inputs, compiled_decode=True)
    expected = run(inputs)
    assert torch.isfinite(out[:total]).all()
    assert (out[total:] == 7.0).all(), "padding tokens were written"
    assert rel_err(out[:total], expected[:total].double()) < TOL[case.dtype]
    if not zero_sink:
        ref = reference64(case, batch)[:total]
        assert rel_err(out[:total], ref) < TOL[case.dtype]


def test_long_streams_read_only_sinks_and_window() -> None:
    """Streams 50x S+W long: cost and reads stay on S+W keys (NaN elsewhere)."""
    case = Case(torch.float32, 64, 8, 2, 64, True, 4, 60, block_size=32)
    batch = make_batch(case).decodes()
    decodes = batch.inputs
    long_lens = decodes.layout.seq_lens * 0 + 50 * (case.sink + case.window)
    assert int(long_lens.max()) > int(decodes.layout.seq_lens.max())
    # Re-home each request's live keys at the long stream's positions.
    bs, span = case.block_size, case.sink + case.window
    blocks_needed = -(-int(long_lens.max()) // bs)
    kv = torch.full(
        (len(batch.requests) * blocks_needed + 1, case.num_kv_heads, bs, 128),
        float("nan"),
    )
    table = torch.arange(kv.shape[0] - 1, dtype=torch.int32).view(
        len(batch.requests), blocks_needed
    )
    gen = torch.Generator().manual_seed(3)
    n = int(long_lens[0])
    live = list(range(case.sink)) + list(range(n - case.window, n))
    for r in range(len(batch.requests)):
        for j in live:
            kv[table[r, j // bs], :, j % bs] = torch.randn(
                case.num_kv_heads, 128, generator=gen
            )
    layout = replace(decodes.layout, seq_lens=long_lens, block_table=table)
    inputs = replace(decodes, kv_cache=kv, layout=layout, scale=0.125)
    out = cpu_kernel.sink_decode(inputs)
    expected = run(inputs)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected.double()) < 1e-5
    assert span < n


def test_no_compiler_falls_back_to_torch(monkeypatch, tmp_path, caplog) -> None:
    """A failing compiler: one warning, torch path chosen; forcing cpu errors."""
    monkeypatch.setenv("VLLM_SINK_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    monkeypatch.delenv(backend.KERNEL_ENV, raising=False)
    cpu_kernel.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="vllm_sink"):
            assert cpu_kernel.library() is None
        assert "could not build the CPU decode kernel" in caplog.text
        assert backend.choose_kernel(torch.device("cpu")) == "torch"
        monkeypatch.setenv(backend.KERNEL_ENV, "cpu")
        with pytest.raises(SinkConfigError, match="install a C compiler"):
            backend.choose_kernel(torch.device("cpu"))
        monkeypatch.setenv(backend.KERNEL_ENV, "fast")
        with pytest.raises(SinkConfigError, match="torch, cpu, triton"):
            backend.choose_kernel(torch.device("cpu"))
    finally:
        cpu_kernel.library.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.delenv(backend.KERNEL_ENV)
    assert backend.choose_kernel(torch.device("cpu")) == "cpu"
    assert list((tmp_path / "kernels").glob("*.so")), "kernel not cached"
    cpu_kernel.library.cache_clear()


def test_engine_compiled_decode_equals_torch_path(tiny_llama: str) -> None:
    """vLLM with VLLM_SINK_KERNEL=cpu and =torch: same greedy streams.

    Three streams (30-, 70- and 5-token prompts) decode 60 tokens each, far
    past S+W = 24; the compiled kernel must actually run in the first.
    """
    prompts = [
        [(i * 31 + k) % 250 + 3 for i in range(n)] for k, n in enumerate((30, 70, 5))
    ]
    compiled = run_engine("cpu", prompts, 60)
    torch_only = run_engine("torch", prompts, 60)
    assert compiled["calls"]["compiled"] > 0 and compiled["calls"]["triton"] == 0
    assert torch_only["calls"]["compiled"] == 0 and torch_only["calls"]["torch"] > 0
    for a, b in zip(compiled["results"], torch_only["results"]):
        assert a["tokens"] == b["tokens"]
        for key in ("logprobs", "prompt_logprobs"):
            assert max(abs(x - y) for x, y in zip(a[key], b[key])) < 1e-4
