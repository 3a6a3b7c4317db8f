"""vLLM attention backend for sink mode: backend / metadata builder / impl.

Registered as vLLM's ``CUSTOM`` backend and selected automatically in sink
mode. Keys are cached pre-RoPE; the impl rotates them at read with the model's
own table (``layer.sink_rope``, set by ``vllm_sink.rope``). On CPU the torch
path runs prefill and a compiled C kernel (cpu_kernel.py) runs decode; the
Triton kernel runs on GPUs (or on CPU when forced, for tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_sink.attention import cpu_kernel, torch_path
from vllm_sink.config import SinkConfig, SinkConfigError, get_sink_config

# "triton" forces the Triton kernel (on CPU it needs TRITON_INTERPRET=1);
# "torch" forces the torch path, "cpu" the torch path with compiled decode.
KERNEL_ENV = "VLLM_SINK_KERNEL"


@dataclass
class SinkAttentionMetadata:
    """Per-step batch layout.

    Requests are rows; the queries of request ``r`` are tokens
    ``query_start_loc[r] .. query_start_loc[r+1]-1`` of the batch, at absolute
    stream indices ``context_lens[r] .. seq_lens[r]-1``. ``window_starts[r]``
    is the first window key of its first query, ``max(S, context_lens[r]-W+1)``;
    ``sink_counts[r] = min(S, seq_lens[r])`` sink keys are visible to its last.
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    context_lens: torch.Tensor
    window_starts: torch.Tensor
    sink_counts: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    sink: int
    window: int
    torch_plan: torch_path.BatchPlan | None = None  # filled by the first layer


class SinkAttentionMetadataBuilder(AttentionMetadataBuilder[SinkAttentionMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        cfg = get_sink_config(vllm_config)
        if cfg is None:
            raise SinkConfigError(
                "The CUSTOM attention backend of vllm-sink needs sink mode. Fix: "
                "pass --attention-sink/--window, or drop --attention-backend CUSTOM."
            )
        self.sink_config: SinkConfig = cfg

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SinkAttentionMetadata:
        cm = common_attn_metadata
        sink, window = self.sink_config.sink, self.sink_config.window
        query_lens = cm.query_start_loc[1:] - cm.query_start_loc[:-1]
        context_lens = cm.seq_lens - query_lens
        return SinkAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            context_lens=context_lens,
            window_starts=(context_lens - window + 1).clamp(min=sink),
            sink_counts=cm.seq_lens.clamp(max=sink),
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            sink=sink,
            window=window,
        )


class SinkAttentionBackend(AttentionBackend):
    """Paged attention over sink + window keys, rotary applied at read."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @staticmethod
    def get_impl_cls() -> type[SinkAttentionImpl]:
        return SinkAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SinkAttentionMetadataBuilder]:
        return SinkAttentionMetadataBuilder


KERNELS = ("torch", "cpu", "triton")


def choose_kernel(device: torch.device) -> str:
    """The attention path for ``device``: ``$VLLM_SINK_KERNEL``, else Triton
    on CUDA, the compiled CPU decode kernel where it builds, else torch."""
    choice = os.environ.get(KERNEL_ENV, "").strip().lower()
    if choice and choice not in KERNELS:
        raise SinkConfigError(
            f"{KERNEL_ENV} must be one of {', '.join(KERNELS)}, got {choice!r}"
        )
    if choice == "cpu" and cpu_kernel.library() is None:
        raise SinkConfigError(
            f"{KERNEL_ENV}=cpu but the CPU decode kernel could not be built (see "
            "the warning above). Fix: install a C compiler (gcc) or unset it."
        )
    if choice:
        return choice
    if device.type == "cuda":
        return "triton"
    return "cpu" if cpu_kernel.library() is not None else "torch"


class SinkAttentionImpl(AttentionImpl[SinkAttentionMetadata]):
    """Writes pre-RoPE K/V to the paged cache; attends over sinks + window."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported,
    ) -> None:
        refused = [
            (alibi_slopes is not None, "ALiBi slopes"),
            (bool(logits_soft_cap), "logit soft-capping"),
            (sinks is not None, "learned per-head attention sinks"),
            (kv_sharing_target_layer_name is not None, "cross-layer KV sharing"),
            (kv_cache_dtype != "auto", f"kv_cache_dtype={kv_cache_dtype}"),
            (attn_type != AttentionType.DECODER, f"{attn_type} attention"),
        ]
        for is_refused, what in refused:
            if is_refused:
                raise SinkConfigError(
                    f"Sink mode does not support {what}. Fix: drop "
                    "--attention-sink/--window for this model or setting."
                )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        cfg = get_sink_config(get_current_vllm_config())
        assert cfg is not None
        self.sink_config = cfg
        # Chosen at start-up: builds the CPU kernel now, not on the first step.
        self.kernel = choose_kernel(torch.device(current_platform.device_type))

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.kernel == "cpu" and cpu_kernel.write_kv(
            key, value, kv_cache, slot_mapping
        ):
            return
        torch_path.write_kv(key, value, kv_cache, slot_mapping)

    def _carry_factor(self, query: torch.Tensor, rope) -> tuple[torch.Tensor, float]:
        """Query and softmax scale with the table's ``qk_factor`` applied to the
        rotated dims (vllm_sink/rope.py's invariant: the table rows are unit)."""
        factor = rope.qk_factor
        if factor == 1.0:
            return query, self.scale
        if rope.rotary_dim == self.head_size:
            return query, self.scale * factor
        heads = query.reshape(query.shape[0], -1, self.head_size).clone()
        heads[..., : rope.rotary_dim] *= factor
        return heads.view(query.shape), self.scale

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SinkAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sink attention has no fused output quant")
        if attn_metadata is None:  # profiling run
            return output
        rope = layer.sink_rope  # type: ignore[attr-defined]
        n = attn_metadata.num_actual_tokens
        query, scale = self._carry_factor(query[:n], rope)
        args = (
            query,
            kv_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            rope.cos_sin_cache,
            rope.rotary_dim,
            rope.is_neox_style,
            attn_metadata.sink,
            attn_metadata.window,
            scale,
            output[:n],
        )
        zero_sink = self.sink_config.zero_sink
        if self.kernel == "triton":
            from vllm_sink.attention.triton_path import sink_attention_triton

            extra = {"zero_sink": True} if zero_sink else {}
            sink_attention_triton(
                *args, max_query_len=attn_metadata.max_query_len, **extra
            )
        else:
            if attn_metadata.torch_plan is None:
                attn_metadata.torch_plan = torch_path.plan_batch(
                    attn_metadata.query_start_loc, attn_metadata.seq_lens
                )
            torch_path.sink_attention(
                *args,
                zero_sink=zero_sink,
                plan=attn_metadata.torch_plan,
                compiled_decode=self.kernel == "cpu",
            )
        return output
