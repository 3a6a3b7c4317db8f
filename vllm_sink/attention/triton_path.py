"""Sink attention over a paged pre-RoPE KV cache, as Triton kernels.

Takes the typed inputs of ``inputs.py``, as ``torch_path.sink_attention``
(semantics: docs/architecture.md §1): the query at absolute index ``t`` attends to sink
keys ``0 .. min(S, t+1)-1`` and window keys ``max(S, t-W+1) .. t``; keys are
rotated at read from the model's cos/sin table. No vLLM import: this module
runs where only torch and Triton are installed (and on CPU tensors under
``TRITON_INTERPRET=1``).

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
- Keys are rotated in registers right after loading: a K tile is loaded as
  its two pair halves (neox: lanes ``h`` and ``h + rd/2``; gptj: even and odd
  lanes) plus the pass-through lanes ``>= rd``; the halves are rotated with
  the tile's [BLOCK_N, rd/2] cos/sin rows, and scores are
  ``q1.k1 + q2.k2 + q_rest.k_rest`` (three dots, the MMA work of one).
- Prefill launch, grid ``(T // BLOCK_Q + R, Hkv)``: program ``p`` finds its
  request by binary search over ``query_start_loc`` (request ``r`` owns tile
  ids ``qsl[r] // BLOCK_Q + r ..``), so the grid needs no host sync. Requests
  with one query are left to the decode launch.
- Decode launch, grid ``(R, Hkv, splits)``, ``BLOCK_Q = 1``: a request with one
  query splits its tile list (sink tiles then window tiles) into ``splits``
  contiguous parts (flash-decoding). With ``splits > 1`` each part writes its
  running max / sum / accumulator to a float32 workspace and ``_reduce_kernel``
  (grid ``(R, Hq)``) merges them into ``out``. Split rule (host sizes only):
  if ``R * Hkv`` programs are fewer than PROGRAMS_PER_SM waves, ``splits`` is
  the power of two that fills them, capped by (KV tiles per query) /
  MIN_TILES_PER_SPLIT and MAX_KV_SPLITS; otherwise 1 (also off CUDA).

Scores are computed as ``exp2`` with ``scale * log2(e)`` folded into the
rotated query; softmax state is float32. fp32 inputs use IEEE dots (no TF32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_sink.attention.inputs import SinkAttentionInputs

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
def _rope_lanes(
    HEAD: tl.constexpr,
    ROT_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    REST_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Head lanes split as (first of pair, second of pair, pass-through).

    Neox pairs lane h with h + ROT_DIM/2, gptj lane 2h with 2h + 1; lanes from
    ROT_DIM on are not rotated. Returns (lanes1, lanes2, pair_ok, rest, rest_ok).
    """
    offs_h = tl.arange(0, HALF_PAD)
    if IS_NEOX:
        lanes1 = offs_h
        lanes2 = offs_h + ROT_DIM // 2
    else:
        lanes1 = 2 * offs_h
        lanes2 = 2 * offs_h + 1
    rest = ROT_DIM + tl.arange(0, REST_PAD)
    return lanes1, lanes2, offs_h < ROT_DIM // 2, rest, rest < HEAD


@triton.jit
def _rotate(x1, x2, pos, cs_ptr, cs_stride, HALF_PAD: tl.constexpr, HALF: tl.constexpr):
    """RoPE of pair halves x1, x2 [M, HALF_PAD] (float32) at ``pos`` [M].

    ``pos`` may be negative (cos(-p) = cos(p), sin(-p) = -sin(p)); ``|pos|``
    must be a table row. Padding lanes come back unchanged.
    """
    offs_h = tl.arange(0, HALF_PAD)
    row = tl.abs(pos).to(tl.int64) * cs_stride
    ptr = cs_ptr + row[:, None] + offs_h[None, :]
    ok = (offs_h < HALF)[None, :]
    cos = tl.load(ptr, mask=ok, other=1.0).to(tl.float32)
    sin = tl.load(ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    sin = tl.where(pos[:, None] < 0, -sin, sin)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


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
    q1,
    q2,
    q_rest,
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
    HEAD: tl.constexpr,
    D_PAD: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    ROT_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    REST_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax step over keys ``j`` [BLOCK_N] for rows of rotated queries.

    Queries come as pair halves ``q1``, ``q2`` [ROWS, HALF_PAD] and
    pass-through lanes ``q_rest`` [ROWS, REST_PAD], prescaled. Only keys with
    ``key_ok`` are loaded; they are rotated to ``key_pos``. ``visible``
    [ROWS, BLOCK_N] is the per-row mask. Returns the updated (acc, m_i, l_i);
    a row with no visible key so far keeps m = -inf, l = 0, acc = 0.
    """
    blk = tl.load(bt_row + (j // KV_BLOCK) * stride_bt_b, mask=key_ok, other=0)
    slot = blk.to(tl.int64) * stride_kv_b + (j % KV_BLOCK).to(tl.int64) * stride_kv_s
    base = (kv_ptr + kv_head_off + slot)[:, None]
    lanes1, lanes2, pair_ok, rest, rest_ok = _rope_lanes(
        HEAD, ROT_DIM, HALF_PAD, REST_PAD, IS_NEOX
    )
    qk = tl.zeros(visible.shape, tl.float32)
    if ROT_DIM > 0:
        mask = key_ok[:, None] & pair_ok[None, :]
        k1 = tl.load(base + lanes1[None, :] * stride_kv_d, mask=mask, other=0.0)
        k2 = tl.load(base + lanes2[None, :] * stride_kv_d, mask=mask, other=0.0)
        k1, k2 = _rotate(
            k1.to(tl.float32),
            k2.to(tl.float32),
            key_pos,
            cs_ptr,
            cs_stride,
            HALF_PAD,
            ROT_DIM // 2,
        )
        qk = tl.dot(q1, tl.trans(k1.to(DOT_DTYPE)), qk, input_precision=DOT_PRECISION)
        qk = tl.dot(q2, tl.trans(k2.to(DOT_DTYPE)), qk, input_precision=DOT_PRECISION)
    if HEAD > ROT_DIM:
        mask = key_ok[:, None] & rest_ok[None, :]
        k_rest = tl.load(base + rest[None, :] * stride_kv_d, mask=mask, other=0.0)
        qk = tl.dot(
            q_rest, tl.trans(k_rest.to(DOT_DTYPE)), qk, input_precision=DOT_PRECISION
        )
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    offs_d = tl.arange(0, D_PAD)
    v_mask = key_ok[:, None] & (offs_d < HEAD)[None, :]
    v = tl.load(base + (HEAD + offs_d)[None, :] * stride_kv_d, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
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
    HALF_PAD: tl.constexpr,
    REST_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
    DECODE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ZERO_SINK: tl.constexpr,
):
    """One (query tile, KV head[, split]) program; see the module docstring.

    ZERO_SINK adds exp(0) to the softmax denominator (softmax off-by-one); in
    the exp2 domain with running max m that is exp2(-m).

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
    q_local = tile_start + offs_r // G_PAD
    g = offs_r % G_PAD
    row_ok = (offs_r // G_PAD < BLOCK_Q) & (q_local < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    t = first_pos + q_local  # absolute index of each row's query

    q_rows = q_ptr + (q_start + q_local).to(tl.int64) * stride_q_t + head * stride_q_h
    q_rows = q_rows[:, None]
    lanes1, lanes2, pair_ok, rest, rest_ok = _rope_lanes(
        HEAD, ROT_DIM, HALF_PAD, REST_PAD, IS_NEOX
    )
    if HEAD > ROT_DIM:
        mask = row_ok[:, None] & rest_ok[None, :]
        q_rest = tl.load(q_rows + rest[None, :] * stride_q_d, mask=mask, other=0.0)
        q_rest = (q_rest.to(tl.float32) * qk_scale).to(DOT_DTYPE)
    else:
        q_rest = tl.zeros([ROWS, 16], DOT_DTYPE)  # unused
    if ROT_DIM > 0:
        mask = row_ok[:, None] & pair_ok[None, :]
        q1 = tl.load(q_rows + lanes1[None, :] * stride_q_d, mask=mask, other=0.0)
        q2 = tl.load(q_rows + lanes2[None, :] * stride_q_d, mask=mask, other=0.0)
        q1 = q1.to(tl.float32) * qk_scale
        q2 = q2.to(tl.float32) * qk_scale
        win_pos = tl.where(row_ok, t - pos_base, 0)
        q1_win, q2_win = _rotate(
            q1, q2, win_pos, cs_ptr, cs_stride, HALF_PAD, ROT_DIM // 2
        )
        if DECODE:  # one query: its window and sink positions coincide
            q1_sink, q2_sink = q1_win, q2_win
        else:
            sink_pos = tl.where(row_ok, tl.minimum(t, span - 1), 0)
            q1_sink, q2_sink = _rotate(
                q1, q2, sink_pos, cs_ptr, cs_stride, HALF_PAD, ROT_DIM // 2
            )
        q1_win, q2_win = q1_win.to(DOT_DTYPE), q2_win.to(DOT_DTYPE)
        q1_sink, q2_sink = q1_sink.to(DOT_DTYPE), q2_sink.to(DOT_DTYPE)
    else:
        q1_win = tl.zeros([ROWS, 16], DOT_DTYPE)  # unused
        q2_win = q1_win
        q1_sink = q1_win
        q2_sink = q1_win

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
            acc, m_i, l_i, q1_sink, q2_sink, q_rest, j, key_ok,
            tl.where(key_ok, j, 0), visible, kv_ptr, bt_row, stride_bt_b,
            kv_head_off, stride_kv_b, stride_kv_s, stride_kv_d, cs_ptr, cs_stride,
            HEAD, D_PAD, KV_BLOCK, ROT_DIM, HALF_PAD, REST_PAD, IS_NEOX,
            DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    for i in range(tl.maximum(tile_lo, n_sink_tiles), tile_hi):
        j = win_lo + (i - n_sink_tiles) * BLOCK_N + offs_n
        key_ok = j <= t_last
        visible = (j[None, :] >= row_win_lo[:, None]) & (j[None, :] <= t[:, None])
        acc, m_i, l_i = _kv_tile(
            acc, m_i, l_i, q1_win, q2_win, q_rest, j, key_ok,
            tl.where(key_ok, j - pos_base, 0), visible, kv_ptr, bt_row, stride_bt_b,
            kv_head_off, stride_kv_b, stride_kv_s, stride_kv_d, cs_ptr, cs_stride,
            HEAD, D_PAD, KV_BLOCK, ROT_DIM, HALF_PAD, REST_PAD, IS_NEOX,
            DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip

    offs_d = tl.arange(0, D_PAD)
    if SPLIT:
        # Partials of (request, head, split); only decode requests get here.
        part = (req.to(tl.int64) * num_heads + head) * num_splits + split
        acc_ptrs = part_acc_ptr + part[:, None] * D_PAD + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        denom = l_i
        if ZERO_SINK:
            denom += tl.exp2(-tl.where(m_i == float("-inf"), 0.0, m_i))
        result = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
        o_rows = (q_start + q_local).to(tl.int64) * stride_o_t + head * stride_o_h
        o_ptrs = out_ptr + o_rows[:, None] + offs_d[None, :] * stride_o_d
        o_mask = row_ok[:, None] & (offs_d < HEAD)[None, :]
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=o_mask)


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
    ZERO_SINK: tl.constexpr,
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
    if ZERO_SINK:
        denom += tl.exp2(-m_max)
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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@dataclass(frozen=True)
class _Launch:
    """Resolved shape of one launch: ``rows = max(16, block_q * G_PAD)``."""

    block_q: int
    rows: int
    block_n: int
    num_warps: int
    num_stages: int


# Defaults chosen from sm_90 cubins (register use and spills, offline): the
# per-tile K rotation runs in float32 registers, so tiles stay modest.
def _prefill_launch(
    tiles: TritonTiles, dtype: torch.dtype, d_pad: int, group_pad: int, span: int,
    max_q: int,
) -> _Launch:  # fmt: skip
    """Prefill tiles: ~64 rows (fewer for fp32 / head 256), <= S+W queries."""
    fp32 = dtype == torch.float32
    rows = 16 if d_pad > 128 and fp32 else (32 if d_pad > 128 or fp32 else 64)
    block_q = tiles.block_q or max(1, rows // group_pad)
    caps = (_prev_pow2(block_q), _prev_pow2(span), triton.next_power_of_2(max_q))
    block_q = max(1, min(caps))
    return _Launch(
        block_q=block_q,
        rows=max(16, block_q * group_pad),
        block_n=tiles.block_n or 32,
        num_warps=tiles.num_warps or 8,
        num_stages=tiles.num_stages or (1 if fp32 else 2),  # fp32: shared memory
    )


def _decode_launch(
    tiles: TritonTiles, dtype: torch.dtype, d_pad: int, group_pad: int
) -> _Launch:
    """Decode tiles: one query, its GQA group as rows."""
    fp32 = dtype == torch.float32
    return _Launch(
        block_q=1,
        rows=max(16, group_pad),
        block_n=tiles.block_n or (16 if fp32 or d_pad > 128 else 32),
        num_warps=tiles.num_warps or (8 if fp32 else 4),
        num_stages=tiles.num_stages or (1 if fp32 else 2),
    )


def _auto_splits(programs: int, target: int, max_kv_tiles: int) -> int:
    """Parts per decode request that fill ``target`` programs (a power of
    two, at most ``max_kv_tiles / MIN_TILES_PER_SPLIT``); 1 when already full."""
    if programs >= target:
        return 1
    want = triton.next_power_of_2(triton.cdiv(target, programs))
    cap = _prev_pow2(max(1, max_kv_tiles // MIN_TILES_PER_SPLIT))
    return max(1, min(want, cap, MAX_KV_SPLITS))


def _num_kv_splits(
    tiles: TritonTiles,
    device: torch.device,
    num_reqs: int,
    num_kv_heads: int,
    max_kv_tiles: int,
) -> int:
    """Decode splits: enough programs for ~PROGRAMS_PER_SM waves on the GPU.

    Uses only host-known sizes (no sync). Off CUDA the default is 1.
    """
    if tiles.num_kv_splits is not None:
        return max(1, tiles.num_kv_splits)
    if device.type != "cuda":
        return 1
    target = PROGRAMS_PER_SM * _sm_count(device.index or 0)
    return _auto_splits(num_reqs * num_kv_heads, target, max_kv_tiles)


def _d_pad(head_size: int) -> int:
    return max(16, triton.next_power_of_2(head_size))


def workspace_floats(
    num_heads: int, num_kv_heads: int, head_size: int, device: torch.device
) -> int:
    """Float32 scratch the decode launch's split-KV partials need at most, for
    any batch size, under the automatic split rule (0 off CUDA, where it does
    not split). Splits only happen while ``R * Hkv`` is under the target, so
    the bound is small (~4 * target * GQA partials of ``D_PAD + 2`` floats)."""
    if device.type != "cuda":
        return 0
    target = PROGRAMS_PER_SM * _sm_count(device.index or 0)
    partials = max(
        r * num_heads * _auto_splits(r * num_kv_heads, target, 1 << 30)
        for r in range(1, max(1, target // num_kv_heads) + 1)
    )
    return partials * (_d_pad(head_size) + 2)


def _check_args(inputs: SinkAttentionInputs, out: torch.Tensor) -> None:
    query, kv_cache, rope = inputs.query, inputs.kv_cache, inputs.rope
    _, num_heads, head_size = query.shape
    _, num_kv_heads, _, kv_width = kv_cache.shape
    rotary_dim = rope.rotary_dim
    if kv_width != 2 * head_size:
        raise ValueError(f"kv_cache last dim {kv_width} != 2 * head_size {head_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not a multiple of {num_kv_heads}")
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_size:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= {head_size}")
    if rotary_dim and rope.cos_sin_cache.shape[-1] != rotary_dim:
        raise ValueError(
            f"cos_sin_cache width {rope.cos_sin_cache.shape[-1]} != {rotary_dim}"
        )
    if kv_cache.dtype not in _TL_DTYPES or out.shape != query.shape:
        raise ValueError(f"unsupported kv dtype {kv_cache.dtype} or out shape")


def _kernel_args(inputs: SinkAttentionInputs, out: torch.Tensor) -> dict:
    """Keyword arguments of ``_sink_attn_kernel`` shared by the prefill and
    decode launches of one call (all but the launch shape and the partials)."""
    query, kv_cache, layout, rope = (
        inputs.query, inputs.kv_cache, inputs.layout, inputs.rope,
    )  # fmt: skip
    num_heads, head_size = query.shape[1:]
    rotary_dim = rope.rotary_dim
    dot_dtype = _TL_DTYPES[kv_cache.dtype]
    if _INTERPRETED and dot_dtype == tl.bfloat16:
        dot_dtype = tl.float32
    group = num_heads // kv_cache.shape[1]
    cos_sin = rope.cos_sin_cache.contiguous() if rotary_dim else rope.cos_sin_cache
    axes = {  # kernel stride names: stride_<tensor>_<axis>
        "q": (query, "thd"),
        "kv": (kv_cache, "bhsd"),
        "o": (out, "thd"),
        "bt": (layout.block_table, "rb"),
    }
    stride_args = {
        f"stride_{name}_{axis}": stride
        for name, (tensor, letters) in axes.items()
        for axis, stride in zip(letters, tensor.stride())
    }
    return dict(
        q_ptr=query,
        kv_ptr=kv_cache,
        out_ptr=out,
        bt_ptr=layout.block_table,
        qsl_ptr=layout.query_start_loc.contiguous(),
        seq_lens_ptr=layout.seq_lens.contiguous(),
        cs_ptr=cos_sin,
        **stride_args,
        cs_stride=cos_sin.stride(0) if rotary_dim else 0,
        num_reqs=layout.num_reqs,
        num_heads=num_heads,
        sink=inputs.variant.sink,
        window=inputs.variant.window,
        qk_scale=float(inputs.scale) * LOG2E,
        HEAD=head_size,
        D_PAD=_d_pad(head_size),
        GROUP=group,
        G_PAD=triton.next_power_of_2(group),
        KV_BLOCK=kv_cache.shape[2],
        ROT_DIM=rotary_dim,
        HALF_PAD=max(16, triton.next_power_of_2(rotary_dim // 2)),
        REST_PAD=max(16, triton.next_power_of_2(head_size - rotary_dim)),
        IS_NEOX=bool(rope.is_neox_style),
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32",
        ZERO_SINK=bool(inputs.variant.zero_sink),
    )


def _launch(
    args: dict, grid: tuple, shape: _Launch, decode: bool, partials=None
) -> None:
    """One launch of ``_sink_attn_kernel``; ``partials`` (acc, ml) splits the
    decode KV over ``acc.shape[2]`` programs per request."""
    out = args["out_ptr"]
    part_acc, part_ml = partials or (out, out)  # unread without SPLIT
    _sink_attn_kernel[grid](
        **args,
        part_acc_ptr=part_acc,
        part_ml_ptr=part_ml,
        num_splits=part_acc.shape[2] if partials else 1,
        BLOCK_Q=shape.block_q,
        ROWS=shape.rows,
        BLOCK_N=shape.block_n,
        DECODE=decode,
        SPLIT=partials is not None,
        num_warps=shape.num_warps,
        num_stages=shape.num_stages,
    )


def _reduce_splits(
    args: dict, part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor
) -> None:
    num_reqs, num_heads, splits, d_pad = part_acc.shape
    stride_o_t, stride_o_h, stride_o_d = out.stride()
    _reduce_kernel[(num_reqs, num_heads)](
        out_ptr=out,
        qsl_ptr=args["qsl_ptr"],
        part_acc_ptr=part_acc,
        part_ml_ptr=part_ml,
        stride_o_t=stride_o_t,
        stride_o_h=stride_o_h,
        stride_o_d=stride_o_d,
        num_heads=num_heads,
        num_splits=splits,
        HEAD=args["HEAD"],
        D_PAD=d_pad,
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        ZERO_SINK=args["ZERO_SINK"],
        num_warps=4,
    )


def _partials(
    num_reqs: int,
    num_heads: int,
    splits: int,
    d_pad: int,
    workspace: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV partials (acc [R, Hq, splits, D_PAD], max/sum [.., 2]) as views
    of ``workspace``; a fresh buffer only when none or too small is given."""
    count = num_reqs * num_heads * splits
    needed = count * (d_pad + 2)
    if workspace is None or workspace.numel() < needed:
        workspace = torch.empty(needed, dtype=torch.float32, device=device)
    part_acc = workspace[: count * d_pad].view(num_reqs, num_heads, splits, d_pad)
    part_ml = workspace[count * d_pad : needed].view(num_reqs, num_heads, splits, 2)
    return part_acc, part_ml


def sink_attention_triton(
    inputs: SinkAttentionInputs,
    out: torch.Tensor,
    *,
    tiles: TritonTiles | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query token of the batch; writes and returns ``out``.

    Same contract as ``torch_path.sink_attention``. ``inputs.layout.max_query_len``
    sizes the prefill tiles and decides whether the prefill launch runs; with
    it given the call does no host sync (``None`` reads it from the device).
    ``workspace`` (float32, contiguous, :func:`workspace_floats` elements,
    preallocated by the metadata builder) holds the split-KV partials, so a
    call allocates nothing and can be captured in a CUDA graph.
    """
    inputs = inputs.with_unit_rotary()
    _check_args(inputs, out)
    tiles = tiles or TritonTiles()
    query, layout, variant = inputs.query, inputs.layout, inputs.variant
    num_tokens, num_heads = query.shape[:2]
    num_kv_heads = inputs.kv_cache.shape[1]
    num_reqs = layout.num_reqs
    if num_tokens == 0 or num_reqs == 0:
        return out
    max_query_len = layout.max_query_len
    if max_query_len is None:
        qsl = layout.query_start_loc
        max_query_len = int((qsl[1:] - qsl[:-1]).max())
    args = _kernel_args(inputs, out)
    dtype, d_pad, group_pad = inputs.kv_cache.dtype, args["D_PAD"], args["G_PAD"]

    if max_query_len > 1:
        shape = _prefill_launch(
            tiles, dtype, d_pad, group_pad, variant.span, max_query_len
        )
        grid = (num_tokens // shape.block_q + num_reqs, num_kv_heads)
        _launch(args, grid, shape, decode=False)

    shape = _decode_launch(tiles, dtype, d_pad, group_pad)
    max_kv_tiles = triton.cdiv(variant.sink, shape.block_n) + triton.cdiv(
        variant.window, shape.block_n
    )
    splits = _num_kv_splits(
        tiles, query.device, num_reqs, num_kv_heads, max_kv_tiles + 1
    )
    if splits == 1:
        _launch(args, (num_reqs, num_kv_heads, 1), shape, decode=True)
        return out
    partials = _partials(num_reqs, num_heads, splits, d_pad, workspace, query.device)
    _launch(
        args, (num_reqs, num_kv_heads, splits), shape, decode=True, partials=partials
    )
    _reduce_splits(args, *partials, out)
    return out
