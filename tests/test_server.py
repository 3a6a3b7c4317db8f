"""The real OpenAI server in sink mode, driven by the official openai client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

MAX_MODEL_LEN = 128
SINK, WINDOW = 4, 20
ASCII = list(range(32, 127))  # one printable character per token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    cmd = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        tiny_llama,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--block-size",
        "16",
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        "16",
        "--max-num-batched-tokens",
        "256",
        "--served-model-name",
        "tiny",
        "--gpu-memory-utilization",  # the share of RAM vLLM on CPU wants free
        "0.5",
        "--attention-sink",
        str(SINK),
        "--window",
        str(WINDOW),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            fetch(base + "/health")
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"server not ready:\n{log.read_text()[-3000:]}")
    yield base
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def metric(base: str, name: str) -> float:
    for line in fetch(base + "/metrics").splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


def test_streamed_completion_ten_times_max_model_len(server):
    n = 10 * MAX_MODEL_LEN + 50
    c = client(server)
    common = dict(
        model="tiny",
        prompt="The stream begins: ",
        max_tokens=n,
        temperature=0,
        extra_body={"allowed_token_ids": ASCII, "ignore_eos": True},
    )
    chunks, finishes, usage = [], [], None
    for event in c.completions.create(
        stream=True, stream_options={"include_usage": True}, **common
    ):
        if event.choices:
            chunks.append(event.choices[0].text)
            finishes.append(event.choices[0].finish_reason)
        if event.usage:
            usage = event.usage
    text = "".join(chunks)
    assert len(text) == n  # one ASCII character per token: nothing lost or doubled
    assert [f for f in finishes if f] == ["length"] and finishes[-1] == "length"
    assert usage.completion_tokens == n
    assert usage.prompt_tokens == len("The stream begins: ")
    whole = c.completions.create(**common)  # non-streaming, same greedy stream
    assert whole.choices[0].text == text
    assert whole.usage.completion_tokens == n
    assert metric(server, "vllm:sink_rollovers_total") >= 2 * 10


def test_chat_history_beyond_max_model_len(server):
    """Each turn past --max-model-len continues the cached stream (prefix hits)."""
    c = client(server)
    messages = [{"role": "system", "content": "You are a tiny random model."}]
    prompt_tokens, counters = [], []
    for turn in range(10):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me more."})
        reply = c.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=40,
            temperature=0,
            extra_body={"allowed_token_ids": ASCII, "ignore_eos": True},
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "length"
        assert len(choice.message.content) == 40
        prompt_tokens.append(reply.usage.prompt_tokens)
        counters.append(
            (
                metric(server, "vllm:prefix_cache_hits_total"),
                metric(server, "vllm:sink_stream_continuations_total"),
                metric(server, "vllm:sink_stream_restreams_total"),
            )
        )
        messages.append({"role": "assistant", "content": choice.message.content})
    assert prompt_tokens[-4] > 2 * MAX_MODEL_LEN
    assert prompt_tokens == sorted(prompt_tokens)
    for (hits0, cont0, re0), (hits1, cont1, re1) in zip(counters[-4:], counters[-3:]):
        assert hits1 > hits0  # the history's blocks came from the cache
        assert (cont1 - cont0, re1 - re0) == (1, 0)  # continued, not re-streamed


def test_concurrent_streams_and_a_disconnect(server):
    prompts = [f"Stream number {i} says" for i in range(8)]
    n = 3 * MAX_MODEL_LEN
    params = dict(
        max_tokens=n,
        temperature=0,
        extra_body={"allowed_token_ids": ASCII, "ignore_eos": True},
    )
    c = client(server)
    solo = [
        c.completions.create(model="tiny", prompt=p, **params).choices[0].text
        for p in prompts[1:]
    ]

    async def run_all():
        ac = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0)

        async def one(prompt: str, drop_after: int | None) -> str:
            text = ""
            stream = await ac.completions.create(
                model="tiny", prompt=prompt, stream=True, **params
            )
            async for event in stream:
                text += event.choices[0].text
                if drop_after is not None and len(text) >= drop_after:
                    await stream.close()  # the client disconnects mid-stream
                    break
            return text

        return await asyncio.gather(
            one(prompts[0], drop_after=MAX_MODEL_LEN),
            *(one(p, None) for p in prompts[1:]),
        )

    results = asyncio.run(run_all())
    assert MAX_MODEL_LEN <= len(results[0]) < n
    assert results[1:] == solo  # the others are unaffected
    deadline = time.time() + 30
    while metric(server, "vllm:num_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0  # every block returned


def test_bad_requests_get_400_and_the_server_stays_up(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="tiny", prompt="hi", max_tokens=-5)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        c.completions.create(
            model="tiny",
            prompt="hi",
            max_tokens=500,
            n=2,
            extra_body={"ignore_eos": True},
            temperature=1.0,
        )
    assert fetch(server + "/health") == ""
    ok = c.completions.create(model="tiny", prompt="hi", max_tokens=5)
    assert ok.usage.completion_tokens <= 5


def test_metrics_report_sink_mode(server):
    c = client(server)
    c.completions.create(
        model="tiny", prompt="a", max_tokens=300, extra_body={"ignore_eos": True}
    )
    time.sleep(1.5)  # the engine core flushes its counters every 0.2 s
    text = fetch(server + "/metrics")
    assert f'vllm:sink_config_info{{sink="{SINK}",window="{WINDOW}"}} 1.0' in text
    assert metric(server, "vllm:sink_window_freed_blocks_total") > 0
    assert metric(server, "vllm:sink_pinned_blocks") >= 0
    assert metric(server, "vllm:sink_rollovers_total") > 0
