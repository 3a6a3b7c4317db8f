"""Soak: one sink-mode stream of a million tokens on the tiny model.

    python benchmarks/soak.py [--tokens 1000000] [--mode prefill|decode]
                              [--every 10000] [--json out.json] [--png out.png]

``prefill`` feeds the tokens as one prompt (streamed through prefill segments
past max_model_len, then 100 generated tokens); ``decode`` generates them all
(slow on CPU: ~100 tokens/s). Every ``--every`` stream tokens it prints tokens/s
(over the last interval), the KV blocks the engine holds and the process RSS.
It asserts nothing: the point is the numbers at 10k vs 1M tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    return parser.parse_args(argv)


def make_engine(args: argparse.Namespace):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from vllm import LLM

    from vllm_sink import SinkConfig
    from vllm_sink.tiny_models import make_tiny_model

    cfg = SinkConfig(sink=args.sink, window=args.window)
    return LLM(
        make_tiny_model("llama"),
        dtype="float32",
        enforce_eager=True,
        block_size=16,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=2048,
        additional_config=cfg.additional_config(),
    )


def run(args: argparse.Namespace) -> list[dict]:
    from vllm import SamplingParams

    from vllm_sink.demo import blocks_in_use

    llm = make_engine(args)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    if args.mode == "prefill":
        prompt = [(i * 7919) % 250 + 3 for i in range(args.tokens)]
        params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    else:
        prompt = list(range(3, 19))
        params = SamplingParams(
            max_tokens=args.tokens - len(prompt), temperature=0, ignore_eos=True
        )
    engine.add_request("soak", {"prompt_token_ids": prompt}, params)
    table = engine.__dict__.get("_sink_streams")
    stream = table.by_user.get("soak") if table else None  # None: fits one request
    rows: list[dict] = []
    start = last_time = time.perf_counter()
    last_pos, next_report = 0, args.every
    print(f"{'tokens':>9} {'tok/s':>8} {'KV blocks':>9} {'RSS MiB':>8} {'segments':>8}")
    while engine.has_unfinished_requests():
        engine.step()
        segment = stream.current if stream else None
        # The one request in flight (vLLM suffixes engine request ids internally).
        request = next(iter(core.scheduler.requests.values()), None)
        computed = request.num_computed_tokens if request is not None else 0
        pos = segment.stream_position(computed) if segment else computed
        if pos >= next_report:
            now = time.perf_counter()
            row = {
                "tokens": pos,
                "tokens_per_s": (pos - last_pos) / (now - last_time),
                "kv_blocks": blocks_in_use(llm),
                "rss_mib": rss_mib(),
                "segments": stream.segments if stream else 1,
                "elapsed_s": now - start,
            }
            rows.append(row)
            print(
                f"{pos:9d} {row['tokens_per_s']:8.0f} {row['kv_blocks']:9d} "
                f"{row['rss_mib']:8.0f} {row['segments']:8d}",
                flush=True,
            )
            last_pos, last_time = pos, now
            next_report = (pos // args.every + 1) * args.every
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(
        axes,
        ("tokens_per_s", "kv_blocks", "rss_mib"),
        ("tokens/s", "KV blocks held", "RSS (MiB)"),
    ):
        ax.plot(tokens, [r[key] for r in rows])
        ax.set_xlabel("stream tokens")
        ax.set_title(label)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": None, "png": None}, "rows": rows},
                indent=1,
            )
        )
    if args.png and rows:
        plot(rows, args.png)
    if rows:
        first, last = rows[0], rows[-1]
        print(
            f"at {first['tokens']} tokens: {first['kv_blocks']} blocks, "
            f"{first['rss_mib']:.0f} MiB, {first['tokens_per_s']:.0f} tok/s; "
            f"at {last['tokens']}: {last['kv_blocks']} blocks, "
            f"{last['rss_mib']:.0f} MiB, {last['tokens_per_s']:.0f} tok/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
