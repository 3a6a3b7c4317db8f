"""Sink attention over a paged pre-RoPE KV cache, as Triton kernels.

Same arguments and semantics as ``torch_path.sink_attention`` (DESIGN.md §1):
the query at absolute index ``t`` attends to sink keys ``0 .. min(S, t+1)-1``
and window keys ``max(S, t-W+1) .. t``; keys are rotated at read from the
model's cos/sin table. No vLLM import: this module runs where only torch and
Triton are installed (and on CPU tensors under ``TRITON_INTERPRET=1``).

Kernel layout (one kernel, two launch shapes, then an optional reduce):

- A *query tile* is up to ``BLOCK_Q`` consecutive queries of one request times
  the ``GROUP`` query heads sharing one KV head (GQA), flattened to ``ROWS``
  rows (row ``r`` = query ``r // G_PAD``, head ``r % G_PAD``; padding rows are
  masked). Each program owns one (query tile, KV head[, KV split]).
- The program visits the tile's *sink tiles* (keys ``0 .. min(S, t_last+1)-1``
  in ``BLOCK_N`` chunks) then its *window tiles* (``BLOCK_N`` chunks from
  ``max(S, t_first-W+1)`` to ``t_last``), never anything in between, so a query
  costs O(S+W) whatever ``t``. Per-key masks (sink: ``j <= t``; window:
  ``max(S, t-W+1) <= j <= t``) give the exact set; keys outside the visited
  ranges are never loaded (they may sit in freed blocks).
- Rotary positions: window keys and queries share the tile base
  ``b = max(0, t_last - (S+W-1))`` (key at ``j-b``, query at ``t-b``); sink key
  ``i`` is at ``i`` against the query at ``min(t, S+W-1)``. ``BLOCK_Q <= S+W``
  keeps every position in ``(-(S+W), S+W)``, so the table is never read past
  row ``S+W-1``; negative positions use cos(-p) = cos(p), sin(-p) = -sin(p).
- Prefill launch, grid ``(T // BLOCK_Q + R, Hkv)``: program ``p`` finds its
  request by binary search over ``query_start_loc`` (request ``r`` owns tile
  ids ``qsl[r] // BLOCK_Q + r ..``), so the grid needs no host sync. Requests
  with one query are left to the decode launch.
- Decode launch, grid ``(R, Hkv, splits)``, ``BLOCK_Q = 1``: a request with one
  query splits its tile list (sink tiles then window tiles) into ``splits``
  contiguous parts (flash-decoding). With ``splits > 1`` each part writes its
  running max / sum / accumulator to a float32 workspace and ``_reduce_kernel``
  (grid ``(R, Hq)``) merges them into ``out``.

Scores are computed as ``exp2`` with ``scale * log2(e)`` folded into the
rotated query; softmax state is float32. fp32 inputs use IEEE dots (no TF32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Flash-decoding: aim for this many programs per SM, and give each split at
# least this many KV tiles so partial results are worth their merge.
PROGRAMS_PER_SM = 2
MIN_TILES_PER_SPLIT = 2
MAX_KV_SPLITS = 64


@dataclass(frozen=True)
class TritonTiles:
    """Launch-shape overrides (tests, benchmarks); ``None`` picks the default.

    ``block_q``: queries per prefill tile (power of 2; capped to <= S+W).
    ``block_n``: keys per KV tile (power of 2, >= 16).
    ``num_kv_splits``: parts per decode request (1 = no split, no reduce).
    """

    block_q: int | None = None
    block_n: int | None = None
    num_kv_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


@triton.jit
def _partner_dim(offs_d, ROT_DIM: tl.constexpr, IS_NEOX: tl.constexpr):
    """The lane each rotated lane pairs with (itself past ROT_DIM)."""
    HALF: tl.constexpr = ROT_DIM // 2
    if IS_NEOX:
        partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    else:
        partner = offs_d ^ 1
    return tl.where(offs_d < ROT_DIM, partner, offs_d)


@triton.jit
def _rotate(
    x,
    partner,
    pos,
    cs_ptr,
    cs_stride,
    offs_d,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """RoPE of rows ``x`` [M, D_PAD] (float32) at ``pos`` [M] (may be < 0).

    ``partner`` holds each lane's pair lane (``_partner_dim``). Lanes past
    ROT_DIM pass through (cos 1, sin 0). ``|pos|`` must be a table row.
    """
    HALF: tl.constexpr = ROT_DIM // 2
    if IS_NEOX:
        freq = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
        first = offs_d < HALF
    else:
        freq = offs_d // 2
        first = (offs_d % 2) == 0
    in_rot = (offs_d < ROT_DIM)[None, :]
    row = tl.abs(pos).to(tl.int64) * cs_stride
    ptr = cs_ptr + row[:, None] + freq[None, :]
    cos = tl.load(ptr, mask=in_rot, other=1.0).to(tl.float32)
    sin = tl.load(ptr + HALF, mask=in_rot, other=0.0).to(tl.float32)
    flip = (pos[:, None] < 0) != first[None, :]
    sin = tl.where(flip, -sin, sin)
    return x * cos + partner * sin


@triton.jit
def _find_request(qsl_ptr, num_reqs, tile_id, BLOCK_Q: tl.constexpr):
    """Largest r with ``qsl[r] // BLOCK_Q + r <= tile_id`` (binary search)."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _kv_tile(
    acc,
    m_i,
    l_i,
    q,
    j,
    key_ok,
    key_pos,
    visible,
    kv_ptr,
    bt_row,
    stride_bt_b,
    kv_head_off,
    stride_kv_b,
    stride_kv_s,
    stride_kv_d,
    cs_ptr,
    cs_stride,
    offs_d,
    HEAD: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax step over keys ``j`` [BLOCK_N] for rows ``q`` [ROWS, D_PAD].

    Only keys with ``key_ok`` are loaded; ``visible`` [ROWS, BLOCK_N] is the
    per-row mask. Returns the updated (acc, m_i, l_i); a row with no visible
    key so far keeps m = -inf, l = 0, acc = 0.
    """
    blk = tl.load(bt_row + (j // KV_BLOCK) * stride_bt_b, mask=key_ok, other=0)
    slot = blk.to(tl.int64) * stride_kv_b + (j % KV_BLOCK).to(tl.int64) * stride_kv_s
    base = kv_ptr + kv_head_off + slot
    mask = key_ok[:, None] & (offs_d < HEAD)[None, :]
    k = tl.load(base[:, None] + offs_d[None, :] * stride_kv_d, mask=mask, other=0.0)
    if ROT_DIM > 0:
        partner_d = _partner_dim(offs_d, ROT_DIM, IS_NEOX)
        k_partner = tl.load(
            base[:, None] + partner_d[None, :] * stride_kv_d, mask=mask, other=0.0
        )
        k = _rotate(
            k.to(tl.float32),
            k_partner.to(tl.float32),
            key_pos,
            cs_ptr,
            cs_stride,
            offs_d,
            ROT_DIM,
            IS_NEOX,
        )
    qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        base[:, None] + (HEAD + offs_d)[None, :] * stride_kv_d, mask=mask, other=0.0
    )
    pv = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _sink_attn_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    bt_ptr,
    qsl_ptr,
    seq_lens_ptr,
    cs_ptr,
    part_acc_ptr,
    part_ml_ptr,
    stride_q_t,
    stride_q_h,
    stride_q_d,
    stride_kv_b,
    stride_kv_h,
    stride_kv_s,
    stride_kv_d,
    stride_o_t,
    stride_o_h,
    stride_o_d,
    stride_bt_r,
    stride_bt_b,
    cs_stride,
    num_reqs,
    num_heads,
    sink,
    window,
    qk_scale,
    num_splits,
    HEAD: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    DECODE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (query tile, KV head[, split]) program; see the module docstring.

    DECODE: axis 0 is the request, which must have exactly one query; axis 2
    the split. Otherwise axis 0 is a tile id and requests with <= 1 query
    are skipped. SPLIT writes partials [R, Hq, splits, D_PAD] and [.., 2].
    """
    kv_head = tl.program_id(1)
    if DECODE:
        req = tl.program_id(0)
        tile_start = 0
    else:
        tile_id = tl.program_id(0)
        req = _find_request(qsl_ptr, num_reqs, tile_id, BLOCK_Q)
        tile_start = (tile_id - (tl.load(qsl_ptr + req) // BLOCK_Q + req)) * BLOCK_Q
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    if DECODE:
        if q_len != 1:
            return
    else:
        if (q_len <= 1) | (tile_start >= q_len):
            return

    span = sink + window
    seq_len = tl.load(seq_lens_ptr + req)
    first_pos = seq_len - q_len  # absolute index of the request's first query
    t_first = first_pos + tile_start
    t_last = first_pos + tl.minimum(tile_start + BLOCK_Q, q_len) - 1
    pos_base = tl.maximum(t_last - (span - 1), 0)

    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D_PAD)
    q_local = tile_start + offs_r // G_PAD
    g = offs_r % G_PAD
    row_ok = (offs_r // G_PAD < BLOCK_Q) & (q_local < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    t = first_pos + q_local  # absolute index of each row's query

    q_rows = q_ptr + (q_start + q_local).to(tl.int64) * stride_q_t + head * stride_q_h
    q_mask = row_ok[:, None] & (offs_d < HEAD)[None, :]
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_q_d, mask=q_mask, other=0.0)
    q = q.to(tl.float32)
    if ROT_DIM > 0:
        partner_d = _partner_dim(offs_d, ROT_DIM, IS_NEOX)
        q_partner = tl.load(
            q_rows[:, None] + partner_d[None, :] * stride_q_d, mask=q_mask, other=0.0
        ).to(tl.float32)
        win_pos = tl.where(row_ok, t - pos_base, 0)
        sink_pos = tl.where(row_ok, tl.minimum(t, span - 1), 0)
        q_win = _rotate(q, q_partner, win_pos, cs_ptr, cs_stride, offs_d, ROT_DIM, IS_NEOX)
        if DECODE:  # one query: its window and sink positions coincide
            q_sink = q_win
        else:
            q_sink = _rotate(
                q, q_partner, sink_pos, cs_ptr, cs_stride, offs_d, ROT_DIM, IS_NEOX
            )
    else:
        q_win = q
        q_sink = q
    q_win = (q_win * qk_scale).to(DOT_DTYPE)
    q_sink = (q_sink * qk_scale).to(DOT_DTYPE)

    # Tile list: sink tiles [0, n_sink_tiles), then window tiles.
    num_sink = tl.minimum(sink, t_last + 1)
    n_sink_tiles = tl.cdiv(num_sink, BLOCK_N)
    win_lo = tl.maximum(sink, t_first - window + 1)
    n_win_tiles = tl.cdiv(tl.maximum(t_last - win_lo + 1, 0), BLOCK_N)
    n_tiles = n_sink_tiles + n_win_tiles
    if DECODE:
        split = tl.program_id(2)
        per_split = tl.cdiv(n_tiles, num_splits)
        tile_lo = tl.minimum(split * per_split, n_tiles)
        tile_hi = tl.minimum(tile_lo + per_split, n_tiles)
    else:
        split = 0
        tile_lo = 0
        tile_hi = n_tiles

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt_r
    kv_head_off = kv_head.to(tl.int64) * stride_kv_h
    offs_n = tl.arange(0, BLOCK_N)
    row_win_lo = tl.maximum(sink, t - window + 1)

    for i in range(tile_lo, tl.minimum(tile_hi, n_sink_tiles)):
        j = i * BLOCK_N + offs_n
        key_ok = j < num_sink
        visible = key_ok[None, :] & (j[None, :] <= t[:, None])
        acc, m_i, l_i = _kv_tile(
            acc, m_i, l_i, q_sink, j, key_ok, tl.where(key_ok, j, 0), visible,
            kv_ptr, bt_row, stride_bt_b, kv_head_off, stride_kv_b, stride_kv_s,
            stride_kv_d, cs_ptr, cs_stride, offs_d,
            HEAD, KV_BLOCK, ROT_DIM, IS_NEOX, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    for i in range(tl.maximum(tile_lo, n_sink_tiles), tile_hi):
        j = win_lo + (i - n_sink_tiles) * BLOCK_N + offs_n
        key_ok = j <= t_last
        visible = (j[None, :] >= row_win_lo[:, None]) & (j[None, :] <= t[:, None])
        acc, m_i, l_i = _kv_tile(
            acc, m_i, l_i, q_win, j, key_ok, tl.where(key_ok, j - pos_base, 0),
            visible, kv_ptr, bt_row, stride_bt_b, kv_head_off, stride_kv_b,
            stride_kv_s, stride_kv_d, cs_ptr, cs_stride, offs_d,
            HEAD, KV_BLOCK, ROT_DIM, IS_NEOX, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip

    if SPLIT:
        # Partials of (request, head, split); only decode requests get here.
        part = (req.to(tl.int64) * num_heads + head) * num_splits + split
        acc_ptrs = part_acc_ptr + part[:, None] * D_PAD + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        result = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_rows = (q_start + q_local).to(tl.int64) * stride_o_t + head * stride_o_h
        o_ptrs = out_ptr + o_rows[:, None] + offs_d[None, :] * stride_o_d
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _reduce_kernel(
    out_ptr,
    qsl_ptr,
    part_acc_ptr,
    part_ml_ptr,
    stride_o_t,
    stride_o_h,
    stride_o_d,
    num_heads,
    num_splits,
    HEAD: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge the split partials of one (decode request, query head).

    Grid (R, Hq). Requests with other than one query are skipped.
    """
    req = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + req)
    if tl.load(qsl_ptr + req + 1) - q_start != 1:
        return
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < num_splits
    part = (req.to(tl.int64) * num_heads + head) * num_splits + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * D_PAD + offs_d[None, :],
        mask=s_ok[:, None],
        other=0.0,
    )
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l_s, 0)
    result = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    o_ptrs = out_ptr + q_start.to(tl.int64) * stride_o_t + head * stride_o_h
    tl.store(
        o_ptrs + offs_d * stride_o_d,
        result.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD,
    )


# bf16 tl.dot is wrong under the Triton 3.9 interpreter (it multiplies the
# raw uint16 bits); float32 dots of bf16 values are exact there, so upcast.
_INTERPRETED = type(_sink_attn_kernel).__name__ == "InterpretedFunction"

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _default_block_n(device: torch.device, d_pad: int) -> int:
    if device.type != "cuda":
        return 32
    return 32 if d_pad > 128 else 64


def _prefill_block_q(tiles: TritonTiles, group_pad: int, span: int, max_q: int) -> int:
    """Queries per prefill tile: ~64 rows, at most S+W and the longest chunk."""
    block_q = tiles.block_q or max(1, 64 // group_pad)
    return max(1, min(_prev_pow2(block_q), _prev_pow2(span), triton.next_power_of_2(max_q)))


def _num_kv_splits(
    tiles: TritonTiles,
    device: torch.device,
    num_reqs: int,
    num_kv_heads: int,
    max_kv_tiles: int,
) -> int:
    """Decode splits: enough programs for ~PROGRAMS_PER_SM waves on the GPU.

    A power of two, at most ``max_kv_tiles / MIN_TILES_PER_SPLIT``. Uses only
    host-known sizes (no sync). Off CUDA the default is 1.
    """
    if tiles.num_kv_splits is not None:
        return max(1, tiles.num_kv_splits)
    if device.type != "cuda":
        return 1
    target = PROGRAMS_PER_SM * _sm_count(device.index or 0)
    programs = num_reqs * num_kv_heads
    if programs >= target:
        return 1
    want = triton.next_power_of_2(triton.cdiv(target, programs))
    cap = _prev_pow2(max(1, max_kv_tiles // MIN_TILES_PER_SPLIT))
    return max(1, min(want, cap, MAX_KV_SPLITS))


def _check_args(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
) -> None:
    _, num_heads, head_size = query.shape
    _, num_kv_heads, _, kv_width = kv_cache.shape
    if kv_width != 2 * head_size:
        raise ValueError(f"kv_cache last dim {kv_width} != 2 * head_size {head_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not a multiple of {num_kv_heads}")
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_size:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= {head_size}")
    if rotary_dim and cos_sin_cache.shape[-1] != rotary_dim:
        raise ValueError(f"cos_sin_cache width {cos_sin_cache.shape[-1]} != {rotary_dim}")
    if kv_cache.dtype not in _TL_DTYPES or out.shape != query.shape:
        raise ValueError(f"unsupported kv dtype {kv_cache.dtype} or out shape")


def sink_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    sink: int,
    window: int,
    scale: float,
    out: torch.Tensor,
    *,
    max_query_len: int | None = None,
    tiles: TritonTiles | None = None,
) -> torch.Tensor:
    """Attention of every query token of the batch; writes and returns ``out``.

    Same contract as ``torch_path.sink_attention``. ``max_query_len`` sizes the
    prefill tiles and decides whether the prefill launch runs; with it given
    the call does no host sync (``None`` reads it from ``query_start_loc``).
    ``cos_sin_cache`` needs at least S+W rows; ``rotary_dim = 0`` skips rotary.
    """
    _check_args(query, kv_cache, out, cos_sin_cache, rotary_dim)
    tiles = tiles or TritonTiles()
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, kv_block = kv_cache.shape[1], kv_cache.shape[2]
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    span = sink + window
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(head_size))
    block_n = tiles.block_n or _default_block_n(query.device, d_pad)
    dot_dtype = _TL_DTYPES[kv_cache.dtype]
    if _INTERPRETED and dot_dtype == tl.bfloat16:
        dot_dtype = tl.float32
    cs = cos_sin_cache.contiguous() if rotary_dim else cos_sin_cache
    qsl = query_start_loc.contiguous()
    lens = seq_lens.contiguous()
    common = dict(
        HEAD=head_size,
        D_PAD=d_pad,
        GROUP=group,
        G_PAD=group_pad,
        BLOCK_N=block_n,
        KV_BLOCK=kv_block,
        ROT_DIM=rotary_dim,
        IS_NEOX=bool(is_neox_style),
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps or (8 if d_pad > 128 else 4),
        num_stages=tiles.num_stages or 2,
    )
    tensors = (query, kv_cache, out, block_table, qsl, lens, cs)

    def strides(part_acc: torch.Tensor, part_ml: torch.Tensor) -> tuple:
        return (
            *tensors,
            part_acc,
            part_ml,
            *query.stride(),
            *kv_cache.stride(),
            *out.stride(),
            *block_table.stride(),
            cs.stride(0) if rotary_dim else 0,
            num_reqs,
            num_heads,
            sink,
            window,
            float(scale) * LOG2E,
        )

    if max_query_len > 1:
        block_q = _prefill_block_q(tiles, group_pad, span, max_query_len)
        grid = (num_tokens // block_q + num_reqs, num_kv_heads)
        _sink_attn_kernel[grid](
            *strides(out, out),
            1,
            BLOCK_Q=block_q,
            ROWS=max(16, block_q * group_pad),
            DECODE=False,
            SPLIT=False,
            **common,
        )

    max_kv_tiles = triton.cdiv(sink, block_n) + triton.cdiv(window, block_n) + 1
    splits = _num_kv_splits(tiles, query.device, num_reqs, num_kv_heads, max_kv_tiles)
    if splits > 1:
        part_acc = torch.empty(
            (num_reqs, num_heads, splits, d_pad), dtype=torch.float32, device=query.device
        )
        part_ml = torch.empty(
            (num_reqs, num_heads, splits, 2), dtype=torch.float32, device=query.device
        )
    else:
        part_acc = part_ml = out
    _sink_attn_kernel[(num_reqs, num_kv_heads, splits)](
        *strides(part_acc, part_ml),
        splits,
        BLOCK_Q=1,
        ROWS=max(16, group_pad),
        DECODE=True,
        SPLIT=splits > 1,
        **common,
    )
    if splits > 1:
        _reduce_kernel[(num_reqs, num_heads)](
            out,
            qsl,
            part_acc,
            part_ml,
            *out.stride(),
            num_heads,
            splits,
            HEAD=head_size,
            D_PAD=d_pad,
            SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
            num_warps=4,
        )
    return out
