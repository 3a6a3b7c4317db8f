"""Run one long sink-mode stream on vLLM and print its tokens and logprobs.

Helper of tests/test_parallel.py, run as its own process (vLLM on CPU spawns its
workers, so this needs ``if __name__ == "__main__"``)::

    python tests/parallel_run.py MODEL_DIR '{"tp": 2, "pp": 1}'

Prints one line ``OUT [token_ids, logprobs]``. Options: ``tp``, ``pp``,
``sink`` (false: plain vLLM), ``llm_kwargs`` (override engine arguments) and
``ray_tmp`` (a folder: start a local Ray instance there, on 127.0.0.1 only, without
dashboard, with one logical "GPU" per rank, and use vLLM's Ray executor; needs the
test platform of tests/ray_cpu_platform on the path).
"""

from __future__ import annotations

import json
import os
import sys

SINK, WINDOW = 4, 12
PROMPT = list(range(3, 43))  # 40 tokens
MAX_TOKENS = 120  # a stream of 160 tokens = 10 x (S + W)


def start_ray(world_size: int, temp_dir: str) -> None:
    import ray

    options = dict(
        address="local",
        num_cpus=2,
        num_gpus=world_size,  # logical: one per CPU rank (tests/ray_cpu_platform)
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        _system_config={
            # vLLM's actors take no CPU slot: skip the idle workers Ray prestarts.
            "enable_worker_prestart": False,
            "prestart_worker_first_driver": False,
            # Ray runs its workers at nice 15: starved on a shared machine.
            "worker_niceness": 0,
        },
    )
    try:
        ray.init(**options)
    except Exception as e:  # Ray gives its raylet a fixed 30 s to register
        print(f"ray.init failed ({e}); shutting down and retrying once", flush=True)
        ray.shutdown()
        ray.init(**options)
    # An engine-core process calls ray.init() too: point it at this instance.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def main() -> None:
    model = sys.argv[1]
    opts = json.loads(sys.argv[2])
    tp, pp = opts.get("tp", 1), opts.get("pp", 1)
    use_ray = bool(opts.get("ray_tmp"))
    if use_ray:
        start_ray(tp * pp, opts["ray_tmp"])

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    sink = {"attention_sink": {"sink": SINK, "window": WINDOW}}
    kwargs = {
        "dtype": "float32",
        "enforce_eager": True,
        "block_size": 16,
        "max_model_len": 4096,
        "max_num_batched_tokens": 64,
        "seed": 0,
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "distributed_executor_backend": "ray" if use_ray else None,
        "additional_config": sink if opts.get("sink", True) else {},
        **opts.get("llm_kwargs", {}),
    }
    llm = LLM(model, **kwargs)
    out = llm.generate(
        [{"prompt_token_ids": PROMPT}],
        SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0
        ),
    )
    o = out[0].outputs[0]
    logprobs = [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)]
    print("PLATFORM", type(current_platform).__name__, flush=True)
    print("OUT", json.dumps([list(o.token_ids), logprobs]), flush=True)
    llm.llm_engine.engine_core.shutdown()
    if use_ray:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
