"""The platform class, imported only once vLLM resolves the current platform."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform


class RayCpuPlatform(CpuPlatform):
    """CpuPlatform plus the Ray device key; Ray's logical "GPU"s stand for CPU ranks."""

    ray_device_key: str = "GPU"
    # Ray would set CUDA_VISIBLE_DEVICES per actor; meaningless for CPU workers.
    ray_noset_device_env_vars: list[str] = [
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
    ]
