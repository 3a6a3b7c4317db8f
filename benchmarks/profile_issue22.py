"""Where a sink-mode step spends its time, next to plain vLLM (issue 22).

    python benchmarks/profile_issue22.py prefill [--model smollm2] [--prompts 4x1000]
    python benchmarks/profile_issue22.py decode [--model tiny] [--tokens 6000]

Everything runs in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that
wall-clock timers wrapped around engine, runner, attention and KV-manager
functions see every step. Timers are inclusive (a function's time includes
the timed functions it calls) and cost about a microsecond per call.

prefill: plain vLLM and sink mode (same S+W) alternate ``--reps`` times on the
same prompts, ``max_tokens=1``; prints per engine the prefill wall time and
the time per layer per step of attention (forward + KV write), of rotary, and
of the torch-path pieces of sink attention (``_attend_tile``, ``rotate``,
``_gather_kv``, ``_attend``, ``_softmax``; the rest of ``_attend_tile`` is
masks, aranges and concatenations).

decode: streams decode for ``--tokens`` steps in each engine; per window of
steps (``--windows``) prints the mean ms per step of each timed function, so
early and late steps can be compared side by side (but not at the same time:
load on a shared machine changes between windows).

decode-ab: two engines of one kind, the "old" one's streams first decode
``--old`` tokens, then old and "young" (just started) engines alternate
``--ab-steps`` steps each: old and young steps are timed at the same time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner, name: str, label: str | None = None) -> None:
    """Wrap ``owner.name`` (class or module attribute) with a wall-clock timer."""
    original = getattr(owner, name, None)
    label = label or f"{getattr(owner, '__name__', owner)}.{name}"
    if original is None:
        print(f"(not timed: {label} does not exist here)")
        return
    if getattr(original, "_issue22_timed", False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - t0
            CALLS[label] += 1

    wrapper._issue22_timed = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)


def install_timers() -> None:
    from vllm.model_executor.custom_op import CustomOp
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sink import kv_cache
    from vllm_sink.attention import backend, cpu_kernel, torch_path

    timed(EngineCore, "step", "engine.step")
    timed(Scheduler, "schedule", "scheduler.schedule")
    timed(Scheduler, "update_from_output", "scheduler.update_from_output")
    timed(OutputProcessor, "process_outputs", "output_processor.process_outputs")
    timed(GPUModelRunner, "execute_model", "runner.execute_model")
    timed(GPUModelRunner, "sample_tokens", "runner.sample_tokens")
    timed(GPUModelRunner, "_update_states", "runner._update_states")
    timed(GPUModelRunner, "_prepare_inputs", "runner._prepare_inputs")
    timed(GPUModelRunner, "_bookkeeping_sync", "runner._bookkeeping_sync")
    timed(GPUModelRunner, "_sample", "runner._sample")
    timed(FullAttentionManager, "remove_skipped_blocks", "kv.remove_skipped(plain)")
    timed(
        kv_cache.SinkWindowManager,
        "remove_skipped_blocks",
        "kv.SinkWindowManager.remove_skipped_blocks",
    )
    timed(kv_cache.SinkWindowManager, "_count_pinned", "kv.SinkWindowManager._pinned")
    timed(backend.SinkAttentionMetadataBuilder, "build", "sink.metadata_builder.build")
    timed(cpu_attn.CPUAttentionBackendImpl, "forward", "attn.plain.forward")
    timed(cpu_attn.CPUAttentionBackendImpl, "do_kv_cache_update", "attn.plain.kv_write")
    timed(backend.SinkAttentionImpl, "forward", "attn.sink.forward")
    timed(backend.SinkAttentionImpl, "do_kv_cache_update", "attn.sink.kv_write")
    for fn in (
        "_attend_tile",
        "rotate",
        "_gather_kv",
        "_attend",
        "_softmax",
        "_torch_decodes",
        "_compiled_decodes",
        "plan_batch",
    ):
        timed(torch_path, fn, f"sink.torch_path.{fn}")
    timed(cpu_kernel, "sink_decode", "sink.cpu_kernel.sink_decode")
    for cls in _rotary_classes():
        timed(cls, "forward", f"rotary.{cls.__name__}.forward")
    del CustomOp


def _rotary_classes() -> list[type]:
    from vllm.model_executor.layers.rotary_embedding import base

    from vllm_sink import rope

    return [base.RotaryEmbedding, rope.SkipRotary]


def snapshot() -> dict[str, float]:
    return dict(TOTALS)


def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def model_path(name: str, max_len: int) -> str:
    if name == "tiny":
        from vllm_sink.tiny_models import make_tiny_model

        return make_tiny_model("llama", max_position_embeddings=max_len)
    if name == "smollm2":
        from vllm_sink.smollm2 import smollm2_path

        return smollm2_path()
    return name


def make_engine(model: str, sink: bool, args, max_model_len: int):
    from vllm import LLM

    extra = {"attention_sink": {"sink": args.sink, "window": args.window}}
    return LLM(
        model,
        dtype="float32",
        enforce_eager=True,
        block_size=args.block_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=args.chunk,
        max_num_seqs=64,
        enable_prefix_caching=False,
        additional_config=extra if sink else {},
    )


def shutdown(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def prompt_of(length: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + salt * 104729) % 250 + 3 for i in range(length)]


def per_layer(label: str) -> bool:
    """Timers that run once per attention layer (reported per layer)."""
    return label.startswith(("attn.", "sink.torch_path", "rotary.", "sink.cpu"))


def num_attention_layers(llm) -> int:
    config = llm.llm_engine.model_config.hf_config
    return int(config.num_hidden_layers)


def run_prefill(llm, prompts: list[list[int]]) -> tuple[float, int, dict]:
    """Prefill ``prompts`` (max_tokens=1); wall time, steps, timer deltas."""
    from vllm import SamplingParams

    engine_ = llm.llm_engine
    params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
    before, steps = snapshot(), 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine_.add_request(
            f"p{time.monotonic_ns()}-{i}", {"prompt_token_ids": p}, params
        )
    while engine_.has_unfinished_requests():
        engine_.step()
        steps += 1
    return time.perf_counter() - t0, steps, diff(before, snapshot())


def cmd_prefill(args) -> dict:
    count, length = (int(x) for x in args.prompts.split("x"))
    model = model_path(args.model, max(32768, length + 64))
    max_len = max(length + 64, args.sink + args.window)
    prompts = [prompt_of(length, salt=i) for i in range(count)]
    engines = {m: make_engine(model, m == "sink", args, max_len) for m in args.modes}
    for llm in engines.values():  # warm-up
        run_prefill(llm, [prompt_of(min(length, 300), salt=99)])
    runs: dict[str, list] = defaultdict(list)
    for _ in range(args.reps):
        for mode, llm in engines.items():
            wall, steps, timers = run_prefill(llm, prompts)
            runs[mode].append((wall, steps, timers))
            print(
                f"{mode:5s} prefill {count}x{length}: {wall:6.2f} s "
                f"{count * length / wall:6.0f} tok/s ({steps} steps)",
                flush=True,
            )
    layers = num_attention_layers(next(iter(engines.values())))
    result = {}
    for mode, rs in runs.items():
        walls = [r[0] for r in rs]
        best = min(range(len(rs)), key=lambda i: walls[i])
        wall, steps, timers = rs[best]
        per_layer_step = {
            k: 1000 * v / ((layers if per_layer(k) else 1) * steps)
            for k, v in sorted(timers.items(), key=lambda kv: -kv[1])
            if v > 0
        }
        result[mode] = {
            "wall_s": walls,
            "tok_s_median": count * length / statistics.median(walls),
            "steps": steps,
            "ms_per_layer_step_best_run": per_layer_step,
            "s_total_best_run": {k: v for k, v in timers.items() if v > 0},
        }
    print(
        f"\nms per step, best run of each; attn.*, sink.*, rotary.* per layer "
        f"per step ({layers} layers):"
    )
    keys = sorted(
        {k for m in result.values() for k in m["ms_per_layer_step_best_run"]},
        key=lambda k: (
            -max(m["ms_per_layer_step_best_run"].get(k, 0) for m in result.values())
        ),
    )
    print(f"{'timer':48s}" + "".join(f"{m:>10s}" for m in result))
    for k in keys:
        print(
            f"{k:48s}"
            + "".join(
                f"{m['ms_per_layer_step_best_run'].get(k, 0):10.3f}"
                for m in result.values()
            )
        )
    for llm in engines.values():
        shutdown(llm)
    return {"prompts": args.prompts, "layers": layers, "modes": result}


def cmd_decode(args) -> dict:
    from vllm import SamplingParams

    model = model_path(args.model, 131072)
    windows = [tuple(int(y) for y in w.split("-")) for w in args.windows.split(",")]
    out = {}
    for mode in args.modes:
        llm = make_engine(model, mode == "sink", args, args.max_model_len)
        engine_ = llm.llm_engine
        params = SamplingParams(
            max_tokens=args.tokens + 8, temperature=0, ignore_eos=True, detokenize=False
        )
        ids = [f"{mode}{i}" for i in range(args.streams)]
        for i, rid in enumerate(ids):
            engine_.add_request(
                rid, {"prompt_token_ids": prompt_of(args.prompt, salt=i)}, params
            )
        engine_.step()  # prefill
        marks = {}
        step_times = []
        t_start = time.perf_counter()
        for step in range(1, args.tokens + 1):
            if step in {w[0] for w in windows} | {w[1] for w in windows}:
                marks[step] = (snapshot(), len(step_times))
            t0 = time.perf_counter()
            engine_.step()
            step_times.append(time.perf_counter() - t0)
            if step % 1000 == 0:
                print(
                    f"{mode} step {step}: last 1000 steps "
                    f"{1000 * statistics.mean(step_times[-1000:]):.2f} ms/step "
                    f"({time.perf_counter() - t_start:.0f} s)",
                    flush=True,
                )
        engine_.abort_request(ids)
        while engine_.has_unfinished_requests():
            engine_.step()
        shutdown(llm)
        rows = {}
        for a, b in windows:
            if a not in marks or b not in marks:
                continue
            (s0, i0), (s1, i1) = marks[a], marks[b]
            n = i1 - i0
            d = diff(s0, s1)
            rows[f"{a}-{b}"] = {
                "step_ms_mean": 1000 * statistics.mean(step_times[i0:i1]),
                "step_ms_median": 1000 * statistics.median(step_times[i0:i1]),
                "per_step_ms": {k: 1000 * v / n for k, v in d.items() if v > 0},
            }
        out[mode] = {
            "windows": rows,
            "per_1000": [
                1000 * statistics.mean(step_times[i : i + 1000])
                for i in range(0, len(step_times), 1000)
            ],
        }
        print(f"\n{mode}: ms per step per window of steps")
        names = sorted(
            {k for r in rows.values() for k in r["per_step_ms"]},
            key=lambda k: -max(r["per_step_ms"].get(k, 0) for r in rows.values()),
        )
        print(f"{'timer':48s}" + "".join(f"{w:>12s}" for w in rows))
        print(
            f"{'(whole step, mean)':48s}"
            + "".join(f"{r['step_ms_mean']:12.3f}" for r in rows.values())
        )
        for k in names:
            print(
                f"{k:48s}"
                + "".join(f"{r['per_step_ms'].get(k, 0):12.3f}" for r in rows.values())
            )
    return out


def cmd_decode_ab(args) -> dict:
    """Young and old streams side by side: two engines of the same kind, one
    whose streams have generated ``--old`` tokens, one whose streams just
    started; their steps alternate, so machine load hits both alike."""
    from vllm import SamplingParams

    model = model_path(args.model, 131072)
    out = {}
    for mode in args.modes:
        engines = {
            age: make_engine(model, mode == "sink", args, args.max_model_len)
            for age in ("old", "young")
        }
        params = SamplingParams(
            max_tokens=args.max_model_len - args.prompt - 8,
            temperature=0,
            ignore_eos=True,
            detokenize=False,
        )
        for age, llm in engines.items():
            for i in range(args.streams):
                llm.llm_engine.add_request(
                    f"{age}{i}",
                    {"prompt_token_ids": prompt_of(args.prompt, salt=i)},
                    params,
                )
            llm.llm_engine.step()
        t0 = time.perf_counter()
        for step in range(args.old):
            engines["old"].llm_engine.step()
            if (step + 1) % 2000 == 0:
                print(
                    f"{mode} old streams at {step + 1} tokens "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        per_age: dict[str, list[float]] = {a: [] for a in engines}
        timers: dict[str, dict[str, float]] = {a: {} for a in engines}
        for _ in range(args.ab_steps):
            for age, llm in engines.items():
                before = snapshot()
                t1 = time.perf_counter()
                llm.llm_engine.step()
                per_age[age].append(time.perf_counter() - t1)
                for k, v in diff(before, snapshot()).items():
                    timers[age][k] = timers[age].get(k, 0.0) + v
        for llm in engines.values():
            shutdown(llm)
        n = args.ab_steps
        rows = {
            age: {
                "step_ms_median": 1000 * statistics.median(ts),
                "step_ms_mean": 1000 * statistics.mean(ts),
                "per_step_ms": {
                    k: 1000 * v / n for k, v in timers[age].items() if v > 0
                },
            }
            for age, ts in per_age.items()
        }
        out[mode] = rows
        if args.json:  # after each mode: a time limit may stop the next one
            args.json.write_text(json.dumps({"partial": out}, indent=1))
        print(
            f"\n{mode}: old streams (~{args.old + args.prompt} tokens) vs young "
            f"(~{args.prompt}..{args.prompt + n}), steps alternating, ms per step"
        )
        print(f"{'timer':48s}{'old':>10s}{'young':>10s}{'old/young':>10s}")
        for key in ("step_ms_median", "step_ms_mean"):
            o, y = rows["old"][key], rows["young"][key]
            print(
                f"{'(whole step, ' + key[8:] + ')':48s}{o:10.3f}{y:10.3f}{o / y:10.2f}"
            )
        names = sorted(
            set(rows["old"]["per_step_ms"]) | set(rows["young"]["per_step_ms"]),
            key=lambda k: -rows["old"]["per_step_ms"].get(k, 0),
        )
        for k in names:
            o = rows["old"]["per_step_ms"].get(k, 0)
            y = rows["young"]["per_step_ms"].get(k, 0)
            print(f"{k:48s}{o:10.3f}{y:10.3f}{o / y if y else float('nan'):10.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("prefill", "decode", "decode-ab"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--modes", default="plain,sink")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--prompts", default="4x1000")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--windows", default="500-1500,4500-5500")
    parser.add_argument("--old", type=int, default=8000)
    parser.add_argument("--ab-steps", type=int, default=400)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-timers", action="store_true")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    if args.model is None:
        args.model = "smollm2" if args.what == "prefill" else "tiny"
    if args.window is None:
        args.window = 1020 if args.what == "prefill" else 252
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    import vllm_sink

    vllm_sink.register()
    if not args.no_timers:
        install_timers()
    commands = {
        "prefill": cmd_prefill,
        "decode": cmd_decode,
        "decode-ab": cmd_decode_ab,
    }
    result = commands[args.what](args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": None}, "result": result},
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
