"""Smoke test of benchmarks/streaming_ppl.py on the tiny Llama (offline, seconds).

A few hundred tokens of synthetic text, past the tiny model's 256-token context, a
64-token cache: the plugin's streaming perplexity must equal the independent oracle's
and the JSON and PNG outputs must be written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import streaming_ppl


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, so texts and per-method results are computed here."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLLM_SINK_CACHE", str(cache))
    return cache


def test_streaming_ppl_smoke(tiny_llama: str, fresh_cache: Path, tmp_path: Path):
    out_json, out_png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    argv = [
        "--model", tiny_llama,
        "--stream", "synthetic",
        "--tokens", "320",
        "--cache", "64",
        "--sinks", "0", "4",
        "--methods", "dense", "sinks", "oracle",
        "--chunk", "64",
        "--oracle-tokens", "300",
        "--json", str(out_json),
        "--png", str(out_png),
    ]  # fmt: skip
    assert streaming_ppl.main(argv) == 0

    summary = json.loads(out_json.read_text())
    agree = summary["agreement"]
    assert agree["tokens"] == 299
    assert agree["ok"] and agree["relative_difference"] < 1e-4, agree
    assert agree["max_abs_logprob_diff"] < 1e-3, agree
    rows = {row["key"]: row for row in summary["rows"]}
    assert set(rows) == {"dense", "sink-0", "sink-4", "oracle"}
    assert rows["sink-4"]["tokens_scored"] == 319
    assert rows["dense"]["tokens_scored"] == 254  # context 256: prompt 255 + 1 output
    assert all(row["ppl"] and row["ppl"] > 1 for row in rows.values())
    oracle_targets = [t for t in summary["targets"] if "oracle" in t["target"]]
    assert [t["ok"] for t in oracle_targets] == [True]
    assert summary["config"]["tokens"] == 320
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (fresh_cache / "ppl").is_dir()
