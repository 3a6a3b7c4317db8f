"""Shared set-up: offline, in-process vLLM on CPU with the tiny models."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from vllm_sink.tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def tiny_models_built() -> None:
    """Build the shared tiny models before any engine runs (HF_IN_PROCESS_MODULES)."""
    make_tiny_model("llama")
    make_tiny_model("gpt_neox")


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_neox() -> str:
    return make_tiny_model("gpt_neox")


def make_llm(model: str, sink: int | None = None, window: int | None = None, **kw):
    """An offline vLLM engine on the tiny model, in sink mode when S/W given."""
    from vllm import LLM

    extra = {}
    if window is not None:
        extra = {"attention_sink": {"sink": sink, "window": window}}
    options = dict(
        dtype="float32",
        enforce_eager=True,
        block_size=16,
        max_model_len=4096,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        seed=0,
        additional_config=extra,
    )
    options.update(kw)
    return LLM(model, **options)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# Modules that build Hugging Face models in this process. vLLM's Transformers backend
# (which serves GPT-NeoX) decorates HF model classes in place the first time it loads
# one, after which those classes can only be built inside a vLLM config context. So
# these modules run before any module that starts an in-process engine.
HF_IN_PROCESS_MODULES = ("test_oracle.py",)


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: item.path.name not in HF_IN_PROCESS_MODULES)
