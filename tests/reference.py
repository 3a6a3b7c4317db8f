"""Oracle references computed in clean spawned processes, cached on disk.

vLLM's Transformers backend decorates HF model classes once imported, so the
oracle (pure transformers + torch) never runs in a process that loaded vLLM.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ORACLE_SOURCE = Path(__file__).with_name("oracle.py")


@dataclass(frozen=True)
class Job:
    """A stream: ``prompt`` then ``max_new_tokens`` greedy tokens."""

    model: str
    sink: int | None
    window: int | None
    prompt: tuple[int, ...]
    max_new_tokens: int
    zero_sink: bool = False


@dataclass
class Reference:
    tokens: list[int]
    logprobs: list[float]  # of each generated token
    prompt_logprobs: list[float]  # of prompt tokens 1..


def _cache_path(job: Job) -> Path:
    root = Path(os.environ.get("VLLM_SINK_CACHE", Path.home() / ".cache" / "vllm-sink"))
    key = json.dumps(asdict(job), sort_keys=True) + ORACLE_SOURCE.read_text()
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / "oracle" / f"{digest}.json"


def _run(job: Job) -> dict:
    import torch
    from oracle import SinkOracle

    oracle = SinkOracle(job.model, job.sink, job.window, zero_sink=job.zero_sink)
    stream = oracle.stream()
    logits = [stream.feed(t) for t in job.prompt]
    logprobs = [torch.log_softmax(x.float(), -1) for x in logits]
    prompt_lps = [float(lp[t]) for lp, t in zip(logprobs, job.prompt[1:])]
    tokens, lps = [], []
    last = logprobs[-1]
    for i in range(job.max_new_tokens):
        token = int(torch.argmax(last))
        tokens.append(token)
        lps.append(float(last[token]))
        if i + 1 < job.max_new_tokens:
            last = torch.log_softmax(stream.feed(token).float(), -1)
    return {"tokens": tokens, "logprobs": lps, "prompt_logprobs": prompt_lps}


def references(jobs: list[Job], processes: int = 2) -> list[Reference]:
    """Oracle results for ``jobs``, computing the uncached ones in parallel."""
    results: dict[Job, dict] = {}
    todo = []
    for job in jobs:
        path = _cache_path(job)
        if path.exists():
            results[job] = json.loads(path.read_text())
        elif job not in todo:
            todo.append(job)
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(processes, len(todo))) as pool:
            for job, result in zip(todo, pool.map(_run, todo)):
                path = _cache_path(job)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(result))
                os.replace(tmp, path)
                results[job] = result
    return [Reference(**results[job]) for job in jobs]
