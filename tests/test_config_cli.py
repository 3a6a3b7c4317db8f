"""Flags, configuration and start-up validation, through the public interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_llm

import vllm_sink
from vllm_sink import SinkConfig, SinkConfigError
from vllm_sink.config import from_flags
from vllm_sink.tiny_models import make_tiny_model

VLLM_BIN = str(Path(sys.executable).with_name("vllm"))
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VLLM_BIN, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_sink_config_helper_builds_additional_config():
    cfg = SinkConfig(sink=4, window=2048)
    assert cfg.additional_config() == {"attention_sink": {"sink": 4, "window": 2048}}
    assert SinkConfig.from_value({"window": 100}) == SinkConfig(4, 100)
    assert SinkConfig(0, 8).span == 8  # S=0: window only, allowed


@pytest.mark.parametrize(
    "value, match",
    [
        ({"sink": -1, "window": 8}, "--attention-sink"),
        ({"sink": 4, "window": 0}, "--window"),
        ({"sink": 2.5, "window": 8}, "--attention-sink.*integer"),
        ({"sink": 4, "window": "many"}, "--window.*integer"),
        ({"sink": 4}, "--window is required"),
        ({"sink": 4, "window": 8, "windows": 2}, "unknown keys"),
        ([4, 8], "must be a dict"),
    ],
)
def test_bad_values_name_the_flag(value, match):
    with pytest.raises(SinkConfigError, match=match):
        SinkConfig.from_value(value)


def test_flag_defaults():
    assert from_flags(None, None) is None
    assert from_flags(None, 64) == SinkConfig(4, 64)
    with pytest.raises(SinkConfigError, match="--attention-sink needs --window"):
        from_flags(4, None)


def test_version_guard(monkeypatch):
    monkeypatch.delenv(vllm_sink.ALLOW_ENV, raising=False)
    for ok in ("0.32.0+cpu", "0.32.1", "0.33.0", "0.33.2.dev4+g1234.cpu", "0.33.0rc1"):
        vllm_sink.check_vllm_version(ok)
    for refused in ("0.31.9", "0.34.0", "0.34.0rc1", "1.0.0", "dev"):
        with pytest.raises(RuntimeError, match=r"supports vLLM >=0.32.0,<0.34"):
            vllm_sink.check_vllm_version(refused)
    monkeypatch.setenv(vllm_sink.ALLOW_ENV, "1")
    vllm_sink.check_vllm_version("0.34.0")


def test_hook_targets_are_found_by_feature():
    """A missing target or parameter fails start-up naming the reach."""
    from vllm_sink.patching import ReachError, find_attr, wrap_method

    assert find_attr("vllm_sink.config", "SinkConfig.from_value", reason="x")
    assert find_attr("vllm_sink.nowhere", "X", reason="x", required=False) is None
    with pytest.raises(
        ReachError, match=r"vllm_sink\.config\.Nope .*needs it for: why"
    ):
        find_attr("vllm_sink.config", "Nope", reason="why")

    class Owner:
        def method(self, request, *args):
            return request

    with pytest.raises(ReachError, match=r"Owner\.method has no parameter budget"):
        wrap_method(Owner, "method", reason="r", diff="d", params=("budget",))(
            lambda original, *a: original(*a)
        )
    with pytest.raises(ReachError, match=r"Owner\.gone does not exist"):
        wrap_method(Owner, "gone", reason="r", diff="d")(lambda original: None)
    assert Owner().method(1) == 1  # nothing was replaced


def test_a_wrapped_callable_changed_in_vllm_fails_start_up(monkeypatch):
    """With VLLM_SINK_ALLOW_ANY_VLLM=1 a vLLM whose hook target changed fails at
    start-up naming the patch, not later with wrong arguments."""
    from vllm_sink import patching

    class Owner:
        def method(self, request, *, budget=3):
            return request

    target = f"{Owner.__module__}.{Owner.__qualname__}.method"
    assert patching.signature_of(Owner.method) == "(self, request, *, budget=)"
    monkeypatch.setattr(
        patching, "_tested_signatures", lambda: {target: ["(self, request)"]}
    )
    with pytest.raises(
        patching.ReachError,
        match=r"signature \(self, request, \*, budget=\), not one the plugin is "
        r"tested with \(\(self, request\)\); patches/0007-x\.diff needs porting",
    ):
        patching.wrap_method(Owner, "method", reason="r", diff="0007-x.diff")(
            lambda original, *a: original(*a)
        )
    assert Owner().method(1) == 1  # nothing was replaced


def test_every_hook_target_is_recorded_as_tested():
    """The installed vLLM's hook targets are the ones signatures.json records
    (start-up checks each one against it)."""
    from vllm_sink import patching

    vllm_sink.register()
    tested = patching._tested_signatures()
    wrapped = [p for p in patching.installed_patches() if not p.added]
    assert len(wrapped) >= 20
    for patch in wrapped:
        assert patch.target in tested, patch.target


def test_register_is_idempotent():
    from vllm_sink.patching import installed_patches

    vllm_sink.register()
    before = [p.target for p in installed_patches()]
    vllm_sink.register()
    assert [p.target for p in installed_patches()] == before
    assert len(before) == len(set(before)) >= 6


def test_serve_help_lists_flags_in_their_own_group():
    result = run_cli("serve", "--help=all", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "Attention sinks (vllm-sink)" in text
    group = text.split("Attention sinks (vllm-sink)", 1)[1]
    assert "--attention-sink" in group.split("\n\n\n")[0] or "--attention-sink" in group
    assert "--window" in group


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--window", "-3"], "--window must be >= 1"),
        (
            ["--attention-sink", "x", "--window", "8"],
            "--attention-sink must be an integer",
        ),
        (["--attention-sink", "4"], "--attention-sink needs --window"),
        (["--attention-sink", "4", "--window", "300"], "max_position_embeddings"),
    ],
)
def test_bad_flags_fail_at_start_up(flags, message, tiny_llama):
    result = run_cli(
        "serve", tiny_llama, "--port", "18999", "--max-model-len", "256", *flags
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_offline_bad_window_is_refused_before_the_engine_starts(tiny_llama):
    with pytest.raises(SinkConfigError, match=r"--window 252 or smaller"):
        make_llm(tiny_llama, 4, 1000)


def test_narrow_built_in_sliding_window_is_refused():
    model = make_tiny_model("llama", sliding_window=16)
    with pytest.raises(SinkConfigError, match="sliding-window"):
        make_llm(model, 4, 60)


def test_hybrid_local_window_wider_than_the_flags_window_is_refused():
    """Gemma 3 style: local layers keep their own window, which --window must cover
    (a stream's seams seed every layer from the global window's keys)."""
    model = make_tiny_model(
        "llama",
        sliding_window=512,
        max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention"],
    )
    with pytest.raises(SinkConfigError, match="own 512-token window.*--window 512"):
        make_llm(model, 4, 60)


def test_flags_reach_engine_and_worker_processes(tiny_llama, tmp_path):
    """Default multiprocess mode: the plugin loads in the engine-core process,
    whose worker prepares the model and serves sink attention there."""
    script = f"""
import json
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM({tiny_llama!r}, dtype="float32", enforce_eager=True, block_size=16,
              max_model_len=4096, max_num_batched_tokens=64,
              additional_config={{"attention_sink": {{"sink": 4, "window": 20}}}})
    out = llm.generate([{{"prompt_token_ids": list(range(3, 43))}}],
                       SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
    print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""
    trace = tmp_path / "trace"
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_SINK_TRACE_DIR": str(trace),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    markers = [p.read_text().split() for p in trace.iterdir()]
    pids = {int(m[0]) for m in markers}
    assert len(pids) >= 2, markers  # the client process and the engine core
    children = [m for m in markers if int(m[1]) in pids]
    assert children, f"no plugin load in a child process: {markers}"
    line = next(x for x in result.stdout.splitlines() if x.startswith("TOKENS"))
    tokens = json.loads(line.split(" ", 1)[1])
    from reference import Job, references

    (ref,) = references([Job(tiny_llama, 4, 20, tuple(range(3, 43)), 80)])
    assert tokens == ref.tokens


def test_without_flags_outputs_equal_vllm_without_the_plugin(tiny_llama):
    script = f"""
import json
from vllm import LLM, SamplingParams
llm = LLM({tiny_llama!r}, dtype="float32", enforce_eager=True, max_model_len=256)
out = llm.generate([{{"prompt_token_ids": list(range(3, 43))}}],
                   SamplingParams(max_tokens=60, temperature=0, ignore_eos=True,
                                  logprobs=3))
o = out[0].outputs[0]
print("OUT", json.dumps([list(o.token_ids),
      [{{str(k): v.logprob for k, v in d.items()}} for d in o.logprobs]]))
import vllm_sink
print("LOADED", vllm_sink._registered)
"""
    outputs = []
    for plugins in (None, "none"):
        env = {**ENV}
        if plugins is not None:
            env["VLLM_PLUGINS"] = plugins
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = dict(x.split(" ", 1) for x in result.stdout.splitlines() if " " in x)
        outputs.append((lines["OUT"], lines["LOADED"]))
    (with_plugin, loaded), (without_plugin, not_loaded) = outputs
    assert (loaded, not_loaded) == ("True", "False")
    assert with_plugin == without_plugin


def test_every_rotary_fusion_pass_is_switched_off_even_renamed():
    """Sink mode rotates keys at read: a pass fusing rotary into the KV write
    would rotate them twice. Found by name, so a renamed pass is caught too."""
    from types import SimpleNamespace

    from vllm.config import PassConfig

    from vllm_sink.engine_config import switch_off_rope_fusion

    passes = PassConfig()
    switched = switch_off_rope_fusion(passes)
    assert {"fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache"} <= set(switched)
    assert passes.fuse_rope_kvcache is False
    assert passes.rope_kvcache_fusion_max_token_num == 256  # a size, not a switch
    renamed = SimpleNamespace(fuse_rope_into_attention=True, fuse_act_quant=True)
    assert switch_off_rope_fusion(renamed) == ["fuse_rope_into_attention"]
    assert renamed.fuse_rope_into_attention is False and renamed.fuse_act_quant
    with pytest.raises(SinkConfigError, match="no rotary-fusion switch"):
        switch_off_rope_fusion(SimpleNamespace(fuse_act_quant=True))


def test_kv_pool_too_small_names_the_sink_mode_fix(tiny_llama):
    """vLLM's advice (decrease max_model_len) is wrong in sink mode, where the
    chunk size bounds a request: the error names --max-num-batched-tokens and a
    value that fits, and that value starts."""
    small = dict(max_model_len=8192, block_size=32, num_gpu_blocks_override=16)
    with pytest.raises(SinkConfigError) as error:
        make_llm(tiny_llama, 4, 64, max_num_batched_tokens=4096, **small)
    message = str(error.value)
    assert "max_model_len does not bound a sink-mode request" in message
    assert "estimated maximum model length" not in message
    fit = int(message.split("--max-num-batched-tokens ")[-1].split()[0])
    assert fit == (16 - 1 - 1 - 2) * 32 - 63  # pool - null - sink - 2, less W-1
    llm = make_llm(tiny_llama, 4, 64, max_num_batched_tokens=fit, **small)
    from conftest import shutdown

    shutdown(llm)
