"""Soak the OpenAI server in sink mode: many clients, a small KV pool, faults.

    python benchmarks/server_soak.py [--model tiny|smollm2|DIR] [--duration 300]
        [--clients 32] [--num-blocks 128] [--every 5] [--replays 20]
        [--json out.json] [--png out.png]

Starts ``vllm serve`` on 127.0.0.1 in sink mode with a KV pool small enough that
the scheduler must preempt, and drives it for ``--duration`` seconds with the
official ``openai`` async client: ``--clients`` concurrent clients, each a loop
of a random mix of

- long streamed completions past ``--max-model-len`` (greedy; ~10% of them
  disconnected by the client mid-stream),
- multi-turn chats re-sending their history, which grows past ``--max-model-len``,
- short requests (some streamed, some sampled),
- long non-streamed requests aborted by a client timeout,
- malformed or hostile requests (~5%, raw ``httpx``): bad ``max_tokens``, bad
  logprobs, huge ``n``, invalid JSON, unknown model, invalid token ids, a prompt
  of a million tokens (valid in sink mode: it is sent, then abandoned by timeout).

Every ``--every`` seconds it prints requests done, completion tokens/s, p50/p99
time to first token and inter-token latency (over the interval), KV-cache usage,
the plugin's pinned-block gauge, preemptions (``/metrics``) and the RSS of the
server and its engine core (``/proc`` via psutil).

At the end it checks (exit status 1 on any miss): ``/health`` answers; every
malformed request got a 4xx with a message and no request a 5xx; once the last
request ends, vLLM's ``kv_cache_usage_perc`` and the plugin's
``sink_pinned_blocks`` are both 0 (no block leaked); the RSS slope of server and
engine core over the second half stays below ``--rss-slope`` MiB/min; and
``--replays`` completed greedy requests, replayed one at a time on a fresh server
with the same flags, give the same text (one ASCII character per token on the
tiny model, so equal text is equal tokens). Each replay says whether the engine
core gave back one of its seam holds under pool pressure (``pressure.py`` logs
it; such a seam may recompute its seed inexactly).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ASCII = list(range(32, 127))  # tiny model: one printable character per token
WORDS = (
    "sink window stream token cache block seam river light stone paper cloud "
    "garden engine signal harbor winter copper lantern orbit"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2 or a model dir")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=44)
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument(
        "--num-blocks",
        type=int,
        default=128,
        help="KV pool (--num-gpu-blocks-override)",
    )
    p.add_argument("--long-tokens", type=int, nargs=2, default=(150, 700))
    p.add_argument("--disconnect", type=float, default=0.10)
    p.add_argument(
        "--malformed",
        type=float,
        default=0.10,
        help="share of client iterations (a chat is one: ~5%% of requests)",
    )
    p.add_argument("--timeouts", type=float, default=0.03)
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument(
        "--replay-server",
        choices=("fresh", "same"),
        default="fresh",
        help="replay on a fresh server (default) or the loaded one, once idle",
    )
    p.add_argument(
        "--rss-slope", type=float, default=10.0, help="bound, MiB/min, second half"
    )
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for KV usage 0 after the load",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", type=Path, default=None, help="server log file")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    return p.parse_args(argv)


# -- the server -------------------------------------------------------------


def model_dir(name: str) -> str:
    if name == "tiny":
        from vllm_sink.tiny_models import make_tiny_model

        return make_tiny_model("llama")
    if name == "smollm2":
        from vllm_sink.smollm2 import smollm2_path

        return smollm2_path()
    return name


class Server:
    """``vllm serve`` in sink mode as a subprocess (SIGTERM stops it)."""

    def __init__(self, args: argparse.Namespace, model: str, log: Path) -> None:
        self.port = args.port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        cmd = [
            str(Path(sys.executable).with_name("vllm")),
            "serve",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--block-size",
            str(args.block_size),
            "--enforce-eager",
            "--max-model-len",
            str(args.max_model_len),
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--max-num-batched-tokens",
            str(args.max_num_batched_tokens),
            "--num-gpu-blocks-override",
            str(args.num_blocks),
            "--served-model-name",
            "soak",
            "--gpu-memory-utilization",
            "0.5",
            "--seed",
            str(args.seed),
            "--attention-sink",
            str(args.sink),
            "--window",
            str(args.window),
        ]
        self.log = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self.out.flush()
        return self.log.read_text()[-n:]

    def rss_mib(self) -> tuple[float, float]:
        """RSS of the API server and of its engine core (largest child), MiB."""
        import psutil

        try:
            proc = psutil.Process(self.proc.pid)
            server = proc.memory_info().rss / 2**20
            children = [c.memory_info().rss for c in proc.children(recursive=True)]
        except psutil.Error:
            return 0.0, 0.0
        return server, (max(children) / 2**20 if children else 0.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


async def scrape(http, base: str) -> dict[str, float]:
    text = (await http.get(base + "/metrics", timeout=10)).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and " " in line:
            name, value = line.rsplit(" ", 1)
            key = name.split("{", 1)[0]
            try:
                out[key] = out.get(key, 0.0) + float(value)
            except ValueError:
                pass
    return out


# -- the load ---------------------------------------------------------------


@dataclass
class Stats:
    started: float = field(default_factory=time.perf_counter)
    done: dict[str, int] = field(default_factory=dict)  # kind -> completed requests
    faults: dict[str, int] = field(default_factory=dict)  # injected, by kind
    tokens: int = 0
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    itl: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # unexpected failures
    malformed: list[dict] = field(default_factory=list)  # kind, status, message
    completed: list[dict] = field(default_factory=list)  # greedy, for replay
    rows: list[dict] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.started

    def count(self, table: dict[str, int], kind: str) -> None:
        table[kind] = table.get(kind, 0) + 1


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Load:
    def __init__(self, args, base: str, stats: Stats, tiny: bool) -> None:
        import httpx
        import openai

        self.args, self.base, self.stats = args, base, stats
        limits = httpx.Limits(max_connections=4 * args.clients)
        self.http = httpx.AsyncClient(timeout=120, limits=limits)
        self.client = openai.AsyncOpenAI(
            base_url=base + "/v1",
            api_key="none",
            max_retries=0,
            timeout=300,
            http_client=httpx.AsyncClient(timeout=300, limits=limits),
        )
        self.malformed_sent = 0
        self.extra = {"ignore_eos": True}
        if tiny:
            self.extra["allowed_token_ids"] = ASCII

    # each returns after one request (or one conversation)

    async def stream_completion(self, rng: random.Random, *, drop: bool) -> None:
        a, st = self.args, self.stats
        body = dict(
            model="soak",
            prompt=words(rng, rng.randint(3, 60)),
            max_tokens=rng.randint(*a.long_tokens),
            temperature=0,
            extra_body=self.extra,
        )
        drop_at = rng.randint(1, body["max_tokens"] - 1) if drop else None
        text, rid = await self._stream(self.client.completions.create, body, drop_at)
        if drop:
            st.count(st.faults, "disconnect")
        elif len(text) != body["max_tokens"] and self.extra.get("allowed_token_ids"):
            st.errors.append(f"stream: {len(text)} chars of {body['max_tokens']}")
        else:
            item = {"kind": "completion", "body": body, "text": text}
            st.completed.append(item | {"id": rid})
        st.count(st.done, "long_stream" if not drop else "disconnected")

    async def _stream(self, create, body: dict, drop_at: int | None) -> tuple[str, str]:
        st = self.stats
        t0 = time.perf_counter()
        last, text, rid = None, "", ""
        stream = await create(stream=True, **body)
        chat = "messages" in body
        async for event in stream:
            rid = event.id or rid
            if not event.choices:
                continue
            delta = event.choices[0].delta.content if chat else event.choices[0].text
            if not delta:
                continue
            t = time.perf_counter()
            if last is None:
                st.ttft.append((st.now(), t - t0))
            else:
                st.itl.append((st.now(), (t - last) / len(delta)))
            last = t
            text += delta
            st.tokens += len(delta)
            if drop_at is not None and len(text) >= drop_at:
                await stream.close()  # the client goes away mid-stream
                break
        return text, rid

    async def chat(self, rng: random.Random) -> None:
        a, st = self.args, self.stats
        messages = [{"role": "system", "content": words(rng, rng.randint(2, 12))}]
        target = a.max_model_len * rng.uniform(1.5, 4)
        history = len(messages[0]["content"])
        while history < target:
            messages.append({"role": "user", "content": words(rng, rng.randint(2, 8))})
            body = dict(
                model="soak",
                messages=list(messages),
                max_tokens=rng.randint(16, 48),
                temperature=0,
                extra_body=self.extra,
            )
            drop = rng.random() < a.disconnect
            drop_at = rng.randint(1, body["max_tokens"] - 1) if drop else None
            create = self.client.chat.completions.create
            text, rid = await self._stream(create, body, drop_at)
            if drop:
                st.count(st.faults, "disconnect")
                st.count(st.done, "disconnected")
                return  # the user left the conversation
            messages.append({"role": "assistant", "content": text})
            history += len(text) + len(messages[-2]["content"]) + 30
            st.count(st.done, "chat_turn")
        st.completed.append({"kind": "chat", "body": body, "text": text, "id": rid})

    async def short(self, rng: random.Random) -> None:
        st = self.stats
        greedy = rng.random() < 0.7
        body = dict(
            model="soak",
            prompt=words(rng, rng.randint(1, 10)),
            max_tokens=rng.randint(1, 16),
            temperature=0 if greedy else 0.8,
            extra_body=self.extra,
        )
        if rng.random() < 0.5:
            text, rid = await self._stream(self.client.completions.create, body, None)
        else:
            t0 = time.perf_counter()
            out = await self.client.completions.create(**body)
            st.ttft.append((st.now(), time.perf_counter() - t0))
            text = out.choices[0].text
            rid = out.id
            st.tokens += out.usage.completion_tokens
        if greedy:
            item = {"kind": "short", "body": body, "text": text}
            st.completed.append(item | {"id": rid})
        st.count(st.done, "short")

    async def timeout(self, rng: random.Random) -> None:
        import openai

        st = self.stats
        try:
            await self.client.with_options(
                timeout=rng.uniform(0.2, 2.0)
            ).completions.create(
                model="soak",
                prompt=words(rng, 5),
                max_tokens=self.args.long_tokens[1] * 2,
                temperature=0,
                extra_body=self.extra,
            )
            st.count(st.done, "timeout_finished_first")
        except openai.APITimeoutError:
            st.count(st.faults, "timeout")

    async def malformed(self, rng: random.Random) -> None:
        import httpx

        st, a = self.stats, self.args
        kind = MALFORMED[self.malformed_sent % len(MALFORMED)]  # each kind in turn
        self.malformed_sent += 1
        url, content, body = self.base + "/v1/completions", None, None
        timeout = 30.0
        if kind == "bad_max_tokens":
            body = {"model": "soak", "prompt": "hi", "max_tokens": rng.choice([-5, 0])}
        elif kind == "bad_max_tokens_type":
            body = {"model": "soak", "prompt": "hi", "max_tokens": "lots"}
        elif kind == "bad_logprobs":
            body = {"model": "soak", "prompt": "hi", "max_tokens": 4}
            body["logprobs"] = rng.choice([-1, 10_000])
        elif kind == "bad_chat_logprobs":
            url = self.base + "/v1/chat/completions"
            body = {
                "model": "soak",
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": rng.choice([-3, 10_000]),
            }
        elif kind == "huge_n":
            body = {"model": "soak", "prompt": "hi", "max_tokens": 4, "n": 100_000}
        elif kind == "huge_n_long":
            n = a.max_model_len * 3
            body = {"model": "soak", "prompt": "hi", "max_tokens": n, "n": 64}
        elif kind == "invalid_json":
            content = b'{"model": "soak", "prompt": "hi", "max_tokens": 4,,}'
        elif kind == "unknown_model":
            body = {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}
        elif kind == "invalid_token_ids":
            body = {"model": "soak", "prompt": [5, 10**9, -3], "max_tokens": 4}
        elif kind == "negative_temperature":
            body = {"model": "soak", "prompt": "hi", "max_tokens": 4}
            body["temperature"] = -1
        elif kind == "million_tokens":
            # Valid in sink mode (it streams through): sent, then abandoned.
            prompt = [rng.randrange(32, 127) for _ in range(1_000_000)]
            body = {"model": "soak", "prompt": prompt, "max_tokens": 4}
            timeout = rng.uniform(1.0, 5.0)
        st.count(st.faults, "malformed:" + kind)
        record = {"kind": kind, "status": None, "message": ""}
        try:
            if content is not None:
                r = await self.http.post(
                    url,
                    content=content,
                    headers={"content-type": "application/json"},
                    timeout=timeout,
                )
            else:
                r = await self.http.post(url, json=body, timeout=timeout)
            record["status"] = r.status_code
            try:
                record["message"] = str(r.json().get("error", {}).get("message", ""))
            except (ValueError, AttributeError):
                record["message"] = r.text[:200]
        except httpx.TimeoutException:
            record["status"] = "timeout"
        st.malformed.append(record)

    async def client_loop(self, index: int, stop_at: float) -> None:
        import openai

        a = self.args
        rng = random.Random(a.seed * 1000 + index)
        while time.perf_counter() < stop_at:
            x = rng.random()
            try:
                if x < a.malformed:
                    await self.malformed(rng)
                elif x < a.malformed + a.timeouts:
                    await self.timeout(rng)
                elif x < 0.45:
                    drop = rng.random() < a.disconnect
                    await self.stream_completion(rng, drop=drop)
                elif x < 0.70:
                    await self.chat(rng)
                else:
                    await self.short(rng)
            except openai.APIStatusError as e:
                self.stats.errors.append(f"HTTP {e.status_code}: {e.message[:200]}")
            except (openai.APIError, OSError) as e:
                self.stats.errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    async def close(self) -> None:
        await self.http.aclose()
        await self.client.close()


MALFORMED = (
    "bad_max_tokens",
    "bad_max_tokens_type",
    "bad_logprobs",
    "bad_chat_logprobs",
    "huge_n",
    "huge_n_long",
    "invalid_json",
    "unknown_model",
    "invalid_token_ids",
    "negative_temperature",
    "million_tokens",
)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def monitor(load: Load, server: Server, stop: asyncio.Event) -> None:
    st, a = load.stats, load.args
    last_t, last_tokens = 0.0, 0
    print(
        f"{'t(s)':>6} {'done':>6} {'tok/s':>7} {'ttft50':>7} {'ttft99':>7} "
        f"{'itl50':>7} {'itl99':>7} {'kv%':>5} {'pinned':>6} {'preempt':>7} "
        f"{'run':>4} {'wait':>4} {'srvMiB':>7} {'coreMiB':>7}",
        flush=True,
    )
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), a.every)
        except asyncio.TimeoutError:
            pass
        t = st.now()
        try:
            m = await scrape(load.http, server.base)
        except Exception as e:  # noqa: BLE001 - a scrape failure is data
            st.errors.append(f"metrics scrape: {e!r}")
            m = {}
        rss_server, rss_core = server.rss_mib()
        ttft = [v for (ts, v) in st.ttft if ts > last_t]
        itl = [v for (ts, v) in st.itl if ts > last_t]
        row = {
            "t": t,
            "done": sum(st.done.values()),
            "tokens": st.tokens,
            "tok_s": (st.tokens - last_tokens) / max(t - last_t, 1e-9),
            "ttft_p50": pct(ttft, 0.5),
            "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5),
            "itl_p99": pct(itl, 0.99),
            "kv_usage": m.get("vllm:kv_cache_usage_perc", float("nan")),
            "pinned": m.get("vllm:sink_pinned_blocks", float("nan")),
            "preemptions": m.get("vllm:num_preemptions_total", float("nan")),
            "running": m.get("vllm:num_requests_running", float("nan")),
            "waiting": m.get("vllm:num_requests_waiting", float("nan")),
            "rollovers": m.get("vllm:sink_rollovers_total", float("nan")),
            "rss_server": rss_server,
            "rss_core": rss_core,
        }
        st.rows.append(row)
        print(
            f"{t:6.0f} {row['done']:6d} {row['tok_s']:7.0f} "
            f"{row['ttft_p50'] * 1e3:6.0f}m {row['ttft_p99'] * 1e3:6.0f}m "
            f"{row['itl_p50'] * 1e3:6.0f}m {row['itl_p99'] * 1e3:6.0f}m "
            f"{row['kv_usage'] * 100:5.1f} {row['pinned']:6.0f} "
            f"{row['preemptions']:7.0f} {row['running']:4.0f} {row['waiting']:4.0f} "
            f"{rss_server:7.0f} {rss_core:7.0f}",
            flush=True,
        )
        last_t, last_tokens = t, st.tokens


async def drive(args, server: Server, stats: Stats, tiny: bool) -> dict:
    load = Load(args, server.base, stats, tiny)
    stop = asyncio.Event()
    mon = asyncio.create_task(monitor(load, server, stop))
    stop_at = time.perf_counter() + args.duration
    clients = [
        asyncio.create_task(load.client_loop(i, stop_at)) for i in range(args.clients)
    ]
    # Requests started before the deadline finish (or are abandoned) after it.
    done, pending = await asyncio.wait(
        clients, timeout=args.duration + args.drain_timeout
    )
    for task in pending:
        task.cancel()
        stats.errors.append("a client was still busy after the drain timeout")
    await asyncio.gather(*pending, return_exceptions=True)
    load_end = stats.now()
    # Idle: every block back (the engine core flushes its gauge every 0.2 s).
    final: dict[str, float] = {}
    deadline = time.perf_counter() + args.idle_timeout
    while time.perf_counter() < deadline:
        final = await scrape(load.http, server.base)
        idle = final.get("vllm:num_requests_running", 1) == 0
        idle = idle and final.get("vllm:num_requests_waiting", 1) == 0
        if idle and final.get("vllm:kv_cache_usage_perc", 1) == 0:
            await asyncio.sleep(1.0)
            final = await scrape(load.http, server.base)
            break
        await asyncio.sleep(1.0)
    health = (await load.http.get(server.base + "/health", timeout=10)).status_code
    stop.set()
    await mon
    await load.close()
    return {"final_metrics": final, "health": health, "load_end_s": load_end}


def given_back(log: Path) -> list[str]:
    """Seam holds the engine core gave back under pressure (pressure.py logs)."""
    mark = "gave back seam hold "
    keys = []
    for line in log.read_text(errors="replace").splitlines():
        if mark in line:
            keys.append(line.split(mark, 1)[1].split(" ", 1)[0])
    return keys


async def replay(args, base: str, sample: list[dict]) -> list[dict]:
    import httpx
    import openai

    client = openai.AsyncOpenAI(
        base_url=base + "/v1",
        api_key="none",
        max_retries=0,
        timeout=600,
        http_client=httpx.AsyncClient(timeout=600),
    )
    out = []
    for item in sample:
        body = item["body"]
        if item["kind"] == "chat":
            reply = await client.chat.completions.create(**body)
            text = reply.choices[0].message.content
        else:
            text = (await client.completions.create(**body)).choices[0].text
        same = text == item["text"]
        first_diff = next(
            (i for i, (x, y) in enumerate(zip(text, item["text"])) if x != y),
            None if same else min(len(text), len(item["text"])),
        )
        out.append(
            {
                "kind": item["kind"],
                "max_tokens": body["max_tokens"],
                "equal": same,
                "first_diff": first_diff,
                "id": item.get("id", ""),
            }
        )
    await client.close()
    return out


def slope_mib_per_min(rows: list[dict], key: str) -> float:
    half = rows[len(rows) // 2 :]
    if len(half) < 3:
        return 0.0
    ts = [r["t"] / 60 for r in half]
    ys = [r[key] for r in half]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    axes[0].plot(t, [r["tok_s"] for r in rows])
    axes[0].set_title("completion tokens/s")
    for key, label in (
        ("ttft_p50", "TTFT p50"),
        ("ttft_p99", "TTFT p99"),
        ("itl_p50", "ITL p50"),
        ("itl_p99", "ITL p99"),
    ):
        axes[1].plot(t, [r[key] for r in rows], label=label)
    axes[1].set_yscale("log")
    axes[1].set_title("latency (s)")
    axes[1].legend(fontsize=7)
    axes[2].plot(t, [100 * r["kv_usage"] for r in rows], label="KV usage %")
    axes[2].plot(t, [r["running"] for r in rows], label="running")
    axes[2].plot(t, [r["waiting"] for r in rows], label="waiting")
    axes[2].set_title("KV usage (%), requests")
    axes[2].legend(fontsize=7)
    axes[3].plot(t, [r["rss_server"] for r in rows], label="API server")
    axes[3].plot(t, [r["rss_core"] for r in rows], label="engine core")
    axes[3].set_title("RSS (MiB)")
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def check(args, stats: Stats, end: dict, replays: list[dict]) -> list[str]:
    misses = []
    if end["health"] != 200:
        misses.append(f"/health answered {end['health']}")
    for rec in stats.malformed:
        status = rec["status"]
        if rec["kind"] == "million_tokens":
            if isinstance(status, int) and status >= 500:
                misses.append(f"million_tokens got {status}: {rec['message']}")
            continue
        if not (isinstance(status, int) and 400 <= status < 500 and rec["message"]):
            misses.append(f"malformed {rec['kind']}: {status} {rec['message']!r}")
    five = [e for e in stats.errors if e.startswith("HTTP 5")]
    misses += [f"5xx: {e}" for e in five[:10]]
    other = [e for e in stats.errors if not e.startswith("HTTP 5")]
    misses += [f"unexpected: {e}" for e in other[:10]]
    m = end["final_metrics"]
    usage, pinned = m.get("vllm:kv_cache_usage_perc"), m.get("vllm:sink_pinned_blocks")
    if usage != 0 or pinned != 0:
        misses.append(
            f"blocks leaked: kv_cache_usage_perc={usage} "
            f"(~{(usage or 0) * args.num_blocks:.0f} blocks), "
            f"sink_pinned_blocks={pinned}"
        )
    for key in ("rss_server", "rss_core"):
        slope = slope_mib_per_min(stats.rows, key)
        if slope > args.rss_slope:
            misses.append(f"{key} grows {slope:.1f} MiB/min > {args.rss_slope}")
    bad = [r for r in replays if not r["equal"]]
    if bad:
        gave = sum(r.get("hold_given_back", False) for r in bad)
        misses.append(
            f"{len(bad)}/{len(replays)} replays differ ({gave} of them had a seam "
            f"hold given back under pool pressure): {bad[:5]}"
        )
    return misses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = model_dir(args.model)
    tiny = args.model == "tiny"
    log = args.log or Path(f"/tmp/server_soak_{os.getpid()}.log")
    print(f"model {model}; server log {log}", flush=True)
    server = Server(args, model, log)
    stats = Stats()
    try:
        server.wait_ready()
        stats.started = time.perf_counter()
        end = asyncio.run(drive(args, server, stats, tiny))
        if server.proc.poll() is not None:
            end["health"] = f"server exited {server.proc.returncode}"
    finally:
        if args.replay_server == "fresh" or server.proc.poll() is not None:
            server.stop()
    rng = random.Random(args.seed)
    sample = rng.sample(stats.completed, min(args.replays, len(stats.completed)))
    # Prefer long ones (past max_model_len: they have seams).
    sample.sort(key=lambda item: -item["body"]["max_tokens"])
    replays: list[dict] = []
    if sample:
        if args.replay_server == "fresh":
            server = Server(args, model, log.with_suffix(".replay.log"))
        try:
            server.wait_ready()
            t0 = time.perf_counter()
            replays = asyncio.run(replay(args, server.base, sample))
            print(f"replayed {len(replays)} in {time.perf_counter() - t0:.0f} s")
        finally:
            server.stop()
    elif server.proc.poll() is None:
        server.stop()
    released = given_back(log)
    for r in replays:
        r["hold_given_back"] = bool(r["id"]) and any(r["id"] in k for k in released)
    misses = check(args, stats, end, replays)
    statuses: dict[str, dict[str, int]] = {}
    for rec in stats.malformed:
        by = statuses.setdefault(rec["kind"], {})
        by[str(rec["status"])] = by.get(str(rec["status"]), 0) + 1
    summary = {
        "requests": sum(stats.done.values()),
        "requests_by_kind": stats.done,
        "completion_tokens": stats.tokens,
        "faults": stats.faults,
        "malformed_statuses": statuses,
        "malformed_messages": {r["kind"]: r["message"][:160] for r in stats.malformed},
        "preemptions": end["final_metrics"].get("vllm:num_preemptions_total"),
        "rollovers": end["final_metrics"].get("vllm:sink_rollovers_total"),
        "prefix_cache_hits": end["final_metrics"].get("vllm:prefix_cache_hits_total"),
        "seed_holds_released": end["final_metrics"].get(
            "vllm:sink_seed_holds_released_total"
        ),
        "continuations": end["final_metrics"].get(
            "vllm:sink_stream_continuations_total"
        ),
        "final_kv_usage": end["final_metrics"].get("vllm:kv_cache_usage_perc"),
        "final_pinned_blocks": end["final_metrics"].get("vllm:sink_pinned_blocks"),
        "ttft_p50_s": pct([v for _, v in stats.ttft], 0.5),
        "ttft_p99_s": pct([v for _, v in stats.ttft], 0.99),
        "itl_p50_s": pct([v for _, v in stats.itl], 0.5),
        "itl_p99_s": pct([v for _, v in stats.itl], 0.99),
        "rss_slope_server_mib_min": slope_mib_per_min(stats.rows, "rss_server"),
        "rss_slope_core_mib_min": slope_mib_per_min(stats.rows, "rss_core"),
        "load_s": end["load_end_s"],
        "health": end["health"],
        "replays": len(replays),
        "replay_mismatches": [r for r in replays if not r["equal"]],
        "errors": stats.errors[:50],
        "misses": misses,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, indent=1))
    if args.json:
        doc = {
            "args": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            },
            "summary": summary,
            "rows": stats.rows,
            "replays": replays,
        }
        args.json.write_text(json.dumps(doc, indent=1))
    if args.png and stats.rows:
        plot(stats.rows, args.png)
    if misses:
        print("FAILED:\n  " + "\n  ".join(misses))
        return 1
    print("OK: every check held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
