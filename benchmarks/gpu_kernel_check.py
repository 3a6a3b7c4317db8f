"""GPU check of the Triton sink-attention kernel: correctness first, then speed.

Needs only torch and Triton (vLLM is never imported): the kernel modules and
their typed inputs (``vllm_sink/attention/inputs.py``) are imported from this
checkout, whose package imports are vLLM-free.

1. Correctness: the Triton path against the torch path on fresh random paged
   batches (mixed decodes and prefill chunks, GQA 1/4/8, fp32/bf16/fp16, head
   sizes 64..256, neox/gptj, partial rotary, forced decode splits), plus a
   CUDA-graph capture/replay of a decode step (GPU only).
2. Speed (CUDA events, median after warm-up, L2 flushed before each run):
   decode at batch {1, 16, 64, 256} x W {1024, 2048, 4096} and a 2048-token
   prefill chunk per W; bf16, 32 query / 8 KV heads, head 128, S = 4. Each row
   reports the kernel, the same kernel with rotary off (rotary_dim = 0), and
   ``scaled_dot_product_attention`` on contiguous K/V of S+W keys per query.
   KV bytes/s is compared with the device-to-device copy rate measured in the
   same run (bytes read + written per second of a large ``copy_``).

``--tiny`` runs a tiny size on CPU under TRITON_INTERPRET=1 (wall-clock timings,
no CUDA events) so CI can run it. ``--json PATH`` writes every number.
``--sweep`` also times a few tile/warp/stage variants on three rows.
``--estimate`` prints, without a GPU, the command to run on one, the time limit
to give it, and how long the full-size run should take on an H100 (a
pessimistic roofline: every timed call at a fraction of the H100 PCIe's HBM rate
and bf16 peak, plus L2 flushes, Triton compiles and start-up; see ``estimate``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's vllm_sink, not an installed one

# vLLM-free (checked by tests/test_triton_kernel.py): the one kernel contract.
from vllm_sink.attention.inputs import (  # noqa: E402
    BatchLayout,
    RopeTable,
    SinkAttentionInputs,
    SinkVariant,
)


@dataclass(frozen=True)
class Shape:
    """Model and sweep sizes of one run."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    sink: int
    windows: tuple[int, ...]
    batches: tuple[int, ...]
    prefill_chunk: int
    dtype: torch.dtype
    block_size: int = 16


FULL = Shape(32, 8, 128, 4, (1024, 2048, 4096), (1, 16, 64, 256), 2048, torch.bfloat16)
TINY = Shape(4, 2, 64, 4, (16,), (1, 3), 8, torch.bfloat16)


def without_rotary(inputs: SinkAttentionInputs) -> SinkAttentionInputs:
    """The same call with rotary off (rotary_dim = 0), to time its cost."""
    return replace(inputs, rope=replace(inputs.rope, rotary_dim=0))


def rope_table(rotary_dim: int, rows: int, device: torch.device) -> torch.Tensor:
    """vLLM layout: cat(cos, sin) of positions 0..rows-1, float32."""
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    angles = torch.arange(rows, dtype=torch.float64)[:, None] / 10000.0**exps
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float().to(device)


def make_batch(
    requests: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    sink: int,
    window: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    block_size: int = 16,
    rotary_dim: int | None = None,
    neox: bool = True,
    permuted: bool = False,
    seed: int = 0,
) -> SinkAttentionInputs:
    """Requests (seq_len, q_len) on shuffled blocks; only live blocks exist.

    Live keys are the sinks and the window of each request's first query;
    block-table entries of evicted blocks point to one spare block.
    """
    gen = torch.Generator().manual_seed(seed)
    bs = block_size
    live: list[list[int]] = []
    for seq_len, q_len in requests:
        win_lo = max(sink, seq_len - q_len - window + 1)
        blocks = set(range(math.ceil(min(sink, seq_len) / bs)))
        blocks |= set(range(win_lo // bs, math.ceil(seq_len / bs)))
        live.append(sorted(blocks))
    num_blocks = sum(len(b) for b in live) + 1
    perm = torch.randperm(num_blocks - 1, generator=gen)
    max_blocks = max(math.ceil(n / bs) for n, _ in requests)
    table = torch.full((len(requests), max_blocks), num_blocks - 1, dtype=torch.int32)
    used = 0
    for r, blocks in enumerate(live):
        table[r, blocks] = perm[used : used + len(blocks)].int()
        used += len(blocks)
    torch.manual_seed(seed)
    width = 2 * head_size
    if permuted:  # physical [blocks, bs, Hkv, 2D], logical view permuted
        phys = torch.randn(num_blocks, bs, num_kv_heads, width, device=device)
        kv_cache = phys.to(dtype).permute(0, 2, 1, 3)
    else:
        kv_cache = torch.randn(num_blocks, num_kv_heads, bs, width, device=device)
        kv_cache = kv_cache.to(dtype)
    q_lens = [q for _, q in requests]
    query = torch.randn(sum(q_lens), num_heads, head_size, device=device).to(dtype)
    rd = head_size if rotary_dim is None else rotary_dim
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    layout = BatchLayout(
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor([n for n, _ in requests], dtype=torch.int32).to(device),
        block_table=table.to(device),
        max_query_len=max(q_lens),
    )
    return SinkAttentionInputs(
        query=query,
        kv_cache=kv_cache,
        layout=layout,
        rope=RopeTable(rope_table(rd, sink + window, device), rd, neox),
        variant=SinkVariant(sink, window),
        scale=head_size**-0.5,
    )


def steady_requests(num_reqs: int, q_len: int, sink: int, window: int) -> list:
    """Streams well past S+W (full window), lengths staggered per request."""
    return [(3 * (sink + window) + q_len + 7 * r, q_len) for r in range(num_reqs)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


# ---------------------------------------------------------------- correctness


@dataclass
class Check:
    name: str
    error: float
    tol: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.error < self.tol


def check_against_torch(
    name: str, inputs: SinkAttentionInputs, tiles, tol: float, torch_path, triton_path
) -> Check:
    expected = torch.zeros_like(inputs.query)
    torch_path.sink_attention(inputs, expected)
    out = torch.zeros_like(inputs.query)
    triton_path.sink_attention_triton(inputs, out, tiles=tiles)
    return Check(name, rel_err(out, expected), tol, bool(torch.isfinite(out).all()))


def correctness(
    device: torch.device, tiny: bool, torch_path, triton_path
) -> list[Check]:
    """Random mixed batches vs the torch path (several shapes and dtypes)."""
    tols = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
    configs = [
        # dtype, D, Hq, Hkv, rotary_dim, neox, S, W, splits
        (torch.bfloat16, 128, 8, 2, 128, True, 4, 40, None),
        (torch.float32, 64, 4, 4, 32, False, 1, 23, 3),
        (torch.float16, 80, 8, 1, 80, True, 19, 9, None),
    ]
    if not tiny:
        configs += [
            (torch.bfloat16, 96, 32, 8, 96, False, 4, 300, 4),
            (torch.float16, 256, 8, 8, 128, True, 4, 100, None),
            (torch.float32, 128, 32, 4, 128, True, 16, 200, 8),
            (torch.bfloat16, 64, 9, 3, 64, True, 4, 124, None),
        ]
    Tiles = triton_path.TritonTiles
    checks = []
    for i, (dtype, d, hq, hkv, rd, neox, s, w, splits) in enumerate(configs):
        span, bs = s + w, 16
        requests = [(1, 1), (bs, 1), (bs + 1, 1), (span + 1, 1), (5 * span + 3, 1)]
        requests += [(2 * span + 7, span + 5), (bs + 3, bs + 3), (span, 2)]
        inputs = make_batch(
            requests,
            hq,
            hkv,
            d,
            s,
            w,
            dtype,
            device,
            rotary_dim=rd,
            neox=neox,
            permuted=i % 2 == 1,
            seed=i,
        )
        name = f"{str(dtype)[6:]} D{d} H{hq}/{hkv} rd{rd} {'neox' if neox else 'gptj'}"
        name += f" S{s} W{w} splits={splits or 'auto'}"
        checks.append(
            check_against_torch(
                name,
                inputs,
                Tiles(num_kv_splits=splits),
                tols[dtype],
                torch_path,
                triton_path,
            )
        )
    if not tiny:
        for q_len in (1, 2048):
            reqs = steady_requests(16 if q_len == 1 else 1, q_len, 4, 1024)
            inputs = make_batch(reqs, 32, 8, 128, 4, 1024, torch.bfloat16, device)
            checks.append(
                check_against_torch(
                    f"llama-7b-like bf16 W1024 q_len={q_len}",
                    inputs,
                    None,
                    1e-2,
                    torch_path,
                    triton_path,
                )
            )
    return checks


def cuda_graph_check(device: torch.device, triton_path) -> Check:
    """A captured decode step (split-KV, partials in a preallocated workspace,
    as the backend's builder gives it) replays to the eager result."""
    reqs = steady_requests(4, 1, 4, 1024)
    inputs = make_batch(reqs, 32, 8, 128, 4, 1024, torch.bfloat16, device)
    floats = triton_path.workspace_floats(32, 8, 128, device)
    workspace = torch.empty(floats, dtype=torch.float32, device=device)

    def step(out: torch.Tensor) -> None:
        triton_path.sink_attention_triton(inputs, out, workspace=workspace)

    eager = torch.zeros_like(inputs.query)
    step(eager)
    out = torch.zeros_like(inputs.query)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch advises
        step(out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return Check("cuda graph replay == eager", rel_err(out, eager), 1e-6, True)


# ---------------------------------------------------------------------- speed


@dataclass
class Timer:
    """Median time of ``fn`` in ms: CUDA events on GPU, wall clock on CPU."""

    device: torch.device
    reps: int
    warmup: int
    flush: torch.Tensor | None = None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = []
        for _ in range(self.reps):
            if self.flush is not None:
                self.flush.zero_()  # evict L2 so KV reads come from HBM
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_rate(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Device-to-device copy rate, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


@dataclass
class Row:
    kind: str
    batch: int
    window: int
    q_len: int
    kv_bytes: int
    flops: float
    triton_ms: float
    no_rope_ms: float
    sdpa_ms: float
    sdpa_note: str
    copy_bytes_per_s: float
    sweep: dict[str, float] = field(default_factory=dict)

    @property
    def kv_bytes_per_s(self) -> float:
        return self.kv_bytes / (self.triton_ms * 1e-3)

    @property
    def copy_fraction(self) -> float:
        return self.kv_bytes_per_s / self.copy_bytes_per_s

    def line(self) -> str:
        gbs = self.kv_bytes_per_s / 1e9
        tflops = self.flops / (self.triton_ms * 1e-3) / 1e12
        return (
            f"{self.kind:7} B={self.batch:<4d} W={self.window:<5d} q={self.q_len:<5d}"
            f" triton {self.triton_ms:9.4f} ms {gbs:8.1f} GB/s"
            f" ({100 * self.copy_fraction:5.1f}% of copy) {tflops:7.2f} TFLOP/s"
            f" | no-rope {self.no_rope_ms:9.4f} ms"
            f" | sdpa {self.sdpa_ms:9.4f} ms ({self.sdpa_note})"
        )


def sdpa_fn(shape: Shape, batch: int, q_len: int, keys: int, device) -> tuple:
    """SDPA on contiguous K/V: every query sees ``keys`` keys, like sink attention."""
    F = torch.nn.functional
    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_size
    q = torch.randn(batch, hq, q_len, d, device=device, dtype=shape.dtype)
    k = torch.randn(batch, hkv, keys, d, device=device, dtype=shape.dtype)
    v = torch.randn_like(k)
    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), "gqa"
    except (TypeError, RuntimeError):
        group = hq // hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return (lambda: F.scaled_dot_product_attention(q, k, v)), "K/V expanded"


def sweep_tiles(triton_path, q_len: int) -> list:
    Tiles = triton_path.TritonTiles
    variants = []
    for block_n in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3):
                variants.append(
                    Tiles(block_n=block_n, num_warps=warps, num_stages=stages)
                )
    if q_len == 1:
        variants += [Tiles(num_kv_splits=s) for s in (1, 4, 16, 64)]
    return variants


def time_row(
    shape: Shape,
    batch_size: int,
    window: int,
    q_len: int,
    timer: Timer,
    rate: float,
    triton_path,
    sweep: bool,
) -> Row:
    device = timer.device
    sink, span = shape.sink, shape.sink + window
    reqs = steady_requests(batch_size, q_len, sink, window)
    inputs = make_batch(
        reqs,
        shape.num_heads,
        shape.num_kv_heads,
        shape.head_size,
        sink,
        window,
        shape.dtype,
        device,
        block_size=shape.block_size,
    )
    out = torch.empty_like(inputs.query)

    def run(rotary: bool = True, tiles=None) -> Callable[[], object]:
        call = inputs if rotary else without_rotary(inputs)
        return lambda: triton_path.sink_attention_triton(call, out, tiles=tiles)

    elem = inputs.kv_cache.element_size()
    keys = span if q_len == 1 else span + q_len - 1  # unique keys read per request
    kv_bytes = batch_size * shape.num_kv_heads * keys * 2 * shape.head_size * elem
    flops = 4.0 * batch_size * q_len * span * shape.head_size * shape.num_heads
    triton_ms = timer(run())
    no_rope_ms = timer(run(rotary=False))
    fn, note = sdpa_fn(shape, batch_size, q_len, span, device)
    sdpa_ms = timer(fn)
    row = Row(
        "decode" if q_len == 1 else "prefill",
        batch_size,
        window,
        q_len,
        kv_bytes,
        flops,
        triton_ms,
        no_rope_ms,
        sdpa_ms,
        note,
        rate,
    )
    if sweep:
        for tiles in sweep_tiles(triton_path, q_len):
            label = ",".join(f"{k}={v}" for k, v in asdict(tiles).items() if v)
            try:
                row.sweep[label] = timer(run(tiles=tiles))
            except Exception as exc:  # e.g. out of shared memory
                row.sweep[label] = float("nan")
                print(f"  sweep {label}: {type(exc).__name__}: {exc}"[:200])
    return row


def speed(shape: Shape, device: torch.device, tiny: bool, sweep: bool, triton_path):
    cuda = device.type == "cuda"
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if cuda else None
    timer = Timer(device, reps=3 if tiny else 30, warmup=1 if tiny else 5, flush=flush)
    rate = copy_rate(device, timer, (64 << 20) if tiny else (2 << 30))
    print(f"device-to-device copy: {rate / 1e9:.1f} GB/s (read + write)")
    rows = []
    plan = [(b, w, 1) for w in shape.windows for b in shape.batches]
    plan += [(1, w, shape.prefill_chunk) for w in shape.windows]
    sweep_rows = {(16, 2048, 1), (256, 2048, 1), (1, 2048, shape.prefill_chunk)}
    for b, w, q in plan:
        do_sweep = sweep and (b, w, q) in sweep_rows
        row = time_row(shape, b, w, q, timer, rate, triton_path, do_sweep)
        if cuda:
            torch.cuda.empty_cache()  # the row's inputs are gone; free them
        print(row.line(), flush=True)
        for label, ms in sorted(row.sweep.items(), key=lambda x: x[1]):
            print(f"    sweep {ms:9.4f} ms  {label}")
        rows.append(row)
    return rate, rows


# ------------------------------------------------------------ time estimate


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures (NVIDIA H100 Tensor Core GPU datasheet, PCIe card: the
    slower H100) and the pessimistic assumptions the estimate makes."""

    name: str = "H100 PCIe"
    hbm_bytes_per_s: float = 2.0e12  # SXM: 3.35e12
    bf16_flops: float = 756e12  # dense; SXM: 989e12
    efficiency: float = 0.25  # share of either peak a timed call reaches, at worst
    min_call_s: float = 20e-6  # launch + split/merge floor of one call
    compile_s: float = 4.0  # one Triton specialization (JIT on the host)
    startup_s: float = 30.0  # import torch/Triton, CUDA context, correctness inputs


GPU_COMMAND = "python3 benchmarks/gpu_kernel_check.py --json benchmarks/gpu_kernel.json"
GPU_LIMIT_S = 480  # the device tool allows 600 s a call; leave room for a rerun


def estimate(shape: Shape, sweep: bool, gpu: GpuSpec = GpuSpec()) -> dict:
    """Seconds the full run should take on ``gpu``, by part.

    A timed call costs ``max(bytes / (eff * HBM), flops / (eff * peak),
    min_call)``; each row times three functions (kernel, kernel without rotary,
    SDPA) ``warmup + reps`` times, flushing L2 (a 256 MiB write) before each
    timed rep. Compiles: one per Triton specialization (kernel + merge per
    correctness config, per speed kind and rotary on/off, per sweep variant).
    """
    timer = Timer(torch.device("cuda"), reps=30, warmup=5)
    calls = 3 * (timer.warmup + timer.reps)
    flush_s = timer.reps * 3 * (256 << 20) / (gpu.efficiency * gpu.hbm_bytes_per_s)
    eff_bw = gpu.efficiency * gpu.hbm_bytes_per_s
    eff_flops = gpu.efficiency * gpu.bf16_flops
    elem = torch.tensor([], dtype=shape.dtype).element_size()
    timing_s, sweep_calls = 0.0, 0
    plan = [(b, w, 1) for w in shape.windows for b in shape.batches]
    plan += [(1, w, shape.prefill_chunk) for w in shape.windows]
    for batch, window, q_len in plan:
        span = shape.sink + window
        keys = span if q_len == 1 else span + q_len - 1
        kv_bytes = batch * shape.num_kv_heads * keys * 2 * shape.head_size * elem
        flops = 4.0 * batch * q_len * span * shape.head_size * shape.num_heads
        call_s = max(kv_bytes / eff_bw, flops / eff_flops, gpu.min_call_s)
        timing_s += calls * call_s + flush_s
        if sweep and window == 2048 and batch in (16, 256, 1):
            sweep_calls += 16 if q_len == 1 else 12
    per_sweep = (timer.warmup + timer.reps) * 2 * gpu.min_call_s + flush_s / 3
    compiles = 2 * 9 + 2 * 2 * 2 + 1 + (sweep_calls if sweep else 0)
    parts = {
        "start-up": gpu.startup_s,
        "Triton compiles": compiles * gpu.compile_s,
        "timed calls + L2 flushes": timing_s,
        "sweep": sweep_calls * (per_sweep + 0.01),
    }
    return {**parts, "total": sum(parts.values())}


def print_gpu_plan(shape: Shape, sweep: bool) -> float:
    parts = estimate(shape, sweep)
    gpu = GpuSpec()
    print(f"GPU command: timeout {GPU_LIMIT_S} {GPU_COMMAND}" + (" --sweep" * sweep))
    print(
        f"GPU time limit: {GPU_LIMIT_S} s (estimated {parts['total']:.0f} s on an "
        f"{gpu.name}, pessimistic: {gpu.efficiency:.0%} of HBM and bf16 peak)"
    )
    for name, seconds in parts.items():
        print(f"  {name:26} {seconds:7.1f} s")
    return parts["total"]


# ----------------------------------------------------------------------- main


def summary(checks: list[Check], rows: list[Row], rate: float) -> str:
    lines = ["", "SUMMARY"]
    for c in checks:
        status = "ok  " if c.ok else "FAIL"
        lines.append(f"  {status} {c.name}: rel err {c.error:.2e} (< {c.tol:g})")
    lines.append(f"  copy rate {rate / 1e9:.1f} GB/s (read + write)")
    header = (
        f"  {'kind':7} {'B':>4} {'W':>5} {'q':>5} {'triton ms':>10} {'GB/s':>8}"
        f" {'%copy':>6} {'TFLOP/s':>8} {'no-rope ms':>10} {'rope cost':>9}"
        f" {'sdpa ms':>9} {'vs sdpa':>7}"
    )
    lines.append(header)
    for r in rows:
        lines.append(
            f"  {r.kind:7} {r.batch:4d} {r.window:5d} {r.q_len:5d}"
            f" {r.triton_ms:10.4f} {r.kv_bytes_per_s / 1e9:8.1f}"
            f" {100 * r.copy_fraction:5.1f}% {r.flops / r.triton_ms / 1e9:8.2f}"
            f" {r.no_rope_ms:10.4f} {r.triton_ms / r.no_rope_ms:8.2f}x"
            f" {r.sdpa_ms:9.4f} {r.triton_ms / r.sdpa_ms:6.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny CPU/CI run")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--sweep", action="store_true", help="time tile variants")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--estimate", action="store_true", help="print the GPU plan and exit"
    )
    args = parser.parse_args(argv)
    print_gpu_plan(FULL, args.sweep)
    if args.estimate:
        return 0

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.tiny:
            parser.error("no CUDA device: use --tiny (CPU, Triton interpreter)")
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined
    device = torch.device("cuda" if cuda else "cpu")
    # Imported only now: Triton reads TRITON_INTERPRET when a kernel is defined.
    torch_path = importlib.import_module("vllm_sink.attention.torch_path")
    triton_path = importlib.import_module("vllm_sink.attention.triton_path")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}")

    checks = correctness(device, args.tiny, torch_path, triton_path)
    if cuda:
        checks.append(cuda_graph_check(device, triton_path))
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: rel err {c.error:.2e}")

    rate, rows = 0.0, []
    if not args.skip_speed:
        shape = TINY if args.tiny else FULL
        rate, rows = speed(shape, device, args.tiny, args.sweep, triton_path)
    print(summary(checks, rows, rate))
    if args.json:
        payload = {
            "device": name,
            "torch": torch.__version__,
            "copy_bytes_per_s": rate,
            "checks": [{**asdict(c), "ok": c.ok} for c in checks],
            "rows": [
                {
                    **asdict(r),
                    "kv_bytes_per_s": r.kv_bytes_per_s,
                    "copy_fraction": r.copy_fraction,
                }
                for r in rows
            ],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
