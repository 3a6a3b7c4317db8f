"""Sink attention over a paged pre-RoPE KV cache, in plain torch.

This is the CPU path and the reference for the Triton kernel. Semantics
(docs/architecture.md §1): the query at absolute index ``t`` attends to the sink keys
``0 .. min(S, t+1)-1`` and the window keys ``max(S, t-W+1) .. t``.

Rotary positions are ranks inside that set, applied at read. Scores depend only
on position differences, so for window keys any common base ``b`` gives the
same score: ``R(t-b) q . R(j-b) k``. A query tile whose last query is ``t1``
of at most S+W queries uses ``b = max(0, t1 - (S+W-1))``, so every position
lies in ``(-(S+W), S+W)``
(negative ones use cos(-p) = cos(p), sin(-p) = -sin(p)) and the table is never
read past ``S+W-1``. Sink key ``i`` is at position ``i`` and scored against the
query rotated to ``min(t, S+W-1)``. A query visits only its sink and window
keys: cost O(S+W), never O(t).

Tensor shapes: ``query``/``out`` [tokens, num_heads, head_size]; ``kv_cache``
the logical per-layer view [num_blocks, num_kv_heads, block_size, 2*head_size]
(keys then values in the last dim); ``block_table`` [requests, max_blocks].
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F

from vllm_sink.attention.inputs import (
    BatchLayout,
    BatchPlan,
    RopeTable,
    SinkAttentionInputs,
    TableCache,
    plan_batch,
)

__all__ = [
    "BatchPlan",
    "plan_batch",
    "rotate",
    "rotate_torch",
    "sink_attention",
    "write_kv",
]

QUERY_TILE = 256


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Rotate ``x`` [..., heads, head_size] by per-row ``positions`` [...].

    Positions may be negative. Computed in float32 into one new tensor; dims past
    rotary_dim pass. On CPU inside vLLM this is vLLM's own rotary op (one pass,
    several times faster than the torch ops, and bit-identical to them); elsewhere
    (the GPU check runs without vLLM) :func:`rotate_torch`.
    """
    op = _vllm_rotary_op()
    rows = _rows_of(x, positions)
    if op is None or x.device.type != "cpu" or not rows:
        return rotate_torch(x, positions, rope)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out.copy_(x)
    table, num_rows = _signed_table(rope.cos_sin_cache)
    flat = positions.reshape(rows).long()
    index = torch.where(flat < 0, num_rows - flat, flat)
    op(index, out.view(rows, -1), None, x.shape[-1], table, rope.is_neox_style)
    return out


def _vllm_rotary_op():
    """vLLM's in-place rotary op (``_C::rotary_embedding``) once vLLM has loaded
    its ops, else None."""
    try:
        return torch.ops._C.rotary_embedding
    except (AttributeError, RuntimeError):
        return None


def _rows_of(x: torch.Tensor, positions: torch.Tensor) -> int | None:
    """How many rows of ``x`` the positions index, one position per row of
    heads x head_size; None when ``positions`` broadcasts in another way (0 and
    None both go to the torch ops)."""
    shape = list(positions.shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    if list(x.shape[: len(shape)]) != shape:
        return None
    return positions.numel()


def _signed(cos_sin: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The table's rows as float32, then its rows with sin negated, and how many
    rows it has: row ``rows + p`` rotates by ``-p`` (vLLM's CPU op has no inverse)."""
    table = cos_sin.float()
    cos, sin = table.chunk(2, dim=-1)
    signed = torch.cat((table, torch.cat((cos, -sin), dim=-1))).contiguous()
    return signed, table.shape[0]


_signed_table = TableCache(_signed)


def rotate_torch(
    x: torch.Tensor, positions: torch.Tensor, rope: RopeTable
) -> torch.Tensor:
    """:func:`rotate` in torch ops (no concatenations: it runs on every key read)."""
    rotary_dim = rope.rotary_dim
    cos_sin = rope.cos_sin_cache[positions.abs()].float()
    cos, sin = cos_sin.chunk(2, dim=-1)
    sin = torch.where((positions < 0)[..., None], -sin, sin)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x = x.float().contiguous()  # strided keys (a cache view) rotate 100x slower
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if rope.is_neox_style:
        half = rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        o1, o2 = out[..., :half], out[..., half:rotary_dim]
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        o1, o2 = out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store pre-RoPE ``key``/``value`` [tokens, kv_heads, head_size] at slots.

    Slots < 0 (padding) are skipped.
    """
    num_tokens = slot_mapping.shape[0]
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = (
            slots[valid],
            key[:num_tokens][valid],
            value[:num_tokens][valid],
        )
    block_size = kv_cache.shape[2]
    head_size = key.shape[-1]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :head_size] = key[: slots.shape[0]].to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_size:] = value[: slots.shape[0]].to(
        kv_cache.dtype
    )


def _gather_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, first: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [end - first, kv_heads, head_size] of stream indices
    ``first .. end-1`` of one request: whole blocks copied, then sliced (an
    index per token costs several times more)."""
    block_size = kv_cache.shape[2]
    end = max(first, end)
    lo, hi = first // block_size, -(-end // block_size)
    blocks = kv_cache.index_select(0, block_row[lo:hi].long())
    tokens = blocks.transpose(1, 2).flatten(0, 1)  # [blocks * bs, kv_heads, 2D]
    offset = first - lo * block_size
    return tokens[offset : offset + end - first].chunk(2, dim=-1)


def _softmax(
    scores: torch.Tensor, visible: torch.Tensor, scale: float, zero_sink: bool
) -> torch.Tensor:
    """Softmax of ``scores * scale`` over visible keys (last dim), in place.

    ``zero_sink`` adds exp(0) to the denominator: a zero logit with a zero value.
    """
    scores.mul_(scale).masked_fill_(~visible, float("-inf"))
    if zero_sink:
        zero = scores.new_zeros(scores.shape[:-1] + (1,))
        return torch.softmax(torch.cat((scores, zero), dim=-1), dim=-1)[..., :-1]
    return torch.softmax(scores, dim=-1)


def _attend(
    q_sink: torch.Tensor,
    q_win: torch.Tensor,
    k_sink: torch.Tensor,
    k_win: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    zero_sink: bool = False,
) -> torch.Tensor:
    """Softmax attention over [sink keys | window keys] for a batch of queries.

    q_*: [B, Q, Hkv, G, D]; k_*: [B, K*, Hkv, D]; v: [B, Ks+Kw, Hkv, D];
    mask: [B, Q, Ks+Kw] True where visible. Returns [B, Q, Hkv, G, D] float32.
    ``zero_sink`` adds exp(0) to the denominator: a zero logit with a zero value.
    """
    b, q, h, g, d = q_win.shape

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, Q, H, G, D] -> [B, H, G*Q, D]
        return x.permute(0, 2, 3, 1, 4).reshape(b, h, g * q, d).float()

    def cols(x: torch.Tensor) -> torch.Tensor:  # [B, K, H, D] -> [B, H, D, K]
        return x.permute(0, 2, 3, 1).float()

    # Batched matmuls over (B, H) with G*Q rows: ~3x faster than einsum on CPU.
    scores = torch.cat(
        (rows(q_sink) @ cols(k_sink), rows(q_win) @ cols(k_win)), dim=-1
    ).view(b, h, g, q, -1)
    probs = _softmax(scores, mask[:, None, None], scale, zero_sink)
    out = probs.reshape(b, h, g * q, -1) @ v.permute(0, 2, 1, 3).float()
    return out.view(b, h, g, q, d).permute(0, 3, 1, 2, 4)


def _attend_tile(
    inputs: SinkAttentionInputs, tokens: slice, block_row: torch.Tensor, first: int
) -> torch.Tensor:
    """Attention for the queries ``tokens`` of one request, at absolute indices
    ``first`` .. ``first + len - 1``."""
    query, kv_cache, rope = inputs.query[tokens], inputs.kv_cache, inputs.rope
    sink, window = inputs.variant.sink, inputs.variant.window
    device = query.device
    span = sink + window
    last = first + query.shape[0] - 1
    base = max(0, last - (span - 1))
    t = torch.arange(first, last + 1, device=device)
    sink_pos = torch.arange(min(sink, last + 1), device=device)
    win_first = max(sink, first - window + 1)
    win_pos = torch.arange(win_first, max(win_first, last + 1), device=device)
    k_sink, v_sink = _gather_kv(kv_cache, block_row, 0, len(sink_pos))
    k_win, v_win = _gather_kv(kv_cache, block_row, win_first, win_first + len(win_pos))

    num_kv_heads, head_size = kv_cache.shape[1], query.shape[-1]
    q = query.view(len(t), num_kv_heads, -1, head_size)
    q_win = rotate(q, (t - base)[:, None], rope)
    q_sink = rotate(q, t.clamp(max=span - 1)[:, None], rope)
    k_win = rotate(k_win, win_pos - base, rope)
    k_sink = rotate(k_sink, sink_pos, rope)

    window_start = (t - window + 1).clamp(min=sink)
    sink_mask = sink_pos[None, :] <= t[:, None]
    win_mask = (win_pos[None, :] >= window_start[:, None]) & (
        win_pos[None, :] <= t[:, None]
    )
    mask = torch.cat((sink_mask, win_mask), dim=-1)
    v = torch.cat((v_sink, v_win), dim=0)
    out = _attend(
        q_sink[None],
        q_win[None],
        k_sink[None],
        k_win[None],
        v[None],
        mask[None],
        inputs.scale,
        inputs.variant.zero_sink,
    )
    return out[0].flatten(1, 2)


def _dense_request(
    inputs: SinkAttentionInputs, tokens: slice, block_row: torch.Tensor, first: int
) -> torch.Tensor:
    """A request whose queries all lie below S+W, at absolute indices ``first``
    ...: there ``V(t)`` is ``0..t`` and every rank is the absolute index, so this
    is dense causal attention at absolute positions: vLLM's own CPU attention
    kernel where it runs (:func:`_vllm_dense`), else one fused SDPA call (the
    tiled path's mask and score tensors would cost several times more)."""
    query, rope = inputs.query[tokens], inputs.rope
    positions = torch.arange(first + query.shape[0], device=query.device)
    k, v = _gather_kv(inputs.kv_cache, block_row, 0, len(positions))
    k = rotate(k, positions, rope)
    q = rotate(query, positions[first:], rope)
    out = _vllm_dense(q, k, v, inputs.scale)
    if out is not None:
        return out
    mask = None
    if first:  # the chunk's queries see the request's earlier keys too
        mask = positions[None, :] <= positions[first:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.float().transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=not first,
        scale=inputs.scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


SCRATCH_BLOCK = 32  # vLLM's CPU attention takes multiples of 32


@functools.cache
def _vllm_cpu_attention() -> tuple | None:
    """vLLM's CPU attention ops and its ISA choice, or None without vLLM."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends import cpu_attn
    except ImportError:
        return None
    names = (
        "cpu_attention_with_kv_cache",
        "cpu_attn_get_scheduler_metadata",
        "cpu_attn_reshape_and_cache",
    )
    choose_isa = getattr(cpu_attn, "_get_attn_isa", None)
    heads = cpu_attn.CPUAttentionBackend.get_supported_head_sizes()
    if choose_isa is None or not all(hasattr(ops, name) for name in names):
        return None

    @functools.cache
    def isa(head_size: int) -> str:  # chosen once, not per request and layer
        return choose_isa(torch.float32, SCRATCH_BLOCK, head_size)

    return ops, isa, frozenset(heads)


def _vllm_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """Causal attention of the last ``len(q)`` of ``len(k)`` positions (fp32
    rotated ``q`` [nq, H, D], ``k`` [n, Hkv, D], ``v``) by vLLM's CPU kernel, what
    plain vLLM runs for the same prefill, over a scratch paged cache; None where
    that kernel is not available (no vLLM, not CPU, head size it lacks)."""
    found = _vllm_cpu_attention()
    head_size = q.shape[-1]
    if found is None or q.device.type != "cpu" or head_size not in found[2]:
        return None
    ops, isa_of, _ = found
    n, num_kv_heads = k.shape[0], k.shape[1]
    isa = isa_of(head_size)
    blocks = -(-n // SCRATCH_BLOCK)
    # Zeros: the kernel reads whole blocks, and 0 x NaN would leak into the output.
    scratch = torch.zeros(blocks, num_kv_heads, 2 * SCRATCH_BLOCK, head_size)
    key_cache, value_cache = scratch.chunk(2, dim=2)
    slots = torch.arange(n, dtype=torch.int64)
    value = v.float().contiguous()
    ops.cpu_attn_reshape_and_cache(k, value, key_cache, value_cache, slots, isa)
    query_start_loc = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    seq_lens = torch.tensor([n], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1,
        num_heads=q.shape[1],
        num_kv_heads=num_kv_heads,
        head_dim=head_size,
        seq_lens=seq_lens,
        dtype=torch.float32,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=False,
    )
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q,
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=torch.arange(blocks, dtype=torch.int32)[None],
        softcap=0.0,
        scheduler_metadata=metadata,
        s_aux=None,
    )
    return out


def _torch_decodes(
    inputs: SinkAttentionInputs, out: torch.Tensor, longest: int
) -> torch.Tensor:
    """Decode attention in torch ops: request ``r`` has one query, ``query[r]``
    (a decode-only batch, see :func:`decode_batch`); writes and returns ``out``.

    The query is left unrotated (position 0) and each key is rotated by its
    rank minus the query's: ``j - t`` for window keys, ``i - min(t, S+W-1)``
    for sinks, all in ``(-(S+W), 0]``. ``longest`` is the largest of
    ``seq_lens``: no request reads more than ``min(S, longest)`` sink keys and
    ``min(W, longest - S)`` window keys.
    """
    query, kv_cache, layout = inputs.query, inputs.kv_cache, inputs.layout
    sink, window = inputs.variant.sink, inputs.variant.window
    device = query.device
    span = sink + window
    num_sink = min(sink, longest)
    num_win = min(window, max(longest - sink, 0))
    t = (layout.seq_lens.long() - 1).to(device)[:, None]  # [B, 1]
    window_start = (t - window + 1).clamp(min=sink)
    sink_pos = torch.arange(num_sink, device=device).expand(len(t), num_sink)
    win_pos = window_start + torch.arange(num_win, device=device)
    positions = torch.cat((sink_pos, win_pos), dim=-1)  # [B, K] stream indices
    mask = positions <= t
    positions = torch.minimum(positions, t)  # keep masked reads in range
    query_rank = torch.cat(
        (t.clamp(max=span - 1).expand(-1, num_sink), t.expand(-1, num_win)), dim=-1
    )
    distance = query_rank - positions  # >= 0: keys rotate by -distance

    block_size = kv_cache.shape[2]
    blocks = torch.gather(layout.block_table.long(), 1, positions // block_size)
    kv = kv_cache[blocks, :, positions % block_size, :]  # [B, K, Hkv, 2D]
    k, v = kv.chunk(2, dim=-1)
    k = rotate(k, -distance, inputs.rope)

    num_kv_heads, head_size = kv_cache.shape[1], query.shape[-1]
    q = query[: len(t)].view(len(t), num_kv_heads, -1, head_size).float()
    scores = q @ k.permute(0, 2, 3, 1)  # [B, Hkv, G, K]
    probs = _softmax(
        scores, mask[:, None, None], inputs.scale, inputs.variant.zero_sink
    )
    out.copy_((probs @ v.permute(0, 2, 1, 3).float()).flatten(1, 2))
    return out


def _compiled_decodes(
    inputs: SinkAttentionInputs,
    out: torch.Tensor,
    longest: int,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`_torch_decodes` in one compiled pass (cpu_decode.c), where it runs."""
    # Imported here: cpu_kernel needs a C compiler only when it is used.
    from vllm_sink.attention import cpu_kernel

    if not cpu_kernel.supports(inputs.query, inputs.kv_cache, out):
        return _torch_decodes(inputs, out, longest)
    return cpu_kernel.sink_decode(inputs, out, workspace=workspace)


def decode_batch(inputs: SinkAttentionInputs, plan: BatchPlan) -> SinkAttentionInputs:
    """The call cut down to its one-query requests (request ``r`` -> query ``r``)."""
    if plan.all_decode:
        num_reqs = len(plan.lens)
        layout = replace(
            inputs.layout,
            query_start_loc=inputs.layout.query_start_loc[: num_reqs + 1],
            block_table=inputs.layout.block_table[:num_reqs],
            max_query_len=1,
            plan=None,
        )
        return replace(inputs, query=inputs.query[:num_reqs], layout=layout)
    rows, tokens = plan.decode_rows, plan.decode_tokens
    layout = BatchLayout(
        query_start_loc=torch.arange(
            len(rows) + 1, dtype=torch.int32, device=rows.device
        ),
        seq_lens=inputs.layout.seq_lens[rows],
        block_table=inputs.layout.block_table[rows],
        max_query_len=1,
    )
    return replace(inputs, query=inputs.query[tokens], layout=layout)


def sink_attention(
    inputs: SinkAttentionInputs,
    out: torch.Tensor,
    *,
    compiled_decode: bool = False,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query token of the batch; writes and returns ``out``.

    The batch layout is read on the host once per step: ``inputs.layout.plan``
    when the builder made it, else here. Requests with one query are batched
    together; ``compiled_decode`` runs them with the compiled CPU kernel
    (cpu_kernel.py, scratch in ``workspace`` when given) instead of torch ops.
    """
    inputs = inputs.with_unit_rotary()
    plan = inputs.layout.planned()
    decode = _torch_decodes
    if compiled_decode:
        decode = functools.partial(_compiled_decodes, workspace=workspace)
    if plan.all_decode:
        decode(decode_batch(inputs, plan), out[: len(plan.lens)], plan.longest_decode)
        return out
    if len(plan.decode_rows):
        decodes = decode_batch(inputs, plan)
        result = torch.empty(decodes.query.shape, dtype=out.dtype, device=out.device)
        out[plan.decode_tokens] = decode(decodes, result, plan.longest_decode)
    # A tile no longer than S+W keeps every rotary position in (-(S+W), S+W).
    span = inputs.variant.span
    tile_len = min(QUERY_TILE, span)
    starts, lens = plan.starts, plan.lens
    for r in range(len(lens)):
        num_queries = starts[r + 1] - starts[r]
        if num_queries <= 1:
            continue
        first_pos = lens[r] - num_queries
        if lens[r] <= span and not inputs.variant.zero_sink:
            tokens = slice(starts[r], starts[r + 1])
            block_row = inputs.layout.block_table[r]
            dense = _dense_request(inputs, tokens, block_row, first_pos)
            out[tokens] = dense.to(out.dtype)
            continue
        for lo in range(0, num_queries, tile_len):
            hi = min(lo + tile_len, num_queries)
            tile = slice(starts[r] + lo, starts[r] + hi)
            block_row = inputs.layout.block_table[r]
            out[tile] = _attend_tile(inputs, tile, block_row, first_pos + lo).to(
                out.dtype
            )
    return out
