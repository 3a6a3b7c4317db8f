"""Multi-turn conversations: per-turn time against history length.

    python benchmarks/multiturn.py [--model tiny|smollm2|DIR] [--histories 1024,...]
        [--new 64] [--out 32] [--turns 3] [--json F] [--png F]

A chat client re-sends its whole history every turn (earlier turns + the new
message). For each history length H, each engine first serves one turn at H (a
warm-up that brings the conversation there), then the next ``--turns`` turns
are timed (each ``--new`` tokens in, ``--out`` greedy tokens out). Engines,
measured side by side in one run:

- sink mode with reuse (prefix caching on: sink-aware hits below max_model_len,
  ``sink_lookup`` continuations past it);
- sink mode without reuse (``enable_prefix_caching=False``: every turn
  re-streams its whole history);
- dense vLLM with prefix caching, while the history fits its context;
- ``serve``: sink mode with reuse behind ``vllm serve``, each turn a streamed
  completion through the official ``openai`` client (prompt as token ids).

Offline engines (``LLM``, driven step by step through its ``LLMEngine``): the
time of a turn is from ``add_request`` to the last token (prefill of the new
tokens, decode of the answer), its time to first token up to the first output
carrying a token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASCII = list(range(32, 127))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dense-context", type=int, default=16384)
    parser.add_argument("--histories", default="1024,4096,16384,65536")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--out", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--methods", default="reuse,no-reuse,dense,serve")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    return parser.parse_args(argv)


def model_path(name: str, context: int) -> str:
    if name == "tiny":
        from vllm_sink.tiny_models import make_tiny_model

        return make_tiny_model("llama", max_position_embeddings=context)
    if name == "smollm2":
        from vllm_sink.smollm2 import smollm2_path

        return str(smollm2_path())
    return name


def make_engine(args: argparse.Namespace, model: str, method: str):
    from vllm import LLM

    options = dict(
        dtype="float32",
        enforce_eager=True,
        block_size=32,  # vLLM's CPU attention (dense) wants multiples of 32
        max_num_seqs=4,
        seed=0,
        enable_prefix_caching=method != "no-reuse",
    )
    if method == "dense":
        options["max_model_len"] = args.dense_context
    else:
        options["max_model_len"] = args.max_model_len
        sink = {"sink": args.sink, "window": args.window}
        options["additional_config"] = {"attention_sink": sink}
    return LLM(model, **options)


def turn(llm, history: list[int], out: int) -> tuple[float, float, list[int]]:
    """One turn: (seconds to the last token, to the first token, the answer)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=out,
        temperature=0,
        ignore_eos=True,
        allowed_token_ids=ASCII,
        output_kind=RequestOutputKind.CUMULATIVE,
    )
    engine = llm.llm_engine
    start = time.perf_counter()
    engine.add_request("turn", {"prompt_token_ids": list(history)}, params)
    first = None
    while True:
        for result in engine.step():
            tokens = list(result.outputs[0].token_ids)
            if first is None and tokens:
                first = time.perf_counter() - start
            if result.finished:
                return time.perf_counter() - start, first, tokens


def conversation(
    run_turn, args, history_len: int, fits: int | None
) -> list[tuple[float, float]]:
    """Warm up at ``history_len`` tokens, then time ``--turns`` turns:
    (turn seconds, first-token seconds) each."""
    rng = random.Random(history_len)
    history = [rng.randrange(3, 250) for _ in range(history_len)]
    times = []
    for index in range(args.turns + 1):
        history += [rng.randrange(3, 250) for _ in range(args.new)]
        if fits is not None and len(history) + args.out > fits:
            return []
        seconds, first, answer = run_turn(history, args.out)
        history += answer
        if index:  # the first turn is the warm-up
            times.append((seconds, first))
    return times


class Server:
    """``vllm serve`` in sink mode on 127.0.0.1, driven by the openai client."""

    def __init__(self, args: argparse.Namespace, model: str) -> None:
        import subprocess

        self.port = 18400 + os.getpid() % 500
        cmd = [
            str(Path(sys.executable).with_name("vllm")),
            "serve",
            model,
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--dtype", "float32", "--enforce-eager", "--block-size", "32"),
            *("--max-model-len", str(args.max_model_len), "--max-num-seqs", "4"),
            *("--served-model-name", "m", "--gpu-memory-utilization", "0.5"),
            *("--attention-sink", str(args.sink), "--window", str(args.window)),
        ]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "multiturn.log", "w")
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self._wait_ready()
        import openai

        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", timeout=3600
        )

    def _wait_ready(self) -> None:
        import urllib.request

        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited; see {self.log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health").close()
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vllm serve not ready; see {self.log.name}")

    def turn(self, history: list[int], out: int) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        first, tokens = None, []
        stream = self.client.completions.create(
            model="m",
            prompt=list(history),
            max_tokens=out,
            temperature=0,
            stream=True,
            logprobs=0,  # the answer's token ids, without echoing the prompt's
            extra_body={
                "ignore_eos": True,
                "allowed_token_ids": ASCII,
                "return_tokens_as_token_ids": True,
            },
        )
        for event in stream:
            logprobs = event.choices[0].logprobs
            ids = [int(t.split(":")[1]) for t in (logprobs.tokens if logprobs else [])]
            if first is None and ids:
                first = time.perf_counter() - start
            tokens += ids
        return time.perf_counter() - start, first, tokens

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def open_method(args: argparse.Namespace, model: str, method: str):
    """(run_turn, close) for one method."""
    if method == "serve":
        server = Server(args, model)
        return server.turn, server.close
    llm = make_engine(args, model, method)

    def close() -> None:
        llm.llm_engine.engine_core.shutdown()

    return (lambda history, out: turn(llm, history, out)), close


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    histories = [int(h) for h in args.histories.split(",")]
    model = model_path(args.model, args.dense_context)
    methods = args.methods.split(",")
    opened = {method: open_method(args, model, method) for method in methods}
    rows = []
    try:  # methods interleaved per history: the VM's drift hits them alike
        for history_len in histories:
            for method in methods:
                run_turn, _ = opened[method]
                fits = args.dense_context if method == "dense" else None
                times = conversation(run_turn, args, history_len, fits)
                rows.append(summarize(method, history_len, times))
    finally:
        for _, close in opened.values():
            close()
    print_table(rows, histories)
    if args.json:
        meta = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        }
        args.json.write_text(json.dumps({"args": meta, "rows": rows}, indent=1))
    if args.png:
        plot(rows, args.png)
    return 0


def summarize(method: str, history_len: int, times: list) -> dict:
    row = {
        "method": method,
        "history": history_len,
        "turn_s": statistics.median(t for t, _ in times) if times else None,
        "ttft_s": statistics.median(f for _, f in times) if times else None,
        "times": times,
    }
    shown = "-"
    if times:
        shown = (
            f"{row['turn_s'] * 1000:.1f} ms/turn, "
            f"first token {row['ttft_s'] * 1000:.1f} ms"
        )
    print(f"[multiturn] {method:9s} history {history_len:7d}: {shown}", flush=True)
    return row


def print_table(rows: list[dict], histories: list[int]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    heads = [f"{m} {what}" for m in methods for what in ("ms/turn", "TTFT ms")]
    print("\n| history | " + " | ".join(heads) + " |")
    print("|---:|" + "---:|" * len(heads))
    for history_len in histories:
        cells = []
        for method in methods:
            row = next(
                r for r in rows if r["method"] == method and r["history"] == history_len
            )
            for key in ("turn_s", "ttft_s"):
                cells.append("-" if row[key] is None else f"{row[key] * 1000:.1f}")
        print(f"| {history_len} | " + " | ".join(cells) + " |")
    reuse = {r["history"]: r["turn_s"] for r in rows if r["method"] == "reuse"}
    if reuse.get(histories[0]) and reuse.get(histories[-1]):
        ratio = reuse[histories[-1]] / reuse[histories[0]]
        print(f"\nreuse: turn at {histories[-1]} / at {histories[0]} = {ratio:.2f}x")
    dense = {r["history"]: r["turn_s"] for r in rows if r["method"] == "dense"}
    for history_len in histories:
        if reuse.get(history_len) and dense.get(history_len):
            ratio = reuse[history_len] / dense[history_len]
            print(f"reuse / dense at {history_len}: {ratio:.2f}x")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(
        axes, ("turn_s", "ttft_s"), ("time per turn (ms)", "time to first token (ms)")
    ):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(r["history"], r[key]) for r in rows if r["method"] == method]
            points = [(h, t * 1000) for h, t in points if t is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("history (tokens)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
