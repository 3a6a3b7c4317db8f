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
from vllm_sink.attention.inputs import (
    BatchLayout,
    SinkAttentionInputs,
    SinkVariant,
    plan_batch,
)
from vllm_sink.config import (
    SinkConfig,
    SinkConfigError,
    get_sink_config,
    layer_config,
)

# "triton" forces the Triton kernel (on CPU it needs TRITON_INTERPRET=1);
# "torch" forces the torch path, "cpu" the torch path with compiled decode.
KERNEL_ENV = "VLLM_SINK_KERNEL"


@dataclass
class SinkAttentionMetadata:
    """Per-step batch layout, built once by the builder for every layer.

    ``layout`` is the kernel contract's part (inputs.py): the Triton path
    gets ``max_query_len``, the torch/CPU paths the host-side ``plan`` too.
    ``workspace`` is the builder's preallocated float32 scratch of the chosen
    kernel (Triton split-KV partials, or the C decode's per-thread buffers);
    the same tensor every step.
    """

    num_actual_tokens: int
    layout: BatchLayout
    slot_mapping: torch.Tensor
    workspace: torch.Tensor | None


class SinkAttentionMetadataBuilder(AttentionMetadataBuilder[SinkAttentionMetadata]):
    """Per-step host work (the batch plan) and scratch, as in vLLM's
    ``triton_attn.py``.

    CUDA graphs: ``UNIFORM_SINGLE_TOKEN_DECODE`` with the Triton kernel. A
    decode-only step launches one decode grid sized by the (padded) request
    count, reads the layout from the runner's persistent tensors, skips
    padding requests (query length 0) and keeps its split-KV partials in the
    builder's workspace, so a captured step replays correctly. Mixed steps are
    not captured: whether the prefill launch runs, and its tile shape, depend
    on ``max_query_len``, a host value fixed at capture. The torch and CPU
    paths read the plan on the host and loop per request: ``NEVER``.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        kernel = choose_kernel(torch.device(current_platform.device_type))
        if kernel == "triton" and current_platform.device_type == "cuda":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

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
        self.kernel = choose_kernel(device)
        model = vllm_config.model_config
        self.workspace = allocate_workspace(
            self.kernel,
            num_heads=model.get_num_attention_heads(vllm_config.parallel_config),
            num_kv_heads=model.get_num_kv_heads(vllm_config.parallel_config),
            head_size=model.get_head_size(),
            device=device,
        )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SinkAttentionMetadata:
        cm = common_attn_metadata
        plan = None
        if self.kernel != "triton":  # host loop per request; CPU tensors here
            plan = plan_batch(cm.query_start_loc_cpu, cm.seq_lens)
        layout = BatchLayout(
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            max_query_len=cm.max_query_len,
            plan=plan,
        )
        return SinkAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            layout=layout,
            slot_mapping=cm.slot_mapping,
            workspace=self.workspace,
        )


def allocate_workspace(
    kernel: str, num_heads: int, num_kv_heads: int, head_size: int, device
) -> torch.Tensor | None:
    """The float32 scratch ``kernel`` needs at most, for any batch, or None."""
    if kernel == "triton":
        from vllm_sink.attention import triton_path

        floats = triton_path.workspace_floats(
            num_heads, num_kv_heads, head_size, torch.device(device)
        )
    elif kernel == "cpu":
        floats = cpu_kernel.scratch_floats(
            num_heads, num_kv_heads, head_size, torch.get_num_threads()
        )
    else:
        return None
    if floats == 0:
        return None
    return torch.empty(floats, dtype=torch.float32, device=device)


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
        vllm_config = get_current_vllm_config()
        cfg = get_sink_config(vllm_config)
        assert cfg is not None
        # A hybrid model's local layer keeps its own window (config.layer_config).
        cfg = layer_config(cfg, vllm_config, sliding_window)
        self.sink_config = cfg
        self.variant = SinkVariant(cfg.sink, cfg.window, cfg.zero_sink)
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
        n = attn_metadata.num_actual_tokens
        inputs = SinkAttentionInputs(
            query=query[:n],
            kv_cache=kv_cache,
            layout=attn_metadata.layout,
            rope=layer.sink_rope,  # type: ignore[attr-defined]
            variant=self.variant,
            scale=self.scale,
        )
        workspace = attn_metadata.workspace
        if self.kernel == "triton":
            from vllm_sink.attention import triton_path

            triton_path.sink_attention_triton(inputs, output[:n], workspace=workspace)
        else:
            torch_path.sink_attention(
                inputs,
                output[:n],
                compiled_decode=self.kernel == "cpu",
                workspace=workspace,
            )
        return output
