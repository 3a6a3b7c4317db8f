"""A short soak of the OpenAI server in sink mode (``benchmarks/server_soak.py``).

About 30 s of load from 16 async clients on a small KV pool: long streams past
--max-model-len, chats re-sending their history, short requests, client
disconnects and timeouts, and every kind of malformed request; then the
harness's own checks (health, 4xx with a message for each malformed request and
no 5xx, KV usage and pinned-block gauge back to 0, replays of completed greedy
requests equal). RSS is checked by the long run (RESULTS.md): 45 s is warm-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_server_soak_short(tmp_path, tiny_llama):
    sys.path.insert(0, str(ROOT))
    from benchmarks import server_soak

    out = tmp_path / "soak.json"
    rc = server_soak.main(
        [
            "--duration",
            "30",
            "--clients",
            "16",
            "--num-blocks",
            "96",
            "--max-num-batched-tokens",
            "64",
            "--long-tokens",
            "150",
            "400",
            "--every",
            "5",
            "--replays",
            "8",
            "--replay-server",
            "same",
            "--idle-timeout",
            "15",
            "--rss-slope",
            "1e9",
            "--log",
            str(tmp_path / "serve.log"),
            "--json",
            str(out),
        ]
    )
    summary = json.loads(out.read_text())["summary"]
    assert not summary["misses"]
    assert rc == 0
    assert summary["requests"] > 50
    assert summary["faults"].get("disconnect", 0) > 0
    assert any(k.startswith("malformed:") for k in summary["faults"])
    assert summary["rollovers"] > 0  # streams went past --max-model-len
    assert summary["replays"] > 0 and not summary["replay_mismatches"]
    assert summary["final_kv_usage"] == 0 and summary["final_pinned_blocks"] == 0
