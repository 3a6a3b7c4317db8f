"""Random paged batches, a float64 reference and an engine run, for kernel tests.

Shared by the Triton and the compiled CPU kernel tests. Every batch mixes
decodes and prefill chunks over a shuffled paged layout (a permuted-stride cache
view); all KV slots a query may not read (evicted, past the sequence, unused
blocks) and cos/sin rows past S+W-1 hold NaN, so any stray read shows up as a
NaN output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vllm_sink.attention.inputs import (
    BatchLayout,
    RopeTable,
    SinkAttentionInputs,
    SinkVariant,
    plan_batch,
)
from vllm_sink.attention.torch_path import decode_batch

THETA = 10000.0
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    head_size: int
    num_heads: int
    num_kv_heads: int
    rotary_dim: int
    neox: bool
    sink: int
    window: int
    block_size: int = 16
    block_q: int | None = None
    block_n: int | None = None
    splits: int | None = None
    table_dtype: torch.dtype = torch.float32
    seed: int = 0

    def __str__(self) -> str:
        dt = str(self.dtype).split(".")[-1]
        style = "neox" if self.neox else "gptj"
        tiles = f"q{self.block_q}n{self.block_n}s{self.splits}"
        return (
            f"{dt}-D{self.head_size}-H{self.num_heads}x{self.num_kv_heads}-"
            f"{style}{self.rotary_dim}-S{self.sink}W{self.window}-bs{self.block_size}"
            f"-{tiles}"
        )


CASES = [
    Case(torch.float32, 64, 2, 2, 64, True, 4, 16),
    Case(torch.float32, 80, 8, 2, 32, False, 1, 20, block_n=16, splits=2),
    Case(torch.float32, 96, 8, 1, 48, True, 0, 7, block_q=4),
    Case(torch.float32, 64, 4, 1, 64, False, 16, 9, block_q=8, block_n=16, splits=3),
    Case(torch.float32, 64, 6, 2, 0, True, 4, 12),  # rotary off, GQA 3
    Case(torch.bfloat16, 128, 8, 2, 128, True, 16, 27, block_n=16, splits=4),
    Case(torch.bfloat16, 64, 8, 1, 64, False, 4, 1),
    Case(torch.bfloat16, 64, 4, 1, 32, True, 19, 6, table_dtype=torch.bfloat16),
    Case(torch.float16, 256, 2, 2, 256, False, 19, 5, block_size=32),
    Case(torch.float16, 128, 8, 2, 64, True, 4, 40, block_q=16, splits=2),
    Case(torch.float16, 80, 4, 1, 80, True, 1, 3, block_n=16),
]


@dataclass
class Batch:
    """One step's kernel inputs, built like vLLM would hand them to the
    backend, and what the float64 reference needs to recompute them."""

    inputs: SinkAttentionInputs
    requests: list[tuple[int, int]]  # (seq_len, q_len)
    keys: list[torch.Tensor] = field(default_factory=list)  # [seq_len, Hkv, D]
    values: list[torch.Tensor] = field(default_factory=list)

    def call(
        self, scale: float | None = None, zero_sink: bool = False
    ) -> SinkAttentionInputs:
        """The inputs with another softmax scale and/or zero_sink."""
        variant = replace(self.inputs.variant, zero_sink=zero_sink)
        scale = self.inputs.scale if scale is None else scale
        return replace(self.inputs, scale=scale, variant=variant)

    def decodes(self) -> Batch:
        """The batch cut down to its one-query requests, as a decode-only step."""
        layout = self.inputs.layout
        plan = plan_batch(layout.query_start_loc, layout.seq_lens)
        rows = plan.decode_rows.tolist()
        return Batch(
            inputs=decode_batch(self.inputs, plan),
            requests=[self.requests[r] for r in rows],
            keys=[self.keys[r] for r in rows],
            values=[self.values[r] for r in rows],
        )


def request_shapes(case: Case) -> list[tuple[int, int]]:
    """(seq_len, q_len): decodes and chunks around block and S+W boundaries."""
    bs, span = case.block_size, case.sink + case.window
    decodes = [1, 2, bs - 1, bs, bs + 1, span, span + 1, 3 * bs + 5, 5 * span + 3]
    chunks = [(bs + 1, bs + 1), (4 * bs + 3, 9), (2 * span + 7, span + 5), (span, 2)]
    shapes = [(n, 1) for n in decodes] + chunks
    order = torch.randperm(len(shapes), generator=torch.Generator().manual_seed(7))
    return [shapes[i] for i in order.tolist()]


def live_keys(seq_len: int, q_len: int, sink: int, window: int) -> list[int]:
    """Keys some query of the step may see; every other slot holds NaN."""
    first = seq_len - q_len
    win_lo = max(sink, first - window + 1)
    return sorted(set(range(min(sink, seq_len))) | set(range(win_lo, seq_len)))


def rope_table(rotary_dim: int, rows: int, dtype=torch.float64) -> torch.Tensor:
    """cat(cos, sin) of positions 0..rows-1 in float64 (then cast)."""
    if rotary_dim == 0:
        return torch.zeros(rows, 0, dtype=dtype)
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    angles = torch.arange(rows, dtype=torch.float64)[:, None] / THETA**exps
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


def make_batch(case: Case, device: str = "cpu") -> Batch:
    """Random paged layout: shuffled blocks, a permuted-stride cache view."""
    gen = torch.Generator().manual_seed(case.seed)
    requests = request_shapes(case)
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_size
    counts = [math.ceil(n / bs) for n, _ in requests]
    num_blocks = sum(counts) + 3
    nan_block = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=gen).tolist()
    # vLLM may hand a permuted physical layout: [blocks, bs, Hkv, 2D] here.
    phys = torch.full((num_blocks, bs, hkv, 2 * d), float("nan"), dtype=case.dtype)
    kv_cache = phys.permute(0, 2, 1, 3)
    block_table = torch.full((len(requests), max(counts) + 2), nan_block)
    batch_keys, batch_values = [], []
    for r, (seq_len, q_len) in enumerate(requests):
        blocks = [perm.pop() for _ in range(counts[r])]
        block_table[r, : counts[r]] = torch.tensor(blocks)
        kv = torch.randn(seq_len, hkv, 2 * d, generator=gen).to(case.dtype)
        for j in live_keys(seq_len, q_len, case.sink, case.window):
            kv_cache[blocks[j // bs], :, j % bs] = kv[j]
        batch_keys.append(kv[..., :d].double())
        batch_values.append(kv[..., d:].double())
    q_lens = [q for _, q in requests]
    total = sum(q_lens)
    # The query is a view into a fused qkv projection, plus 2 padding tokens.
    hq = case.num_heads
    qkv = torch.randn(total + 2, (hq + 2 * hkv) * d, generator=gen).to(case.dtype)
    qkv[total:] = float("nan")
    query = qkv[:, : hq * d].view(total + 2, hq, d)
    span = case.sink + case.window
    table = rope_table(case.rotary_dim, span).to(case.table_dtype)
    nan_rows = torch.full((3, case.rotary_dim), float("nan"), dtype=table.dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    layout = BatchLayout(
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor([n for n, _ in requests], dtype=torch.int32).to(device),
        block_table=block_table.to(torch.int32).to(device),
        max_query_len=max(q_lens),
    )
    inputs = SinkAttentionInputs(
        query=query.to(device),
        kv_cache=kv_cache.to(device),
        layout=layout,
        rope=RopeTable(
            torch.cat((table, nan_rows)).to(device), case.rotary_dim, case.neox
        ),
        variant=SinkVariant(case.sink, case.window),
        scale=case.head_size**-0.5,
    )
    return Batch(inputs, requests, batch_keys, batch_values)


def rotate64(x: torch.Tensor, pos: torch.Tensor, rotary_dim: int, neox: bool):
    """Float64 RoPE of x [n, ..., D] at integer positions pos [n]."""
    if rotary_dim == 0:
        return x
    cos_sin = rope_table(rotary_dim, int(pos.max()) + 1)[pos]
    shape = (len(pos),) + (1,) * (x.dim() - 2) + (rotary_dim // 2,)
    cos, sin = (c.reshape(shape) for c in cos_sin.chunk(2, dim=-1))
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    return torch.cat((rot, rest), dim=-1)


def reference64(case: Case, batch: Batch, scale: float | None = None) -> torch.Tensor:
    """docs/architecture.md §1 literally, per query, in float64: positions are ranks.

    Reads the case (S, W, rotary) and the batch's query, layout and live K/V
    only, not its kernel inputs' table. ``scale`` defaults to the inputs'."""
    scale = batch.inputs.scale if scale is None else scale
    query = batch.inputs.query.double().cpu()
    out = torch.zeros_like(query)
    group = case.num_heads // case.num_kv_heads
    starts = batch.inputs.layout.query_start_loc.tolist()
    for r, (seq_len, q_len) in enumerate(batch.requests):
        keys, values = batch.keys[r], batch.values[r]
        for i in range(q_len):
            t = seq_len - q_len + i
            win_lo = max(case.sink, t - case.window + 1)
            idx = list(range(min(case.sink, t + 1))) + list(range(win_lo, t + 1))
            pos = torch.arange(len(idx))
            k = rotate64(keys[idx], pos, case.rotary_dim, case.neox)
            v = values[idx]
            q = query[starts[r] + i].view(case.num_kv_heads, group, -1)
            q = rotate64(q[None], pos[-1:], case.rotary_dim, case.neox)[0]
            scores = torch.einsum("hgd,khd->hgk", q, k) * scale
            probs = scores.softmax(-1)
            o = torch.einsum("hgk,khd->hgd", probs, v)
            out[starts[r] + i] = o.reshape(case.num_heads, -1)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm_sink.attention import cpu_kernel, torch_path, triton_path
    from vllm_sink.tiny_models import make_tiny_model

    calls = {"triton": 0, "torch": 0, "compiled": 0}
    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    triton_path.sink_attention_triton = counting(
        "triton", triton_path.sink_attention_triton)
    torch_path.sink_attention = counting("torch", torch_path.sink_attention)
    cpu_kernel.sink_decode = counting("compiled", cpu_kernel.sink_decode)

    prompts, new_tokens = json.loads(sys.argv[1]), int(sys.argv[2])
    model = sys.argv[3] if len(sys.argv) > 3 else make_tiny_model("llama")
    llm = LLM(model, dtype="float32", enforce_eager=True,
              block_size=16, max_model_len=4096, max_num_batched_tokens=64,
              max_num_seqs=4, seed=0,
              additional_config={"attention_sink": {"sink": 4, "window": 20}})
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True,
                            logprobs=0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                        use_tqdm=False)
    results = []
    for p, o in zip(prompts, outs):
        toks = list(o.outputs[0].token_ids)
        lps = [d[t].logprob for d, t in zip(o.outputs[0].logprobs, toks)]
        plps = [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])]
        results.append({"tokens": toks, "logprobs": lps, "prompt_logprobs": plps})
    print("RESULT " + json.dumps({"calls": calls, "results": results}))
    """
)


def run_engine(
    kernel: str, prompts: list[list[int]], new_tokens: int, model: str | None = None
) -> dict:
    """Greedy streams from real vLLM (``model``, default the tiny llama; S=4, W=20,
    fp32, 64-token chunks) with ``VLLM_SINK_KERNEL=kernel``, in a child process.

    Returns ``{"calls": {"triton"|"torch"|"compiled": n}, "results": [{"tokens",
    "logprobs", "prompt_logprobs"}, ...]}``; ``torch`` counts every call of
    the torch path's entry point, ``compiled`` the compiled decodes within it.
    """
    env = {
        **os.environ,
        "VLLM_SINK_KERNEL": kernel,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
    }
    if kernel == "triton" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, json.dumps(prompts), str(new_tokens)]
        + ([model] if model else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])
