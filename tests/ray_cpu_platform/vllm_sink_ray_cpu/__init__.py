"""Test-only vLLM platform plugin: vLLM's CPU platform, usable by Ray executors.

vLLM 0.32.0 refuses ``distributed_executor_backend="ray"`` on CPU for one reason:
``CpuPlatform.ray_device_key`` is empty. The Ray executors place one worker per
placement-group bundle of ``{ray_device_key: 1}`` and read the worker's device ids
from ``ray.get_runtime_context().get_accelerator_ids()[ray_device_key]``, which only
knows Ray's accelerator names (a custom resource name raises ``KeyError``). So this
platform uses the key ``"GPU"``, and the Ray cluster declares logical GPUs
(``ray.init(num_gpus=N)``) that stand for CPU workers; torch never sees a GPU.

Installed only by the tests (``tests/test_parallel.py`` pip-installs it into a
temporary folder on ``PYTHONPATH`` of the processes that need it). Never install it
into a real deployment: on a GPU machine vLLM's own platform already has a Ray key.
"""

from __future__ import annotations


def activate() -> str | None:
    """``vllm.platform_plugins`` entry point: active wherever vLLM would pick CPU."""
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None
    return "vllm_sink_ray_cpu.platform.RayCpuPlatform"
