"""The upstream-ready diffs in ``patches/`` and the monkeypatches they replace.

(a) Every diff applies to the installed vLLM source (alone, and all of them in
    order), so a diff that no longer applies fails CI. The diff set follows the
    installed version: ``patches/vllm-X.Y/NAME`` where that exists (context
    refreshed for X.Y), else the top-level ``patches/NAME`` (against 0.32.0).
(b) Every monkeypatch the plugin installs at run time (as recorded by
    ``vllm_sink.patching``) names a diff that exists, whose header names it.
(c) Outside sink mode the monkeypatches change nothing: each is called next to
    the original it replaced (reached through ``__wrapped__``, which
    ``functools.wraps`` in ``wrap_method`` sets) and the results compared.
"""

from __future__ import annotations

import asyncio
import os
import py_compile
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import vllm
from torch import nn

import vllm_sink
from vllm_sink import cli
from vllm_sink.config import SinkModelLen
from vllm_sink.patching import Patch, installed_patches

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"
SITE = Path(vllm.__file__).resolve().parent.parent  # site-packages of vLLM
RELEASE = vllm_sink.vllm_release(vllm.__version__)
VERSION_DIR = PATCHES / ("vllm-{}.{}".format(*RELEASE) if RELEASE else "vllm-none")


def diff_set(version_dir: Path) -> list[Path]:
    """Top-level diffs, each replaced by its copy in version_dir if there is one."""
    return [
        version_dir / d.name if (version_dir / d.name).is_file() else d
        for d in sorted(PATCHES.glob("*.diff"))
    ]


DIFFS = diff_set(VERSION_DIR)
BY_NAME = {d.name: d for d in DIFFS}
SINK = {"attention_sink": {"sink": 4, "window": 28}}


@pytest.fixture(scope="module")
def patches() -> list[Patch]:
    vllm_sink.register()
    return installed_patches()


def original(owner, name: str):
    """The callable ``wrap_method`` replaced (unbound; classmethods take cls)."""
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if isinstance(raw, property):
        raw = raw.fget
    elif isinstance(raw, (classmethod, staticmethod)):
        raw = raw.__func__
    return raw.__wrapped__


# (a) the diffs apply ---------------------------------------------------------


def header(diff: Path) -> str:
    """The text before the first file of the diff."""
    text = diff.read_text()
    match = re.search(r"^(diff --git |--- )", text, re.MULTILINE)
    assert match, f"{diff.name} holds no diff"
    return text[: match.start()]


def touched(diff: Path) -> list[str]:
    """Files the diff changes, relative to site-packages (a/..., b/...)."""
    paths = []
    for line in diff.read_text().splitlines():
        if line.startswith(("--- a/", "+++ b/")):
            path = line[6:].split("\t")[0]
            if path not in paths:
                paths.append(path)
    assert paths, f"{diff.name} names no file under a/ or b/"
    return paths


def stage(diffs: list[Path], dest: Path) -> None:
    """Copy the vLLM files these diffs touch into dest, keeping their paths."""
    for diff in diffs:
        for rel in touched(diff):
            src = SITE / rel
            if src.is_file() and not (dest / rel).exists():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    # Its own repository root, so git apply never resolves paths elsewhere.
    subprocess.run(["git", "init", "-q", str(dest)], check=True)


def git_apply(dest: Path, diff: Path, *flags: str) -> None:
    result = subprocess.run(
        ["git", "apply", *flags, "-p1", str(diff)],
        cwd=dest,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, (
        f"{diff.name} does not apply to vLLM {vllm.__version__} "
        f"({SITE}):\n{result.stderr}"
    )


def test_per_version_diffs_refresh_a_top_level_one():
    """patches/vllm-X.Y/ holds only refreshed copies; new diffs start top-level."""
    versions = sorted(PATCHES.glob("vllm-*/"))
    assert [v.name for v in versions if v.is_dir()] == ["vllm-0.33"]
    for version_dir in versions:
        for diff in sorted(version_dir.glob("*.diff")):
            assert (PATCHES / diff.name).is_file(), f"{diff}: no top-level diff"
            assert (
                header(diff).split("\n")[0]
                == header(PATCHES / diff.name).split("\n")[0]
            ), f"{diff}: not the same change as patches/{diff.name}"
        assert version_dir.name in (PATCHES / "README.md").read_text()


def test_diffs_exist():
    assert [d.name for d in DIFFS] == [
        "0001-cli-attention-sink-flags.diff",
        "0002-engine-config-sink-mode.diff",
        "0003-attention-sink-kv-cache-spec.diff",
        "0004-rope-skip-in-sink-mode.diff",
        "0005-cpu-platform-custom-backend.diff",
        "0006-streams-past-max-model-len.diff",
        "0007-stream-seams.diff",
        "0008-plugin-held-blocks.diff",
        "0009-stop-strings-across-seams.diff",
        "0010-kv-memory-advice.diff",
    ]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("diff", DIFFS, ids=[d.stem[:4] for d in DIFFS])
def test_diff_applies_alone(diff: Path, tmp_path: Path):
    for rel in touched(diff):
        existing = (SITE / rel).is_file()
        new = f"--- /dev/null\n+++ b/{rel}" in diff.read_text()
        assert existing or new, f"{diff.name}: {rel} is not in vLLM {vllm.__version__}"
    stage([diff], tmp_path)
    git_apply(tmp_path, diff, "--check")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_diffs_apply_in_order_and_compile(tmp_path: Path):
    stage(DIFFS, tmp_path)
    for diff in DIFFS:
        git_apply(tmp_path, diff)
    for diff in DIFFS:
        for rel in touched(diff):
            if rel.endswith(".py"):
                py_compile.compile(str(tmp_path / rel), doraise=True)


def test_headers_say_what_why_and_which_plugin_code():
    for diff in DIFFS:
        text = header(diff)
        assert len(text.strip().splitlines()) >= 5, f"{diff.name}: header too short"
        assert "Why" in text, f"{diff.name}: header does not say why"
        against = "0.32.0" if diff.parent == PATCHES else diff.parent.name[5:]
        assert f"vLLM {against}" in text, f"{diff.name}: header names no {against}"
        mirrors = re.findall(r"vllm_sink/[\w/]+\.py", text)
        assert mirrors, f"{diff.name}: header names no plugin code"
        for path in mirrors:
            assert (ROOT / path).is_file(), f"{diff.name}: {path} does not exist"


# (b) every runtime monkeypatch has its diff ---------------------------------


def test_every_monkeypatch_names_an_existing_diff(patches):
    assert patches, "register() installed no monkeypatch"
    names = {d.name for d in DIFFS}
    for patch in patches:
        assert patch.diff in names, f"{patch.target}: no patches/{patch.diff}"
        head = header(BY_NAME[patch.diff])
        mentions = [patch.target]
        if isinstance(patch.owner, type):  # or Class.method, for a method
            mentions.append(f"{patch.owner.__name__}.{patch.name}")
        assert any(name in head for name in mentions), (
            f"the header of {patch.diff} does not mention {patch.target}"
        )
        if not patch.added:
            assert callable(original(patch.owner, patch.name)), patch.target


def test_every_diff_replaces_a_monkeypatch(patches):
    assert {d.name for d in DIFFS} == {p.diff for p in patches}


def test_readme_lists_every_diff_and_target(patches):
    readme = (PATCHES / "README.md").read_text()
    for diff in DIFFS:
        assert diff.name in readme, f"patches/README.md does not list {diff.name}"
    for patch in patches:
        assert patch.target in readme, f"patches/README.md lacks {patch.target}"


# (c) outside sink mode nothing changes ---------------------------------------


def options(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def test_cli_adds_flags_only_in_their_own_group():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    patched = EngineArgs.add_cli_args(FlexibleArgumentParser())
    plain = original(EngineArgs, "add_cli_args")(FlexibleArgumentParser())
    assert options(plain) <= options(patched)
    added = options(patched) - options(plain)
    assert {"--attention-sink", "--window"} <= added

    groups = {g.title: g for g in patched._action_groups}
    ours = groups.pop(cli.GROUP_TITLE)  # every added flag is in our group
    assert {o for a in ours._group_actions for o in a.option_strings} == added
    for group in plain._action_groups:  # every other group is as it was
        mine = groups.pop(group.title)
        assert [a.option_strings for a in mine._group_actions] == [
            a.option_strings for a in group._group_actions
        ], group.title
    assert not groups

    args = ["--model", "m", "--max-model-len", "128"]
    parsed = vars(patched.parse_args(args))
    for action in ours._group_actions:  # unset: the plugin stays out of the way
        assert parsed.pop(action.dest) is None, action.dest
    assert parsed == vars(plain.parse_args(args))


def test_from_cli_args_without_flags(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = ["--model", tiny_llama, "--additional-config", '{"other": 1}']
    patched = EngineArgs.from_cli_args(parser.parse_args(args))
    plain = original(EngineArgs, "from_cli_args")(EngineArgs, parser.parse_args(args))
    assert patched == plain
    assert patched.additional_config == {"other": 1}


def test_create_engine_config_without_sink(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    def engine_args():
        return EngineArgs(
            model=tiny_llama, dtype="float32", max_model_len=128, enforce_eager=True
        )

    env = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
    patched = engine_args().create_engine_config()
    plain = original(EngineArgs, "create_engine_config")(engine_args())
    assert os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == env
    assert type(patched.model_config.max_model_len) is int  # plain vLLM's checks
    assert patched.compute_hash() == plain.compute_hash()
    assert patched.attention_config.backend == plain.attention_config.backend
    assert patched.cache_config.enable_prefix_caching == (
        plain.cache_config.enable_prefix_caching
    )
    assert patched.model_config.max_model_len == plain.model_config.max_model_len
    assert patched.additional_config == plain.additional_config
    assert patched.compilation_config.pass_config == (
        plain.compilation_config.pass_config
    )


def fake_attention(sliding_window: int | None):
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return SimpleNamespace(
        attn_type=AttentionType.DECODER,
        kv_cache_dtype="auto",
        sliding_window=sliding_window,
        attn_backend=AttentionBackendEnum.CPU_ATTN.get_class(),
        num_kv_heads=2,
        head_size=16,
        head_size_v=16,
        kv_cache_torch_dtype=torch.float32,
    )


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_kv_cache_spec_without_sink(sliding_window):
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_sink.kv_cache import SinkWindowSpec

    layer = fake_attention(sliding_window)
    cache = SimpleNamespace(block_size=16, skip_page_size_padded=None)
    plain_config = SimpleNamespace(cache_config=cache, additional_config={})
    patched = Attention.get_kv_cache_spec(layer, plain_config)
    assert patched == original(Attention, "get_kv_cache_spec")(layer, plain_config)
    assert not isinstance(patched, SinkWindowSpec)
    # ... and in sink mode the same call does change the spec.
    sink_config_ = SimpleNamespace(cache_config=cache, additional_config=SINK)
    assert isinstance(Attention.get_kv_cache_spec(layer, sink_config_), SinkWindowSpec)


def test_load_model_without_sink(monkeypatch):
    from vllm.v1.worker import cpu_model_runner
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from vllm_sink import rope

    prepared = []
    monkeypatch.setattr(
        rope, "prepare_model", lambda m, cfg, name: prepared.append(cfg)
    )

    def run(load_model, extra: dict) -> nn.Module:
        model = nn.Sequential(nn.Linear(2, 2))
        model.rotary_emb = nn.Identity()
        monkeypatch.setattr(cpu_model_runner, "get_model", lambda vllm_config: model)
        runner = SimpleNamespace(
            vllm_config=SimpleNamespace(additional_config=extra),
            model_config=SimpleNamespace(model="m"),
            lora_config=None,
            _setup_eagle3_aux_hidden_state_outputs=lambda: None,
        )
        runner.get_model = lambda: runner.model
        assert load_model(runner) is None
        assert runner.model is model
        return model

    plain = run(original(CPUModelRunner, "load_model"), {})
    patched = run(CPUModelRunner.load_model, {})
    assert isinstance(patched.rotary_emb, nn.Identity)
    assert [n for n, _ in patched.named_modules()] == [
        n for n, _ in plain.named_modules()
    ]
    assert prepared == []
    run(CPUModelRunner.load_model, SINK)  # sink mode: the model is prepared
    assert prepared and prepared[0].window == 28


def test_cpu_backend_selection_without_custom():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    selector = AttentionSelectorConfig(
        head_size=64, dtype=torch.float32, kv_cache_dtype=None, block_size=16
    )
    plain = original(CpuPlatform, "get_attn_backend_cls")
    for backend in (
        None,
        AttentionBackendEnum.CPU_ATTN,
        AttentionBackendEnum.FLASH_ATTN,
        AttentionBackendEnum.TRITON_ATTN,
    ):
        assert CpuPlatform.get_attn_backend_cls(backend, selector) == plain(
            CpuPlatform, backend, selector
        )
    custom = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector)
    assert custom == AttentionBackendEnum.CUSTOM.get_path()


def test_tokenize_params_without_sink():
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.params import TokenizeParams

    getter = original(TokenizeParams, "max_input_tokens")
    post_init = original(TokenizeParams, "__post_init__")
    for total in (None, 1, 128, 4096):
        params = TokenizeParams(max_total_tokens=total)
        assert params.max_input_tokens == getter(params) == total
        assert post_init(params) is None

    params = TokenizeParams(max_total_tokens=128, max_output_tokens=100)
    before = {f.name: getattr(params, f.name) for f in fields(params)}
    post_init(params)
    assert {f.name: getattr(params, f.name) for f in fields(params)} == before

    object.__setattr__(params, "max_output_tokens", 500)
    with pytest.raises(VLLMValidationError) as plain:
        post_init(params)
    with pytest.raises(VLLMValidationError) as patched:
        TokenizeParams(max_total_tokens=128, max_output_tokens=500)
    assert str(patched.value) == str(plain.value)


def test_get_max_tokens_without_sink():
    from vllm.entrypoints.openai.chat_completion import serving as chat
    from vllm.entrypoints.openai.completion import serving as completion
    from vllm.entrypoints.serve.utils import api_utils

    cases = [
        (128, None, 10, {}, None, None),
        (128, 50, 10, {}, None, None),
        (128, 500, 10, {}, None, None),
        (128, None, 10, {"max_tokens": 7}, None, None),
        (128, 50, 10, {}, 20, None),
        (128, 50, 300, {}, None, 100),
        (128, 50, 300, {}, None, -1),
        (128, None, 128, {}, None, None),
        (128, 5, 300, {}, None, None),  # prompt too long: both raise
    ]

    def call(fn, case):
        try:
            return fn(*case)
        except ValueError as e:
            return f"ValueError: {e}"

    for module in (completion, chat):
        assert module.get_max_tokens.__wrapped__ is api_utils.get_max_tokens
        for case in cases:
            assert call(module.get_max_tokens, case) == call(
                api_utils.get_max_tokens, case
            ), (module.__name__, case)
    assert call(completion.get_max_tokens, cases[-1]).startswith("ValueError")


class FakeEngine:
    """The attributes LLMEngine/AsyncLLM methods touch, recording each call."""

    def __init__(self, outputs=()):
        calls = self.calls = []
        self.vllm_config = SimpleNamespace(
            additional_config={}, model_config=SimpleNamespace(max_model_len=128)
        )
        self.model_config = self.vllm_config.model_config
        self.should_execute_dummy_batch = False
        self.log_stats = False
        self.log_requests = False
        self.logger_manager = None
        self.renderer = SimpleNamespace(mm_processor_cache=None)

        def process_inputs(request_id, prompt, params, **kwargs):
            calls.append(("process_inputs", request_id, prompt, params, kwargs))
            return SimpleNamespace(request_id=request_id, params=params)

        def abort(ids, internal=False):
            calls.append(("output_processor.abort", list(ids), internal))
            return list(ids)

        async def abort_async(ids):
            calls.append(("engine_core.abort", list(ids)))

        self.input_processor = SimpleNamespace(
            process_inputs=process_inputs, assign_request_id=lambda request: None
        )
        self.output_processor = SimpleNamespace(
            add_request=lambda request, *a: calls.append(("add", request.request_id)),
            abort_requests=abort,
            process_outputs=lambda outs, **kw: SimpleNamespace(
                request_outputs=list(outputs), reqs_to_abort=[]
            ),
            update_scheduler_stats=lambda stats: None,
        )
        self.engine_core = SimpleNamespace(
            add_request=lambda request: calls.append(("core", request.request_id)),
            abort_requests=lambda ids: calls.append(("engine_core.abort", list(ids))),
            abort_requests_async=abort_async,
            get_output=lambda: SimpleNamespace(
                outputs=[], timestamp=0.0, weight_version=None, scheduler_stats=None
            ),
        )

    def get_supported_tasks(self):
        return ("generate",)

    def get_tokenizer(self):
        return None


def test_llm_engine_without_sink(patches, monkeypatch):
    from vllm import SamplingParams
    from vllm.v1.engine import llm_engine
    from vllm.v1.engine.llm_engine import LLMEngine

    monkeypatch.setattr(
        llm_engine, "extract_prompt_components", lambda *a: (None, None, None)
    )
    # Longer than max_model_len: outside sink mode it is not chained.
    prompt = {"prompt_token_ids": list(range(200))}
    params = SamplingParams(max_tokens=500)
    for name, call in [
        ("add_request", lambda f, e: f(e, "r1", prompt, params, priority=3)),
        ("abort_request", lambda f, e: f(e, ["r1", "r2"], True)),
        ("step", lambda f, e: f(e)),
    ]:
        outputs = [SimpleNamespace(request_id="r1"), SimpleNamespace(request_id="x")]
        patched_engine, plain_engine = FakeEngine(outputs), FakeEngine(outputs)
        patched = call(getattr(LLMEngine, name), patched_engine)
        plain = call(original(LLMEngine, name), plain_engine)
        assert patched == plain, name
        assert patched_engine.calls == plain_engine.calls, name
        assert "_sink_streams" not in vars(patched_engine) or not (
            patched_engine._sink_streams.by_user
        )


def test_async_llm_without_sink(patches):
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

    def engine():
        fake = FakeEngine()
        done = RequestOutput("r1", None, [1], None, [], True)

        async def add_request(request_id, prompt, params, **kwargs):
            fake.calls.append(("add_request", request_id, prompt, params))
            return SimpleNamespace(
                request_id=request_id, get_nowait=lambda: done, close=lambda: None
            )

        fake.add_request = add_request
        return fake

    async def generate(fn, fake):
        prompt = {"prompt_token_ids": list(range(200))}
        params = SamplingParams(max_tokens=500)
        return [out async for out in fn(fake, prompt, params, "r1", priority=2)]

    patched_engine, plain_engine = engine(), engine()
    patched = asyncio.run(generate(AsyncLLM.generate, patched_engine))
    plain = asyncio.run(generate(original(AsyncLLM, "generate"), plain_engine))
    assert [o.request_id for o in patched] == [o.request_id for o in plain] == ["r1"]
    assert patched_engine.calls == plain_engine.calls

    patched_engine, plain_engine = engine(), engine()
    asyncio.run(AsyncLLM.abort(patched_engine, ["r1", "r2"], internal=True))
    asyncio.run(original(AsyncLLM, "abort")(plain_engine, ["r1", "r2"], True))
    assert patched_engine.calls == plain_engine.calls != []


def test_async_stream_left_between_segments_releases_its_hold(patches):
    """A client that leaves when a segment ends (the next not yet added) must
    not leave the engine core holding that segment's blocks."""
    from vllm import SamplingParams
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

    fake = FakeEngine()
    fake.vllm_config.additional_config = {"attention_sink": {"sink": 4, "window": 20}}
    fake.vllm_config.model_config.skip_tokenizer_init = True
    fake.vllm_config.cache_config = SimpleNamespace(
        block_size=16, enable_prefix_caching=True
    )
    prompt = list(range(3, 43))
    capped = CompletionOutput(0, "", list(range(128 - len(prompt))), None, None)
    capped.finish_reason = "length"
    segment_end = RequestOutput("r1", None, prompt, None, [capped], True)

    async def add_request(request_id, prompt, params, **kwargs):
        fake.calls.append(("add_request", request_id))
        return SimpleNamespace(
            request_id=request_id, get_nowait=lambda: segment_end, close=lambda: None
        )

    async def call_utility_async(name, *args):
        fake.calls.append(("utility", name, *args))

    async def abort(request_id, internal=False):
        fake.calls.append(("abort", request_id))

    fake.add_request = add_request
    fake.abort = abort
    fake.engine_core.call_utility_async = call_utility_async

    async def leave_after_first_output():
        params = SamplingParams(max_tokens=500, ignore_eos=True)
        outputs = AsyncLLM.generate(fake, {"prompt_token_ids": prompt}, params, "r1")
        first = await anext(outputs)
        await outputs.aclose()  # the client disconnects here
        return first

    first = asyncio.run(leave_after_first_output())
    assert not first.finished and len(first.outputs[0].token_ids) == 88
    assert fake.calls[-1] == ("utility", "sink_release", "r1")
    assert [c for c in fake.calls if c[0] == "add_request"] == [("add_request", "r1")]
    # what may still run is aborted before the release, never after it
    assert fake.calls[-2][0] == "abort"


# the version guard -----------------------------------------------------------


def test_other_vllm_version_fails_start_up(monkeypatch):
    monkeypatch.delenv(vllm_sink.ALLOW_ENV, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    monkeypatch.setattr(vllm_sink, "_registered", False)
    before = installed_patches()
    with pytest.raises(RuntimeError) as error:
        vllm_sink.register()  # what vLLM's plugin loader calls at start-up
    message = str(error.value)
    assert vllm_sink.SUPPORTED_VLLM in message and "0.34.0" in message
    assert vllm_sink.ALLOW_ENV in message
    assert installed_patches() == before  # refused before patching anything
    readme = (ROOT / "README.md").read_text()
    assert f"{vllm_sink.ALLOW_ENV}=1" in readme


def test_front_end_limits_follow_each_engines_max_model_len(patches):
    """A sink engine's max_model_len lifts the front-end limits; a plain one's not."""
    from vllm.entrypoints.openai.completion import serving as completion
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.params import TokenizeParams

    sink_len = SinkModelLen(128)
    assert sink_len == 128 and repr(sink_len) == "128"
    assert TokenizeParams(max_total_tokens=sink_len).max_input_tokens is None
    TokenizeParams(max_total_tokens=sink_len, max_output_tokens=500)
    assert completion.get_max_tokens(sink_len, 500, 300, {}) == 500
    with pytest.raises(VLLMValidationError):
        TokenizeParams(max_total_tokens=128, max_output_tokens=500)
    with pytest.raises(ValueError):
        completion.get_max_tokens(128, 5, 300, {})


def test_sink_model_len_reaches_other_processes_as_an_int():
    import pickle

    import msgspec

    value = pickle.loads(pickle.dumps(SinkModelLen(4096)))
    assert type(value) is int and value == 4096
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(value)) == 4096
