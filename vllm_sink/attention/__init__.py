"""Sink attention: typed inputs (inputs.py), metadata builder, torch path (CPU)
and Triton path (GPU)."""

from __future__ import annotations

BACKEND_PATH = "vllm_sink.attention.backend.SinkAttentionBackend"


def install() -> None:
    """Register the backend as CUSTOM and let the CPU platform select it."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    from vllm_sink.patching import wrap_method

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)

    @wrap_method(
        CpuPlatform,
        "get_attn_backend_cls",
        kind="classmethod",
        reason="the CPU platform ignores the selected backend; honour CUSTOM",
        diff="0005-cpu-platform-custom-backend.diff",
        params=("selected_backend",),
    )
    def get_attn_backend_cls(original, selected_backend, *args, **kwargs):
        if selected_backend == AttentionBackendEnum.CUSTOM:
            return AttentionBackendEnum.CUSTOM.get_path()
        return original(selected_backend, *args, **kwargs)
