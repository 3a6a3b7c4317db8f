"""Main job: stream text far past the model's context in sink mode.

    python -m vllm_sink.demo [--model DIR] [--tokens N] [--sink S] [--window W]

Without --model it makes the tiny random Llama (offline, seconds). It prints,
as it goes, the tokens generated, tokens/s and the KV blocks the stream holds,
which stop growing once the window is full.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def blocks_in_use(llm) -> int:
    """KV blocks held by running requests (in-process engine only)."""
    core = llm.llm_engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # minus null block


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: tiny)")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=None, help="default: context-S")
    parser.add_argument("--every", type=int, default=500, help="report interval")
    parser.add_argument("--prompt", default="Once upon a time, ")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from vllm_sink import SinkConfig
    from vllm_sink.tiny_models import make_tiny_model

    model = args.model or make_tiny_model("llama")
    context = AutoConfig.from_pretrained(model).max_position_embeddings
    window = args.window or context - args.sink
    cfg = SinkConfig(sink=args.sink, window=window)
    print(f"model {model}\ncontext {context} tokens; sink mode S={cfg.sink} W={window}")
    llm = LLM(
        model,
        dtype="float32",
        enforce_eager=True,
        block_size=16,
        max_model_len=args.tokens + 4096,
        max_num_batched_tokens=512,
        additional_config=cfg.additional_config(),
    )
    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=args.tokens, temperature=0.8, seed=0, ignore_eos=True
    )
    engine.add_request("stream", args.prompt, params)
    print(f"{'tokens':>8} {'tok/s':>8} {'KV blocks':>10}  text")
    start, done, next_report = time.perf_counter(), 0, args.every
    while engine.has_unfinished_requests():
        for out in engine.step():
            done = len(out.outputs[0].token_ids)
            if done >= next_report or out.finished:
                rate = done / (time.perf_counter() - start)
                tail = out.outputs[0].text[-40:].replace("\n", " ")
                print(f"{done:8d} {rate:8.1f} {blocks_in_use(llm):10d}  {tail!r}")
                next_report += args.every
    print(f"streamed {done} tokens, {done / context:.1f}x the model's context")
    return 0


if __name__ == "__main__":
    sys.exit(main())
