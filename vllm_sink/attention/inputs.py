"""The typed inputs of one sink-attention call: what every path takes.

``SinkAttentionInputs`` is the one kernel contract: the torch path
(``torch_path.sink_attention``), the Triton path
(``triton_path.sink_attention_triton``), the compiled CPU decode
(``cpu_kernel.sink_decode``), the backend, the kernel tests and
``benchmarks/gpu_kernel_check.py`` all build or take it. Semantics are
docs/architecture.md §1.

vLLM-free on purpose (torch only): the GPU check runs where only torch and
Triton are installed. ``import vllm_sink`` runs ``vllm_sink/__init__.py``,
which imports ``vllm_sink.config``; both import vLLM only inside functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class RopeTable:
    """The model's rotary table, applied at read (vllm_sink/rope.py makes it).

    ``cos_sin_cache[p] = cat(cos(p * f), sin(p * f))`` for p in [0, len), each
    half ``rotary_dim / 2`` wide, in vLLM's layout; at least S+W rows. Dims past
    ``rotary_dim`` are not rotated (partial rotary; 0 turns rotary off). Rows
    have unit magnitude; a table scaled by ``m`` (YaRN) is stored divided by
    ``m`` with ``qk_factor = m^2``, which multiplies q . k over the rotated dims.
    """

    cos_sin_cache: torch.Tensor
    rotary_dim: int
    is_neox_style: bool
    qk_factor: float = 1.0


class TableCache:
    """A value derived from a rotary table (and more arguments), cached per table
    object: the model's table is one tensor shared by every layer, so each path
    derives its form once. An entry holds its table, so the table's id is not
    reused by another tensor while the entry lives."""

    def __init__(self, derive: Callable[..., Any]) -> None:
        self._derive = derive
        self._entries: dict[tuple, tuple[torch.Tensor, Any]] = {}

    def __call__(self, table: torch.Tensor, *args: Any) -> Any:
        key = (id(table), *args)
        entry = self._entries.get(key)
        if entry is None or entry[0] is not table:
            entry = (table, self._derive(table, *args))
            self._entries[key] = entry
        return entry[1]


@dataclass(frozen=True)
class SinkVariant:
    """Which keys a query sees and how they are weighed.

    ``sink`` (S) first tokens of the stream and the last ``window`` (W) tokens;
    ``zero_sink`` adds exp(0) to every softmax denominator (SoftMax-off-by-One).
    """

    sink: int
    window: int
    zero_sink: bool = False

    @property
    def span(self) -> int:
        """S + W: the most keys a query sees, and rows of rotary read."""
        return self.sink + self.window


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """Host-side layout of one step's batch, the same for every layer.

    ``decode_rows``/``decode_tokens``: the requests with one query and the
    batch index of that query; ``all_decode`` when they are the whole batch in
    order (query ``r`` is request ``r``).
    """

    starts: list[int]
    lens: list[int]
    decode_rows: torch.Tensor
    decode_tokens: torch.Tensor
    longest_decode: int
    all_decode: bool


def plan_batch(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> BatchPlan:
    """Read the batch layout on the host (the builder does it once per step;
    pass host copies to avoid a device sync)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decodes = [r for r in range(len(lens)) if starts[r + 1] - starts[r] == 1]
    device = seq_lens.device
    return BatchPlan(
        starts=starts,
        lens=lens,
        decode_rows=torch.tensor(decodes, dtype=torch.long, device=device),
        decode_tokens=torch.tensor(
            [starts[r] for r in decodes], dtype=torch.long, device=device
        ),
        longest_decode=max((lens[r] for r in decodes), default=0),
        all_decode=len(decodes) == len(lens) and starts[-1] == len(lens),
    )


@dataclass(frozen=True, eq=False)
class BatchLayout:
    """Where each request's queries and keys are.

    Requests are rows: the queries of request ``r`` are tokens
    ``query_start_loc[r] .. query_start_loc[r+1]-1`` of the batch, at absolute
    stream indices ``seq_lens[r] - q_len .. seq_lens[r] - 1``; its key ``j``
    is in block ``block_table[r, j // block_size]``. ``max_query_len`` (host)
    lets the Triton path launch without a device sync; ``plan`` (host) is the
    torch path's per-step layout. Either may be None: it is then read from
    the tensors.
    """

    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32, tokens after this step
    block_table: torch.Tensor  # [R, max_blocks] int32
    max_query_len: int | None = None
    plan: BatchPlan | None = None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    def planned(self) -> BatchPlan:
        return self.plan or plan_batch(self.query_start_loc, self.seq_lens)


@dataclass(frozen=True, eq=False)
class SinkAttentionInputs:
    """Everything one sink-attention call reads.

    ``query`` [tokens, Hq, D] (tokens past the layout's last are padding, left
    alone); ``kv_cache`` the per-layer paged cache [blocks, Hkv, block_size,
    2D] (pre-RoPE keys, then values, in the last dim; any strides); ``scale``
    the softmax scale. The output has the query's shape and is a separate
    argument of every path.
    """

    query: torch.Tensor
    kv_cache: torch.Tensor
    layout: BatchLayout
    rope: RopeTable
    variant: SinkVariant
    scale: float

    def with_unit_rotary(self) -> SinkAttentionInputs:
        """The same call with ``rope.qk_factor`` carried into the query's
        rotated dims (or the scale, when every dim is rotated): ``m R q . m R k``
        is ``m^2 (R q . R k)`` over the rotated dims. Kernels take this form."""
        factor = self.rope.qk_factor
        if factor == 1.0:
            return self
        rope = replace(self.rope, qk_factor=1.0)
        rotary_dim = self.rope.rotary_dim
        if rotary_dim == self.query.shape[-1]:
            return replace(self, rope=rope, scale=self.scale * factor)
        query = self.query.clone()
        query[..., :rotary_dim] *= factor
        return replace(self, query=query, rope=rope)
