"""Sink-mode metrics on vLLM's Prometheus registry (the one /metrics serves).

The KV policy runs in the engine-core process, the OpenAI server in another:
the engine core writes its counters to a small JSON file per process in
``VLLM_SINK_METRICS_DIR`` (made by the front-end before the engine starts, so
every child inherits it), and a collector in the front-end sums them at scrape
time. Rollovers happen in the front-end and count there directly.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vllm_sink.config import SinkConfig

DIR_ENV = "VLLM_SINK_METRICS_DIR"
FLUSH_SECONDS = 0.2

_rollovers = 0
_continuations = 0
_restreams = 0
_collector: SinkCollector | None = None
_config: SinkConfig | None = None


class EngineStats:
    """Counters of this process's SinkWindowManagers.

    Updated on the scheduler's hot path (cheap), written to the metrics file by
    a daemon thread at most every FLUSH_SECONDS, only when something changed.
    """

    def __init__(self) -> None:
        self.freed_blocks = 0
        self.pinned_blocks = 0
        self.released_holds = 0
        self._dirty = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, freed: int, pinned_change: int) -> None:
        """Blocks a manager freed, and the change of the blocks it pins (so the
        managers of a process add up)."""
        if freed or pinned_change:
            self.freed_blocks += freed
            self.pinned_blocks += pinned_change
            self._changed()

    def count_released(self) -> None:
        """A block hold given back under pool pressure (``pressure.py``)."""
        self.released_holds += 1
        self._changed()

    def _changed(self) -> None:
        self._dirty.set()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._flush_loop, name="vllm-sink-metrics", daemon=True
            )
            self._thread.start()

    def _flush_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            self.flush()
            time.sleep(FLUSH_SECONDS)

    def flush(self) -> None:
        directory = os.environ.get(DIR_ENV)
        if not directory or not os.path.isdir(directory):
            return
        path = Path(directory) / f"engine-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "freed": self.freed_blocks,
                    "pinned": self.pinned_blocks,
                    "released": self.released_holds,
                }
            )
        )
        os.replace(tmp, path)


engine_stats = EngineStats()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def engine_files(directory: str) -> list[Path]:
    """The files of live engine processes; those of dead ones are removed."""
    live = []
    for path in Path(directory).glob("engine-*.json"):
        if _alive(int(path.stem.split("-", 1)[1])):
            live.append(path)
        else:
            path.unlink(missing_ok=True)
    return live


class SinkCollector:
    """Reads the engine-core files at scrape time."""

    def collect(self):
        freed = pinned = released = 0
        directory = os.environ.get(DIR_ENV)
        if directory and os.path.isdir(directory):
            for path in engine_files(directory):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                freed += data.get("freed", 0)
                pinned += data.get("pinned", 0)
                released += data.get("released", 0)
        yield CounterMetricFamily(
            "vllm:sink_window_freed_blocks",
            "KV blocks returned to the pool by sink-window eviction.",
            value=freed,
        )
        yield GaugeMetricFamily(
            "vllm:sink_pinned_blocks",
            "KV blocks pinned for sink tokens by running requests.",
            value=pinned,
        )
        yield CounterMetricFamily(
            "vllm:sink_seed_holds_released",
            "Block holds kept for a stream's next segment that were given back "
            "because no waiting request could be scheduled (the segment then "
            "recomputes what the pool no longer caches).",
            value=released,
        )
        yield CounterMetricFamily(
            "vllm:sink_rollovers",
            "Streams continued past max_model_len as a new engine request.",
            value=_rollovers,
        )
        yield CounterMetricFamily(
            "vllm:sink_stream_continuations",
            "Requests that continued a cached stream past max_model_len.",
            value=_continuations,
        )
        yield CounterMetricFamily(
            "vllm:sink_stream_restreams",
            "Requests past max_model_len that found no cached stream to continue "
            "and streamed their prompt from its start.",
            value=_restreams,
        )
        if _config is not None:
            info = GaugeMetricFamily(
                "vllm:sink_config_info",
                "Sink-mode configuration (value 1).",
                labels=["sink", "window"],
            )
            info.add_metric([str(_config.sink), str(_config.window)], 1)
            yield info


def start_front_end(cfg: SinkConfig) -> None:
    """Called where the engine config is built: set up dir, collector, counter."""
    global _collector, _config
    _config = cfg
    if not os.environ.get(DIR_ENV):
        directory = tempfile.mkdtemp(prefix="vllm-sink-metrics-")
        os.environ[DIR_ENV] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    if _collector is None:
        # A custom collector: vLLM unregisters "vllm:" metric objects when it
        # (re)creates its stat loggers, but leaves unnamed collectors alone.
        _collector = SinkCollector()
        REGISTRY.register(_collector)


def count_rollover() -> None:
    global _rollovers
    _rollovers += 1


def count_continuation(continued: bool) -> None:
    """A long prompt continued a cached stream, or fell back to re-streaming."""
    global _continuations, _restreams
    if continued:
        _continuations += 1
    else:
        _restreams += 1
