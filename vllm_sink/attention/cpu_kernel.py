"""Compiled CPU decode attention and KV write (cpu_decode.c), built once per machine.

The torch path runs a score, softmax and value pass as ~20 separate torch ops
per layer, each a full sweep over the gathered keys; on CPU that is most of a
decode step. ``cpu_decode.c`` does the same work in one sweep per (request,
KV head), rotating each key while it is read, and writes new K/V rows with
plain copies instead of two indexed assignments. It is built with the system C
compiler (``$CC``, else ``cc``/``gcc``) into the vllm-sink cache, keyed by the
source, the flags and the CPU, and called through ctypes: no torch headers, no
build step at install time. Its scratch is a float32 tensor from the caller
(``scratch_floats``; the metadata builder preallocates it). Without a
compiler, the torch path is used and a warning says why. ``torch_path.py``
stays the reference the tests compare with.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from vllm_sink import default_cache_dir
from vllm_sink.attention.inputs import SinkAttentionInputs, TableCache

logger = logging.getLogger("vllm_sink")

SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class DecodeShape(ctypes.Structure):
    """Mirror of the C ``DecodeShape``: the scalars of one decode call."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "batch",
            "num_heads",
            "num_kv_heads",
            "head_size",
            "block_size",
            "row_stride",
            "block_stride",
            "head_stride",
            "slot_stride",
            "query_stride",
            "out_stride",
            "rotary_dim",
            "neox",
            "sink",
            "window",
            "zero_sink",
            "num_threads",
            "dtype",
            "query_dtype",
            "out_dtype",
        )
    ] + [("scale", ctypes.c_float)]


class WriteShape(ctypes.Structure):
    """Mirror of the C ``WriteShape``: the scalars of one KV write."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "num_tokens",
            "num_kv_heads",
            "head_size",
            "block_size",
            "block_stride",
            "head_stride",
            "slot_stride",
            "key_stride",
            "value_stride",
            "elem",
        )
    ]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(compiler: str) -> Path:
    """Compile the kernel into the cache (atomically) and return its path."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join((compiler, *FLAGS)).encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"sink_decode_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("vllm-sink: compiling the CPU decode kernel into %s", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "vllm-sink: no C compiler (set CC, or install gcc); CPU decode "
            "attention uses the slower torch path."
        )
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as err:
        logger.warning(
            "vllm-sink: could not build the CPU decode kernel; using the "
            "slower torch path. %s",
            err,
        )
        return None
    lib.sink_decode.restype = None
    lib.sink_decode.argtypes = [ctypes.c_void_p] * 5 + [
        ctypes.POINTER(DecodeShape),
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.sink_scratch_floats.restype = ctypes.c_int64
    lib.sink_scratch_floats.argtypes = [ctypes.POINTER(DecodeShape)]
    lib.sink_has_float16.restype = ctypes.c_int
    lib.sink_write_kv.restype = None
    lib.sink_write_kv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.POINTER(WriteShape)]
    return lib


def _rows_of_heads(x: torch.Tensor) -> bool:
    """[N, H, D] with heads and dims contiguous (any row stride)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def supports(
    query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None
) -> bool:
    """Whether the compiled kernel can run this call: CPU, float32/bfloat16/
    float16, head size a multiple of 8, rows of contiguous heads."""
    tensors = (query, kv_cache) if out is None else (query, kv_cache, out)
    lib = library()
    return (
        lib is not None
        and all(x.device.type == "cpu" and x.dtype in DTYPE_CODES for x in tensors)
        and (all(x.dtype != torch.float16 for x in tensors) or lib.sink_has_float16())
        and query.shape[-1] % 8 == 0
        and kv_cache.stride(-1) == 1
        and _rows_of_heads(query)
        and (out is None or (_rows_of_heads(out) and out.shape == query.shape))
    )


# The first ``rows`` rows of a rotary table as contiguous float32.
_float_table = TableCache(lambda cos_sin, rows: cos_sin[:rows].float().contiguous())


def scratch_floats(
    num_heads: int, num_kv_heads: int, head_size: int, num_threads: int
) -> int:
    """Float32 elements of the scratch :func:`sink_decode` needs: one task's
    worth per thread (cpu_decode.c, ``sink_scratch_floats``)."""
    lib = library()
    assert lib is not None, "see supports()"
    shape = DecodeShape(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        num_threads=num_threads,
    )
    return int(lib.sink_scratch_floats(ctypes.byref(shape)))


def sink_decode(
    inputs: SinkAttentionInputs,
    out: torch.Tensor | None = None,
    *,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention, one query per request (``query[r]`` is request
    ``r``'s last token); fills and returns ``out``.

    ``out`` [B, Hq, D] defaults to a new tensor in the query's dtype; dtypes
    convert inside the kernel. ``workspace`` is float32 scratch of at least
    :func:`scratch_floats` elements (the metadata builder allocates it once);
    without it, or when it is too small, one buffer is allocated for this call.
    """
    lib = library()
    assert lib is not None, "see supports()"
    inputs = inputs.with_unit_rotary()
    query, kv_cache, layout, rope = (
        inputs.query, inputs.kv_cache, inputs.layout, inputs.rope,
    )  # fmt: skip
    sink, window = inputs.variant.sink, inputs.variant.window
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    assert rope.cos_sin_cache.shape[0] >= sink + window, "rope table shorter than S+W"
    batch, num_heads, head_size = query.shape
    block_table, seq_lens = layout.block_table, layout.seq_lens
    if block_table.dtype != torch.int32 or block_table.stride(1) != 1:
        block_table = block_table.to(torch.int32).contiguous()
    if seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int32).contiguous()
    table = _float_table(rope.cos_sin_cache, sink + window)
    shape = DecodeShape(
        batch, num_heads, kv_cache.shape[1], head_size, kv_cache.shape[2],
        block_table.stride(0), *kv_cache.stride()[:3], query.stride(0),
        out.stride(0), rope.rotary_dim, rope.is_neox_style, sink, window,
        inputs.variant.zero_sink, torch.get_num_threads(),
        DTYPE_CODES[kv_cache.dtype], DTYPE_CODES[query.dtype],
        DTYPE_CODES[out.dtype], inputs.scale,
    )  # fmt: skip
    needed = lib.sink_scratch_floats(ctypes.byref(shape))
    if workspace is None or workspace.numel() < needed:
        workspace = torch.empty(needed, dtype=torch.float32)
    assert workspace.dtype == torch.float32 and workspace.is_contiguous()
    lib.sink_decode(
        query.data_ptr(),
        kv_cache.data_ptr(),
        block_table.data_ptr(),
        seq_lens.data_ptr(),
        table.data_ptr(),
        ctypes.byref(shape),
        out.data_ptr(),
        workspace.data_ptr(),
    )
    return out


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> bool:
    """Store pre-RoPE ``key``/``value`` [tokens, Hkv, D] at ``slot_mapping``
    (< 0: padding, skipped), as ``torch_path.write_kv``. Returns False, having
    written nothing, when the compiled kernel cannot take these tensors."""
    lib = library()
    if (
        lib is None
        or key.device.type != "cpu"
        or not key.dtype == value.dtype == kv_cache.dtype
        or slot_mapping.dtype != torch.int64
        or not slot_mapping.is_contiguous()
        or kv_cache.stride(-1) != 1
        or not (_rows_of_heads(key) and _rows_of_heads(value))
    ):
        return False
    num_tokens = min(slot_mapping.shape[0], key.shape[0])
    shape = WriteShape(
        num_tokens, key.shape[1], key.shape[2], kv_cache.shape[2],
        *kv_cache.stride()[:3], key.stride(0), value.stride(0),
        key.element_size(),
    )  # fmt: skip
    lib.sink_write_kv(
        key.data_ptr(),
        value.data_ptr(),
        kv_cache.data_ptr(),
        slot_mapping.data_ptr(),
        ctypes.byref(shape),
    )
    return True
