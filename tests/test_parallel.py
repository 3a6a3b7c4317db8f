"""Sink mode across processes: tensor parallel (mp and Ray executors) and pipeline
parallel give the same stream as one process.

One stream of 160 tokens (10 x (S + W)) per engine: TP=1 in this process is the
reference; TP=2, PP=2 and TP=2 under Ray each run in a fresh process
(tests/parallel_run.py) in vLLM's default multiprocess mode (client, engine core,
workers), one engine at a time, workers bound to one core each. Tokens must be
identical and logprobs within 1e-4.

Ray: vLLM 0.32.0 refuses the Ray executor on CPU only because ``CpuPlatform`` has
no ``ray_device_key``. The Ray test pip-installs the test-only platform plugin of
tests/ray_cpu_platform into a temporary folder put on ``PYTHONPATH`` of the run
(the venv is left untouched) and starts Ray on 127.0.0.1 only. Ray is part of the
test extra: if it is missing the test fails, it does not skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import make_llm, shutdown
from parallel_run import MAX_TOKENS, PROMPT, SINK, WINDOW

HERE = Path(__file__).parent
RUNNER = HERE / "parallel_run.py"
# Seconds per engine run: about 1 min on 2 idle cores; generous for shared machines.
RUN_TIMEOUT = int(os.environ.get("VLLM_SINK_TEST_RUN_TIMEOUT", "600"))


def _bind_two_cores() -> str:
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, f"tensor/pipeline parallel 2 needs 2 cores, have {cores}"
    return f"{cores[0]}|{cores[1]}"


def _run(model: str, opts: dict, tmp_path: Path, **env_extra: str):
    """Run tests/parallel_run.py in its own process group; return (tokens,
    logprobs, platform name)."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": _bind_two_cores(), **env_extra}
    # conftest keeps engines in-process; these runs use the default mode (an
    # engine-core process), where plugins must load in every process.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(RUNNER), model, json.dumps(opts)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # end whatever is left of the run's group: workers, Ray
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if rc is None:
        pytest.fail(f"run {opts} timed out:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert rc == 0, f"run {opts} failed (rc {rc}):\n{text[-4000:]}"
    lines = dict(
        x.split(" ", 1) for x in text.splitlines() if x[:4] in ("OUT ", "PLAT")
    )
    tokens, logprobs = json.loads(lines["OUT"])
    return tokens, logprobs, lines["PLATFORM"]


@pytest.fixture(scope="module")
def tp1(tiny_llama):
    """The reference: TP=1, engine in this process."""
    from vllm import SamplingParams

    llm = make_llm(tiny_llama, SINK, WINDOW)
    try:
        (out,) = llm.generate(
            [{"prompt_token_ids": PROMPT}],
            SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0
            ),
        )
    finally:
        shutdown(llm)
    o = out.outputs[0]
    return list(o.token_ids), [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)]


def _assert_same(reference, tokens, logprobs):
    ref_tokens, ref_logprobs = reference
    assert len(tokens) == MAX_TOKENS
    assert tokens == ref_tokens
    diff = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
    assert diff < 1e-4, diff


def test_tensor_parallel_2_equals_1(tiny_llama, tp1, tmp_path):
    """Client, engine core and two TP workers (mp executor)."""
    tokens, logprobs, platform = _run(tiny_llama, {"tp": 2}, tmp_path)
    assert platform == "CpuPlatform"
    _assert_same(tp1, tokens, logprobs)


def test_pipeline_parallel_2_equals_1(tiny_llama, tp1, tmp_path):
    """PP=2 with the default mp executor.

    vLLM 0.32.0 on CPU cannot run PP with ``enforce_eager``, sink mode or not: the
    CPU worker warms the model up only in a compile mode, and only that warm-up
    (``_dummy_run``) allocates the buffer the second stage receives into
    (``GPUModelRunner.intermediate_tensors``); eager runs die on
    ``assert self.intermediate_tensors is not None`` in
    ``sync_and_gather_intermediate_tensors``. So this run uses a single Dynamo
    trace with the eager backend (no Inductor, quick to start).
    """
    opts = {
        "pp": 2,
        "llm_kwargs": {
            "enforce_eager": False,
            "compilation_config": {"mode": 2, "backend": "eager"},
        },
    }
    tokens, logprobs, _ = _run(tiny_llama, opts, tmp_path)
    _assert_same(tp1, tokens, logprobs)


@pytest.fixture(scope="module")
def ray_cpu_platform(tmp_path_factory) -> Path:
    """tests/ray_cpu_platform pip-installed into a temporary folder (not the venv)."""
    if importlib.util.find_spec("ray") is None:
        pytest.fail(
            "ray is not installed; it is part of the test extra: "
            "pip install -e '.[test]' (or bash scripts/setup.sh)"
        )
    root = tmp_path_factory.mktemp("ray_cpu_platform")
    source, target = root / "src", root / "site"
    shutil.copytree(HERE / "ray_cpu_platform", source)  # builds leave files behind
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    cmd += ["--no-deps", "--target", str(target), str(source)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.append("--no-build-isolation")  # no download needed
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def test_ray_tensor_parallel_2_equals_1(tiny_llama, tp1, ray_cpu_platform, tmp_path):
    """TP=2 on vLLM's Ray executor: the engine core joins the Ray instance the
    client started (RAY_ADDRESS) and runs two Ray actors, each loading vllm-sink."""
    trace = tmp_path / "trace"
    ray_tmp = tempfile.mkdtemp(prefix="vsray")  # short: Ray puts sockets there
    try:
        tokens, logprobs, platform = _run(
            tiny_llama,
            {"tp": 2, "ray_tmp": ray_tmp},
            tmp_path,
            PYTHONPATH=os.pathsep.join(
                [str(ray_cpu_platform), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            VLLM_SINK_TRACE_DIR=str(trace),
            VLLM_HOST_IP="127.0.0.1",
            RAY_USAGE_STATS_ENABLED="0",
            # Ray's switch for single-machine use: node address 127.0.0.1, no
            # probing for a routable interface.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert platform == "RayCpuPlatform"
    markers = [p.read_text() for p in trace.iterdir()]
    in_actors = [m for m in markers if "default_worker.py" in m]
    assert len(in_actors) >= 2, f"vllm-sink not registered in 2 Ray actors: {markers}"
    _assert_same(tp1, tokens, logprobs)
