"""One prefill step's attention, sink path vs vLLM's CPU kernel, per layer (issue 22).

    python benchmarks/prefill_attention.py [--layout 1000,1000,48] [--reps 15]
        [--profile] [--json F]

No engine: a random paged KV cache with SmolLM2-135M's shapes (9 query heads,
3 KV heads, head_dim 64, block 32, fp32) and one layer's queries of one
engine step. ``--layout`` lists the queries of each request in the step and
``--context`` the tokens each request had before it (a later chunk of a long
prompt has context > 0). Timed side by side, interleaved, median of
``--reps``:

- ``plain``: vLLM's ``cpu_attention_with_kv_cache`` (causal, all keys) plus
  its rotary op on q and k, i.e. what one plain vLLM layer does;
- ``sink tile=N``: ``vllm_sink.attention.torch_path.sink_attention`` with
  ``QUERY_TILE = N`` (256 is the shipped value);
- ``proto-sdpa``: prototype, one SDPA call per tile over [q_win | q_sink]
  (:func:`sdpa_sink_attention`);
- ``proto-once``: prototype of the recommended torch-level rewrite, keys and
  queries gathered and rotated once per request per step
  (:func:`once_sink_attention`); both are checked against the shipped path.

``--profile`` prints torch.profiler's op table for the shipped sink path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HQ, HKV, D, BS = 9, 3, 64, 32


def rope_table(rows: int, dim: int = D, theta: float = 1e5) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    ang = torch.arange(rows).float()[:, None] * inv[None]
    return torch.cat((ang.cos(), ang.sin()), dim=-1)


class Step:
    """A paged KV cache and one step's queries (all requests' tokens)."""

    def __init__(self, layout: list[int], context: list[int], sink: int, window: int):
        torch.manual_seed(0)
        self.layout, self.context = layout, context
        self.sink, self.window = sink, window
        seq = [c + q for c, q in zip(context, layout)]
        blocks = [math.ceil(s / BS) for s in seq]
        num_blocks = sum(blocks) + 1
        self.kv_cache = torch.randn(num_blocks, HKV, BS, 2 * D)
        perm = torch.randperm(num_blocks - 1) + 1  # scattered, like a real pool
        self.block_table = torch.zeros(len(seq), max(blocks), dtype=torch.int32)
        i = 0
        for r, n in enumerate(blocks):
            self.block_table[r, :n] = perm[i : i + n].int()
            i += n
        self.query = torch.randn(sum(layout), HQ, D)
        self.key = torch.randn(sum(layout), HKV, D)
        self.value = torch.randn(sum(layout), HKV, D)
        self.qsl = torch.tensor([0, *torch.tensor(layout).cumsum(0).tolist()]).int()
        self.seq_lens = torch.tensor(seq, dtype=torch.int32)
        self.positions = torch.cat(
            [torch.arange(c, c + q) for c, q in zip(context, layout)]
        )
        self.table = rope_table(sink + window)
        self.long_table = rope_table(max(seq) + 1)
        self.scale = D**-0.5
        slots = []
        for r, (c, q) in enumerate(zip(context, layout)):
            pos = torch.arange(c, c + q)
            slots.append(self.block_table[r, pos // BS].long() * BS + pos % BS)
        self.slot_mapping = torch.cat(slots)


def run_sink(step: Step, tile: int) -> torch.Tensor:
    from vllm_sink.attention import cpu_kernel, torch_path

    torch_path.QUERY_TILE = tile
    if not cpu_kernel.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping):
        torch_path.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping)
    from vllm_sink.attention.inputs import (
        BatchLayout,
        RopeTable,
        SinkAttentionInputs,
        SinkVariant,
    )

    out = torch.empty_like(step.query)
    plan = torch_path.plan_batch(step.qsl, step.seq_lens)
    inputs = SinkAttentionInputs(
        query=step.query,
        kv_cache=step.kv_cache,
        layout=BatchLayout(step.qsl, step.seq_lens, step.block_table, plan=plan),
        rope=RopeTable(step.table, D, True),
        variant=SinkVariant(step.sink, step.window),
        scale=step.scale,
    )
    torch_path.sink_attention(inputs, out, compiled_decode=True)
    return out


class Plain:
    """vLLM's CPU_ATTN for the same step: rotary op, KV write, attention."""

    def __init__(self, step: Step) -> None:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops, self.step = ops, step
        self.isa = _get_attn_isa(torch.float32, BS, D, "auto")
        self.meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(step.layout),
            num_heads=HQ,
            num_kv_heads=HKV,
            head_dim=D,
            seq_lens=step.seq_lens,
            dtype=torch.float32,
            query_start_loc=step.qsl,
            causal=True,
            sliding_window_size=-1,
            isa=self.isa,
            enable_kv_split=False,
        )

    def __call__(self) -> torch.Tensor:
        s, ops = self.step, self.ops
        q, k = s.query.clone(), s.key.clone()
        ops.rotary_embedding(s.positions, q, k, D, s.long_table, True)
        nb = s.kv_cache.shape[0]
        kv = s.kv_cache.view(nb, HKV, BS * 2, D)
        kc, vc = kv.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, s.value, kc, vc, s.slot_mapping, self.isa)
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=kc,
            value_cache=vc,
            output=out,
            query_start_loc=s.qsl,
            seq_lens=s.seq_lens,
            scale=s.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=s.block_table,
            softcap=0.0,
            scheduler_metadata=self.meta,
            s_aux=None,
        )
        return out


def _rot(x: torch.Tensor, pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Neox rotation of x [N, H, D] by pos [N] (may be negative)."""
    cs = table[pos.abs()]
    cos, sin = cs.chunk(2, dim=-1)
    sin = sin * torch.where(pos < 0, -1.0, 1.0)[:, None]
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * sin


def sdpa_sink_attention(step: Step, tile: int | None = None) -> torch.Tensor:
    """Prototype: per request, gather the chunk's sink + window keys once and
    run one SDPA per tile over [q_win | q_sink] . [k_win | 0] / [0 | k_sink]
    (head dim 2D: the two query rotations become one score matmul, sink and
    window scores come out of one fused, masked softmax)."""
    from vllm_sink.attention import cpu_kernel, torch_path

    if not cpu_kernel.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping):
        torch_path.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping)
    sink, window = step.sink, step.window
    span = sink + window
    tile = tile or span
    out = torch.empty_like(step.query)
    starts = step.qsl.tolist()
    for r, (ctx, nq) in enumerate(zip(step.context, step.layout)):
        row = step.block_table[r].long()
        first_all, last_all = ctx, ctx + nq - 1
        # every key any query of this chunk reads, gathered once per request
        lo_key = max(sink, first_all - window + 1)
        keys = torch.arange(lo_key, last_all + 1)
        kv = step.kv_cache[row[keys // BS], :, keys % BS]  # [K, Hkv, 2D]
        sink_pos = torch.arange(min(sink, last_all + 1))
        skv = step.kv_cache[row[sink_pos // BS], :, sink_pos % BS]
        k_sink = _rot(skv[..., :D], sink_pos, step.table)
        v_all = torch.cat((skv[..., D:], kv[..., D:]), 0).permute(1, 0, 2)
        zs = torch.zeros(len(sink_pos), HKV, D)
        for a in range(0, nq, tile):
            b = min(a + tile, nq)
            t = torch.arange(ctx + a, ctx + b)
            base = max(0, int(t[-1]) - (span - 1))
            k_lo = max(sink, int(t[0]) - window + 1)
            sel = slice(k_lo - lo_key, int(t[-1]) + 1 - lo_key)
            win_pos = keys[sel]
            k_win = _rot(kv[sel, :, :D], win_pos - base, step.table)
            zw = torch.zeros(len(win_pos), HKV, D)
            k2 = torch.cat((torch.cat((zs, k_sink), -1), torch.cat((k_win, zw), -1)))
            q = step.query[starts[r] + a : starts[r] + b]
            q2 = torch.cat(
                (
                    _rot(q, t - base, step.table),
                    _rot(q, t.clamp(max=span - 1), step.table),
                ),
                -1,
            )
            ws = (t - window + 1).clamp(min=sink)[:, None]
            mask = torch.cat(
                (
                    sink_pos[None] <= t[:, None],
                    (win_pos[None] >= ws) & (win_pos[None] <= t[:, None]),
                ),
                -1,
            )
            v = torch.cat(
                (v_all[:, : len(sink_pos)], v_all[:, len(sink_pos) :][:, sel]), 1
            )
            o = F.scaled_dot_product_attention(
                q2.transpose(0, 1),
                k2.transpose(0, 1),
                v,
                attn_mask=mask,
                scale=step.scale,
                enable_gqa=True,
            )
            out[starts[r] + a : starts[r] + b] = o.transpose(0, 1)
    return out


def once_sink_attention(step: Step, tile: int | None = None) -> torch.Tensor:
    """Prototype: per request, gather and rotate the chunk's keys ONCE and
    both query rotations ONCE (one base per request, so the rotary table must
    cover chunk + S + W positions: ``step.long_table`` here; vllm_sink would
    extend its S+W table by angle addition), then per query tile only slice,
    mask and call ``torch_path._attend``."""
    from vllm_sink.attention import cpu_kernel, torch_path

    if not cpu_kernel.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping):
        torch_path.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping)
    sink, window = step.sink, step.window
    span = sink + window
    tile = tile or span
    from vllm_sink.attention.inputs import RopeTable

    rope = RopeTable(step.long_table, D, True)
    out = torch.empty_like(step.query)
    starts = step.qsl.tolist()
    for r, (ctx, nq) in enumerate(zip(step.context, step.layout)):
        row = step.block_table[r].long()
        last_all = ctx + nq - 1
        lo_key = max(sink, ctx - window + 1)
        base = lo_key  # every rotated position is >= 0
        keys = torch.arange(lo_key, last_all + 1)
        kv = step.kv_cache[row[keys // BS], :, keys % BS]  # [K, Hkv, 2D]
        k_win, v_win = kv[..., :D], kv[..., D:]
        k_win = torch_path.rotate(k_win, keys - base, rope)
        sink_pos = torch.arange(min(sink, last_all + 1))
        skv = step.kv_cache[row[sink_pos // BS], :, sink_pos % BS]
        k_sink = torch_path.rotate(skv[..., :D], sink_pos, rope)
        t_all = torch.arange(ctx, last_all + 1)
        q = step.query[starts[r] : starts[r] + nq].view(nq, HKV, -1, D)
        q_win = torch_path.rotate(q, (t_all - base)[:, None], rope)
        q_sink = torch_path.rotate(q, t_all.clamp(max=span - 1)[:, None], rope)
        for a in range(0, nq, tile):
            b = min(a + tile, nq)
            t = t_all[a:b]
            k_lo = max(sink, ctx + a - window + 1) - lo_key
            k_hi = ctx + b - lo_key
            win_pos = keys[k_lo:k_hi]
            ws = (t - window + 1).clamp(min=sink)[:, None]
            mask = torch.cat(
                (
                    sink_pos[None] <= t[:, None],
                    (win_pos[None] >= ws) & (win_pos[None] <= t[:, None]),
                ),
                -1,
            )
            v = torch.cat((skv[..., D:], v_win[k_lo:k_hi]), 0)
            o = torch_path._attend(
                q_sink[a:b][None],
                q_win[a:b][None],
                k_sink[None],
                k_win[k_lo:k_hi][None],
                v[None],
                mask[None],
                step.scale,
            )
            out[starts[r] + a : starts[r] + b] = o[0].flatten(1, 2)
    return out


class LeanTables:
    """Per-step tables a lean torch path would build once (in the metadata
    builder / BatchPlan) and share across layers: full-width signed cos/sin
    indexed by ``position + S + W``, so a rotation is 2 gathers + 4 ops."""

    def __init__(self, table: torch.Tensor) -> None:
        span = table.shape[0]
        cos, sin = table.float().chunk(2, dim=-1)
        pos_cos = torch.cat((cos, cos), -1)
        pos_sin = torch.cat((-sin, sin), -1)
        # rows p + span for p in (-span, span): cos(-p) = cos(p), sin(-p) = -sin(p)
        self.cos = torch.cat((pos_cos.flip(0)[:-1], pos_cos))
        self.sin = torch.cat((-pos_sin.flip(0)[:-1], pos_sin))
        self.offset = span - 1

    def rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [N, ..., D] rotated by pos [N] (neox, full rotary_dim)."""
        shape = (pos.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        c = self.cos[pos + self.offset].view(shape)
        s = self.sin[pos + self.offset].view(shape)
        half = x.shape[-1] // 2
        return torch.addcmul(x * c, torch.cat((x[..., half:], x[..., :half]), -1), s)


def lean_sink_attention(step: Step, tile: int = 256) -> torch.Tensor:
    """Prototype of the torch-level fixes: same tiles as the shipped path, but
    scale folded into q, full-width rotations from a per-step table, sink keys
    rotated once per request, the window mask as one additive bias shared by
    every full tile, one matmul for [sink | window] scores (sink keys
    prepended to the window keys, with q_sink's scores taken from a second,
    4-column matmul), in-place softmax."""
    from vllm_sink.attention import cpu_kernel, torch_path

    if not cpu_kernel.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping):
        torch_path.write_kv(step.key, step.value, step.kv_cache, step.slot_mapping)
    sink, window = step.sink, step.window
    span = sink + window
    tile = min(tile, span)
    lt = LeanTables(step.table)
    out = torch.empty_like(step.query)
    starts = step.qsl.tolist()
    g = HQ // HKV
    for r, (ctx, nq) in enumerate(zip(step.context, step.layout)):
        row = step.block_table[r].long()
        sink_pos = torch.arange(min(sink, ctx + nq))
        skv = step.kv_cache[row[sink_pos // BS], :, sink_pos % BS]
        k_sink = lt.rotate(skv[..., :D], sink_pos).permute(1, 2, 0)  # [Hkv, D, Ks]
        v_sink = skv[..., D:].permute(1, 0, 2)  # [Hkv, Ks, D]
        q_all = step.query[starts[r] : starts[r] + nq] * step.scale
        for a in range(0, nq, tile):
            b = min(a + tile, nq)
            first, last = ctx + a, ctx + b - 1
            base = max(0, last - (span - 1))
            t = torch.arange(first, last + 1)
            k_lo = max(sink, first - window + 1)
            win_pos = torch.arange(k_lo, last + 1)
            kv = step.kv_cache[row[win_pos // BS], :, win_pos % BS]
            k_win = lt.rotate(kv[..., :D], win_pos - base).permute(1, 2, 0)
            q = q_all[a:b].view(b - a, HKV, g, D)
            q_win = lt.rotate(q, t - base).permute(1, 2, 0, 3).reshape(HKV, -1, D)
            q_sink = lt.rotate(q, t.clamp(max=span - 1))
            q_sink = q_sink.permute(1, 2, 0, 3).reshape(HKV, -1, D)
            scores = torch.cat((q_sink @ k_sink, q_win @ k_win), -1)
            d = t[:, None] - torch.cat((sink_pos, win_pos))[None]  # [Q, K]
            bias = torch.zeros(d.shape).masked_fill_(d < 0, float("-inf"))
            bias[:, len(sink_pos) :].masked_fill_(
                d[:, len(sink_pos) :] >= window, float("-inf")
            )
            scores = scores.view(HKV, g, b - a, -1).add_(bias).softmax(-1)
            v = torch.cat((v_sink, kv[..., D:].permute(1, 0, 2)), 1)  # [Hkv, K, D]
            o = scores.view(HKV, -1, scores.shape[-1]) @ v  # [Hkv, G*Q, D]
            out[starts[r] + a : starts[r] + b] = (
                o.view(HKV, g, b - a, D).permute(2, 0, 1, 3).reshape(b - a, HQ, D)
            )
    return out


def bench(fns: dict, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="1000,1000,48")
    parser.add_argument("--context", default=None, help="default: 0 for each")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--tiles", default="256,512,1024")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    layout = [int(x) for x in args.layout.split(",")]
    context = (
        [int(x) for x in args.context.split(",")] if args.context else [0] * len(layout)
    )
    step = Step(layout, context, args.sink, args.window)
    print(
        f"threads {torch.get_num_threads()}, layout {layout}, context {context}, "
        f"S={args.sink} W={args.window}",
        flush=True,
    )
    plain = Plain(step)
    ref = run_sink(step, 256)
    proto = sdpa_sink_attention(step)
    err = float((proto - ref).abs().max())
    print(f"proto-sdpa vs shipped sink path: max abs diff {err:.2e}")
    err_once = float((once_sink_attention(step) - ref).abs().max())
    print(f"proto-once vs shipped sink path: max abs diff {err_once:.2e}")
    err_lean = float((lean_sink_attention(step) - ref).abs().max())
    print(f"proto-lean vs shipped sink path: max abs diff {err_lean:.2e}")
    if max(c + q for c, q in zip(context, layout)) <= args.sink + args.window:
        err_plain = float((plain() - ref).abs().max())
        # Not expected to be ~0: the CPU kernel keeps its own (ISA-specific)
        # layout inside the cache blocks; ``plain`` is here for timing only.
        print(f"plain vs sink (timing reference only): max abs diff {err_plain:.2e}")
    fns = {"plain": plain}
    for t in (int(x) for x in args.tiles.split(",")):
        fns[f"sink tile={t}"] = lambda t=t: run_sink(step, t)
    fns["proto-sdpa"] = lambda: sdpa_sink_attention(step)
    fns["proto-once"] = lambda: once_sink_attention(step)
    fns["proto-once t=256"] = lambda: once_sink_attention(step, 256)
    fns["proto-lean"] = lambda: lean_sink_attention(step)
    times = bench(fns, args.reps)
    base = statistics.median(times["plain"])
    print(f"{'path':16s} {'median ms':>10s} {'vs plain':>9s}   (one layer, one step)")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:16s} {m:10.2f} {m / base:8.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run_sink(step, 256)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": None},
                    "times_ms": times,
                    "proto_max_abs_diff": err,
                    "once_max_abs_diff": err_once,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
