"""Speed and memory of sink mode against the baselines users would pick instead.

    python benchmarks/throughput.py [--model tiny|smollm2|DIR] [--window 1024]
        [--lengths 1024,4096,16384,65536] [--streams 1,8,32] [--json F] [--png F]

All rows are measured side by side in one run (machines are shared and noisy):

1. Per-token decode time and KV blocks held at stream length N: sink mode
   (the stream is brought to N by streaming a prompt through, then decoded),
   plain vLLM dense attention (up to --dense-max, as its KV and O(N) attention
   allow), and sliding window with re-computation (each token re-prefills its
   last W tokens; independent of N).
2. Aggregate decode throughput of 1/8/32 concurrent sink streams, each at
   --stream-len tokens, against a HF transformers token-at-a-time loop with a
   sink+window cache at batch 1 (tests/oracle.py, the pre-paged approach).
3. Overhead: sink mode vs plain vLLM on streams shorter than S+W.
4. Prefill (``--only prefill``, issue 22): prompt tokens per second of plain
   vLLM and sink mode (same S+W) on prompts of --prefill-lengths tokens,
   --prefill-batches prompts at once, with vLLM's default chunk
   (max_num_batched_tokens) and with --prefill-chunks; engines of both kinds
   stay up and every (length, batch) alternates plain / sink, --prefill-reps
   times. Dense runs while the prompt fits the model's context.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DECODE_STEPS = 48


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--lengths", default="1024,4096,16384,65536")
    parser.add_argument("--dense-max", type=int, default=16384)
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--stream-len", type=int, default=16384)
    parser.add_argument(
        "--reps", type=int, default=3, help="interleaved repeats of each length"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--only", default="decode,concurrency,overhead,prefill")
    parser.add_argument("--prefill-lengths", default="512,1024,4096,8192,16384")
    parser.add_argument("--prefill-batches", default="1,4")
    parser.add_argument(
        "--prefill-chunks",
        default="default,2048",
        help="max_num_batched_tokens per engine pair; 'default' is vLLM's",
    )
    parser.add_argument("--prefill-reps", type=int, default=2)
    parser.add_argument(
        "--prefill-max-tokens",
        type=int,
        default=65536,
        help="skip (length, batch) pairs with more prompt tokens than this",
    )
    return parser.parse_args(argv)


def model_path(name: str) -> str:
    """A model dir; tiny gets a long context so dense vLLM can run long too."""
    if name == "tiny":
        from vllm_sink.tiny_models import make_tiny_model

        return make_tiny_model("llama", max_position_embeddings=131072)
    if name == "smollm2":
        from vllm_sink.smollm2 import smollm2_path

        return smollm2_path()
    return name


def engine(model: str, args, sink: bool, max_model_len: int, **kw):
    from vllm import LLM

    extra = {}
    if sink:
        extra = {"attention_sink": {"sink": args.sink, "window": args.window}}
    options = dict(
        dtype=args.dtype,
        enforce_eager=True,
        block_size=32,
        max_model_len=max_model_len,
        max_num_batched_tokens=4096,
        max_num_seqs=64,
        enable_prefix_caching=False,
        additional_config=extra,
    )
    options.update(kw)
    return LLM(model, **options)


def prompt_of(length: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + salt * 104729) % 250 + 3 for i in range(length)]


def decode_time(
    llm, prompts: list[list[int]], steps: int = DECODE_STEPS, max_tokens: int = 4096
) -> dict:
    """Median time of ``steps`` engine steps in which every stream decodes (ms).

    Streams are prefilled first (prefill steps are not timed), then ``steps``
    steps are timed, then the requests are aborted. Detokenization is off: it
    costs the same with or without sink mode, and on the tiny model's byte
    vocabulary the random prompts are not UTF-8, which makes vLLM's incremental
    detokenizer slower as the prompt grows.
    """
    from vllm import SamplingParams

    from vllm_sink.demo import blocks_in_use

    engine_ = llm.llm_engine
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False
    )
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine_.add_request(rid, {"prompt_token_ids": p}, params)
    generated = dict.fromkeys(ids, 0)
    while min(generated.values()) < 2:  # prefill everything
        for out in engine_.step():
            generated[out.request_id] = len(out.outputs[0].token_ids)
    step_times, blocks = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = engine_.step()
        step_times.append(time.perf_counter() - t0)
        assert len(outs) == len(prompts), "a stream stopped decoding"
        blocks = max(blocks, blocks_in_use(llm))
    engine_.abort_request(ids)
    while engine_.has_unfinished_requests():
        engine_.step()
    median = statistics.median(step_times)
    return {
        "step_ms": 1000 * median,
        "tok_s": len(prompts) / median,
        "kv_blocks": blocks,
    }


def recompute_time(llm, window: int, repeats: int = 12) -> dict:
    """Sliding window with re-computation: one token = a prefill of W tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    prompt = {"prompt_token_ids": prompt_of(window)}
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return {"step_ms": 1000 * statistics.median(times)}


def shutdown(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def interleaved(llm, lengths: list[int], reps: int, **kw) -> dict[int, dict]:
    """decode_time at each length, the lengths interleaved ``reps`` times.

    Machines drift; running 1k, 4k, 16k, 64k, 1k, 4k, ... and taking each
    length's median step time keeps a slow minute from landing on one length.
    """
    runs: dict[int, list[dict]] = {n: [] for n in lengths}
    for rep in range(reps):
        for n in lengths:
            runs[n].append(decode_time(llm, [prompt_of(n, salt=rep)], **kw))
    result = {}
    for n, rs in runs.items():
        times = [r["step_ms"] for r in rs]
        median = statistics.median(times)
        result[n] = {
            "step_ms": median,
            "tok_s": 1000 / median,
            "kv_blocks": max(r["kv_blocks"] for r in rs),
            "step_ms_reps": times,
        }
    return result


def bench_decode(model: str, args, rows: list[dict]) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(lengths) + 2 * DECODE_STEPS
    llm = engine(model, args, sink=True, max_model_len=min(longest, 32768))
    for n, r in interleaved(llm, lengths, args.reps).items():
        rows.append({"bench": "decode", "method": "sink", "length": n, **r})
        print(
            f"decode  sink      N={n:6d}  {r['step_ms']:7.2f} ms/token  "
            f"{r['kv_blocks']:5d} blocks  (reps {fmt_reps(r)})",
            flush=True,
        )
    shutdown(llm)
    dense_lengths = [n for n in lengths if n <= args.dense_max]
    if dense_lengths:
        llm = engine(model, args, sink=False, max_model_len=max(dense_lengths) + 128)
        results = interleaved(
            llm, dense_lengths, args.reps, max_tokens=DECODE_STEPS + 16
        )
        for n, r in results.items():
            rows.append({"bench": "decode", "method": "dense", "length": n, **r})
            print(
                f"decode  dense     N={n:6d}  {r['step_ms']:7.2f} ms/token  "
                f"{r['kv_blocks']:5d} blocks  (reps {fmt_reps(r)})",
                flush=True,
            )
        r = recompute_time(llm, args.sink + args.window)
        for n in lengths:
            rows.append({"bench": "decode", "method": "recompute", "length": n, **r})
        print(
            f"decode  recompute W={args.sink + args.window}  "
            f"{r['step_ms']:7.2f} ms/token",
            flush=True,
        )
        shutdown(llm)


def fmt_reps(r: dict) -> str:
    return " ".join(f"{t:.2f}" for t in r["step_ms_reps"])


def hf_loop_tok_s(model: str, args, tokens: int = 200) -> float:
    """HF token-at-a-time loop with a sink+window cache (batch 1), own process."""
    code = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "tests")!r})
import torch
from oracle import SinkOracle
oracle = SinkOracle({model!r}, {args.sink}, {args.window},
                    dtype=getattr(torch, {args.dtype!r}), num_threads=None)
stream = oracle.stream()
for t in range({args.sink + args.window}):
    stream.feed(t % 250 + 3)
t0 = time.perf_counter()
for t in range({tokens}):
    stream.feed(t % 250 + 3)
print("TOKS", {tokens} / (time.perf_counter() - t0))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split("TOKS")[1].split()[0])


def bench_concurrency(model: str, args, rows: list[dict]) -> None:
    counts = [int(x) for x in args.streams.split(",")]
    hf = hf_loop_tok_s(model, args)
    rows.append(
        {"bench": "concurrency", "method": "hf-loop", "streams": 1, "tok_s": hf}
    )
    print(f"streams hf-loop   1   {hf:8.1f} tok/s", flush=True)
    llm = engine(model, args, sink=True, max_model_len=32768)
    for n in counts:
        prompts = [prompt_of(args.stream_len, salt=i) for i in range(n)]
        r = decode_time(llm, prompts)
        rows.append(
            {
                "bench": "concurrency",
                "method": "sink",
                "streams": n,
                **r,
                "vs_hf": r["tok_s"] / hf,
            }
        )
        print(
            f"streams sink      {n:<3d} {r['tok_s']:8.1f} tok/s  "
            f"{r['tok_s'] / hf:6.1f}x hf-loop  {r['kv_blocks']} blocks",
            flush=True,
        )
    shutdown(llm)


def bench_overhead(model: str, args, rows: list[dict]) -> None:
    """Sink vs plain vLLM below S+W; engines alternate ``--reps`` times."""
    span = args.sink + args.window
    short, steps = span // 4, min(DECODE_STEPS, span // 2 - 8)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.reps):
        for sink in (False, True):
            method = "sink" if sink else "dense"
            llm = engine(model, args, sink=sink, max_model_len=span)
            for n in (1, 8):
                prompts = [prompt_of(short, salt=i) for i in range(n)]
                r = decode_time(llm, prompts, steps=steps, max_tokens=span - short)
                times.setdefault((method, n), []).append(r["step_ms"])
                print(
                    f"short   {method:9s} {n:<3d} {r['step_ms']:7.2f} ms/step",
                    flush=True,
                )
            shutdown(llm)
    for (method, n), ts in times.items():
        median = statistics.median(ts)
        rows.append(
            {"bench": "overhead", "method": method, "streams": n,
             "step_ms": median, "tok_s": 1000 * n / median, "step_ms_reps": ts}
        )  # fmt: skip


def model_context(model: str) -> int:
    """The model's own context (max_position_embeddings): dense vLLM's limit."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).max_position_embeddings)


def prefill_time(llm, length: int, batch: int, salt: int) -> dict:
    """Wall time to prefill ``batch`` prompts of ``length`` (max_tokens=1)."""
    from vllm import SamplingParams

    engine_ = llm.llm_engine
    params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
    ids = [f"pf{salt}-{i}" for i in range(batch)]
    t0 = time.perf_counter()
    for i, rid in enumerate(ids):
        prompt = {"prompt_token_ids": prompt_of(length, salt=salt * 64 + i)}
        engine_.add_request(rid, prompt, params)
    steps = 0
    while engine_.has_unfinished_requests():
        engine_.step()
        steps += 1
    seconds = time.perf_counter() - t0
    return {"s": seconds, "tok_s": batch * length / seconds, "steps": steps}


def bench_prefill(model: str, args, rows: list[dict]) -> None:
    """Plain vLLM vs sink mode prefill, interleaved (module docstring, 4)."""
    lengths = [int(x) for x in args.prefill_lengths.split(",")]
    batches = [int(x) for x in args.prefill_batches.split(",")]
    pairs = [
        (n, b) for n in lengths for b in batches if n * b <= args.prefill_max_tokens
    ]
    context = model_context(model)
    span = args.sink + args.window
    for chunk in args.prefill_chunks.split(","):
        tokens = None if chunk == "default" else int(chunk)
        dense_pairs = [(n, b) for n, b in pairs if n + 1 <= context]
        engines = {}
        if dense_pairs:
            dense_len = max(span, max(n for n, _ in dense_pairs) + 1)
            engines["dense"] = engine(
                model, args, sink=False, max_model_len=dense_len,
                max_num_batched_tokens=tokens,
            )  # fmt: skip
        sink_len = max(2 * span + 64, max(n for n, _ in pairs) + 1)
        engines["sink"] = engine(
            model, args, sink=True, max_model_len=sink_len,
            max_num_batched_tokens=tokens,
        )  # fmt: skip
        resolved = {
            m: llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
            for m, llm in engines.items()
        }
        for llm in engines.values():  # warm-up
            prefill_time(llm, min(lengths), 1, salt=999)
        runs: dict[tuple[str, int, int], list[dict]] = {}
        for rep in range(args.prefill_reps):
            for n, b in pairs:
                for method, llm in engines.items():
                    if method == "dense" and (n, b) not in dense_pairs:
                        continue
                    r = prefill_time(llm, n, b, salt=rep)
                    runs.setdefault((method, n, b), []).append(r)
                    print(
                        f"prefill {method:5s} chunk={resolved[method]:<5d} "
                        f"N={n:6d} x{b}  {r['tok_s']:8.1f} tok/s  "
                        f"({r['s']:.2f} s, {r['steps']} steps)",
                        flush=True,
                    )
        for (method, n, b), rs in runs.items():
            median = statistics.median(r["s"] for r in rs)
            rows.append(
                {"bench": "prefill", "method": method, "length": n, "batch": b,
                 "chunk": resolved[method], "chunk_arg": chunk, "s": median,
                 "tok_s": n * b / median, "steps": rs[0]["steps"],
                 "tok_s_reps": [r["tok_s"] for r in rs]}
            )  # fmt: skip
        for llm in engines.values():
            shutdown(llm)
    print_prefill_table(rows)


def print_prefill_table(rows: list[dict]) -> None:
    pre = [r for r in rows if r["bench"] == "prefill"]
    if not pre:
        return
    print("\nprefill tok/s (median):  chunk  length  batch   dense    sink  sink/dense")
    keys = sorted({(r["chunk"], r["length"], r["batch"]) for r in pre})
    for chunk, n, b in keys:
        got = {
            r["method"]: r
            for r in pre
            if (r["chunk"], r["length"], r["batch"]) == (chunk, n, b)
        }
        d, s = got.get("dense"), got.get("sink")
        ratio = f"{s['tok_s'] / d['tok_s']:10.2f}" if d and s else f"{'-':>10s}"
        print(
            f"{'':25s}{chunk:6d} {n:7d} {b:6d} "
            f"{d['tok_s'] if d else float('nan'):7.0f} "
            f"{s['tok_s'] if s else float('nan'):7.0f} {ratio}"
        )


def summarize(rows: list[dict]) -> list[str]:
    lines = []

    def pick(bench, method, key, value):
        for r in rows:
            if r["bench"] == bench and r["method"] == method and r.get(key) == value:
                return r
        return None

    decode = [r for r in rows if r["bench"] == "decode" and r["method"] == "sink"]
    if decode:
        first, last = decode[0], decode[-1]
        lines.append(
            f"sink per-token time at {last['length']} vs {first['length']}: "
            f"{last['step_ms'] / first['step_ms']:.3f}x (target <= 1.05); "
            f"KV blocks {first['kv_blocks']} -> {last['kv_blocks']}"
        )
        rec = pick("decode", "recompute", "length", first["length"])
        if rec:
            lines.append(
                f"recompute / sink per token: {rec['step_ms'] / last['step_ms']:.1f}x"
                " (paper target >= 22x on GPU)"
            )
    conc = [r for r in rows if r["bench"] == "concurrency" and r["method"] == "sink"]
    if conc:
        lines.append(
            f"sink {conc[-1]['streams']} streams vs HF loop: "
            f"{conc[-1]['vs_hf']:.1f}x (target >= 10x)"
        )
    for n in (1, 8):
        d, s = (
            pick("overhead", "dense", "streams", n),
            pick("overhead", "sink", "streams", n),
        )
        if d and s:
            lines.append(
                f"overhead vs plain vLLM below S+W, {n} stream(s): "
                f"{100 * (s['step_ms'] / d['step_ms'] - 1):+.1f}% (target <= +10%)"
            )
    pre = [r for r in rows if r["bench"] == "prefill" and r["method"] == "sink"]
    for s in pre:
        d = pick_prefill(rows, "dense", s)
        if d:
            lines.append(
                f"prefill sink/dense tok/s, {s['length']} x{s['batch']} "
                f"chunk {s['chunk']}: {s['tok_s'] / d['tok_s']:.2f} (target >= 1)"
            )
    return lines


def pick_prefill(rows: list[dict], method: str, like: dict) -> dict | None:
    for r in rows:
        if (
            r["bench"] == "prefill"
            and r["method"] == method
            and all(r[k] == like[k] for k in ("length", "batch", "chunk"))
        ):
            return r
    return None


def plot_prefill(rows: list[dict], path: Path) -> None:
    """Prefill tok/s vs prompt length, one panel per chunk size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = [r for r in rows if r["bench"] == "prefill"]
    chunks = sorted({r["chunk"] for r in pre})
    fig, axes = plt.subplots(1, len(chunks), figsize=(5.5 * len(chunks), 3.8))
    axes = [axes] if len(chunks) == 1 else list(axes)
    for ax, chunk in zip(axes, chunks):
        for method, style in (("dense", "s--"), ("sink", "o-")):
            for b in sorted({r["batch"] for r in pre}):
                pts = sorted(
                    (r["length"], r["tok_s"])
                    for r in pre
                    if r["chunk"] == chunk and r["method"] == method and r["batch"] == b
                )
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{method} x{b}")
        ax.set(
            xscale="log",
            xlabel="prompt length (tokens)",
            ylabel="prompt tokens / s",
            title=f"prefill, max_num_batched_tokens={chunk}",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot(rows: list[dict], path: Path) -> None:
    if not any(r["bench"] in ("decode", "concurrency") for r in rows):
        if any(r["bench"] == "prefill" for r in rows):
            plot_prefill(rows, path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for method in ("sink", "dense", "recompute"):
        pts = [r for r in rows if r["bench"] == "decode" and r["method"] == method]
        if pts:
            ax1.plot(
                [r["length"] for r in pts],
                [r["step_ms"] for r in pts],
                "o-",
                label=method,
            )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="stream length (tokens)",
        ylabel="ms per decoded token",
        title="decode time vs stream length",
    )
    ax1.legend()
    for method in ("sink", "dense"):
        pts = [r for r in rows if r["bench"] == "decode" and r["method"] == method]
        if pts:
            ax2.plot(
                [r["length"] for r in pts],
                [r["kv_blocks"] for r in pts],
                "o-",
                label=method,
            )
    ax2.set(
        xscale="log",
        xlabel="stream length (tokens)",
        ylabel="KV blocks held",
        title="KV memory vs stream length",
    )
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    model = model_path(args.model)
    rows: list[dict] = []
    only = set(args.only.split(","))
    if "concurrency" in only:  # first: its HF loop must not follow vLLM's imports
        bench_concurrency(model, args, rows)
    if "decode" in only:
        bench_decode(model, args, rows)
    if "overhead" in only:
        bench_overhead(model, args, rows)
    if "prefill" in only:
        bench_prefill(model, args, rows)
    print("\n".join(["", "summary:", *summarize(rows)]))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": None, "png": None}, "rows": rows},
                indent=1,
                default=str,
            )
        )
    if args.png:
        plot(rows, args.png)
        if any(r["bench"] == "prefill" for r in rows) and any(
            r["bench"] in ("decode", "concurrency") for r in rows
        ):
            plot_prefill(rows, args.png.with_name(args.png.stem + "_prefill.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
