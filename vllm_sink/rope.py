"""Rotary embeddings in sink mode: the model stops rotating, the backend rotates.

After the model is loaded, each rotary module is replaced by an identity, so
queries and keys reach the attention unrotated (keys are cached pre-RoPE), and
every attention layer gets ``layer.sink_rope``: the model's own cos/sin table
(rope scaling variants come for free), its rotary_dim and neox/gptj style.

Two model families are handled:
- vLLM-native models: a ``rotary_emb`` attribute holding a vLLM rotary module
  next to the ``Attention`` layer(s) it feeds.
- The Transformers modeling backend (e.g. GPT-NeoX in vLLM 0.32): one HF rotary
  module computing (cos, sin) for all layers; it is made to return (1, 0).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.rotary_embedding.base import (
    RotaryEmbedding,
    RotaryEmbeddingBase,
)

from vllm_sink.config import SinkConfig, SinkConfigError

logger = logging.getLogger("vllm_sink")


@dataclass
class RopeTable:
    """What the backend needs to rotate at read.

    ``cos_sin_cache[p] = cat(cos(p * f), sin(p * f))`` for p in [0, len), each
    half ``rotary_dim / 2`` wide, in vLLM's layout. Dims past ``rotary_dim``
    are not rotated (partial rotary).
    """

    cos_sin_cache: torch.Tensor
    rotary_dim: int
    is_neox_style: bool


class SkipRotary(nn.Module):
    """Stands in for a vLLM rotary module: returns query and key unrotated."""

    def __init__(self, original: RotaryEmbeddingBase) -> None:
        super().__init__()
        self.original = original

    def forward(self, positions, query, key=None, *args, **kwargs):
        return query, key


class UnitRotary(nn.Module):
    """Stands in for a Transformers rotary module: cos = 1, sin = 0."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        cos, sin = self.original(x, position_ids, *args, **kwargs)
        return torch.ones_like(cos), torch.zeros_like(sin)


def _is_supported_vllm_rotary(rot: RotaryEmbeddingBase) -> bool:
    cls = type(rot)
    return (
        cls.forward is RotaryEmbeddingBase.forward
        and cls.forward_native is RotaryEmbedding.forward_native
        and isinstance(getattr(rot, "cos_sin_cache", None), torch.Tensor)
    )


def _attention_children(module: nn.Module) -> list[Attention]:
    return [m for m in module.children() if isinstance(m, Attention)]


def _hf_rope_table(rotary: nn.Module, length: int) -> RopeTable:
    """Tabulate a Transformers rotary module (rotate_half, i.e. neox style)."""
    param = next(rotary.buffers(), None)
    device = param.device if param is not None else torch.device("cpu")
    position_ids = torch.arange(length, device=device)[None, :]
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = rotary(probe, position_ids)
    half = cos.shape[-1] // 2
    if not torch.allclose(cos[0, :, :half], cos[0, :, half:]):
        raise SinkConfigError(
            f"{type(rotary).__name__} is not a rotate-half (neox) rotary; sink "
            "mode cannot rotate its keys at read. Fix: drop --attention-sink/"
            "--window for this model."
        )
    table = torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1).float()
    return RopeTable(table, rotary_dim=2 * half, is_neox_style=True)


def _is_hf_rotary(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding") and not isinstance(
        module, RotaryEmbeddingBase
    )


def prepare_model(model: nn.Module, cfg: SinkConfig) -> int:
    """Move rotary from the model into the attention layers; return layer count.

    Raises ``SinkConfigError`` for a model whose rotary cannot be handled.
    """
    tables: dict[int, RopeTable] = {}
    for module in list(model.modules()):
        rot = getattr(module, "rotary_emb", None)
        if isinstance(rot, RotaryEmbeddingBase):
            if not _is_supported_vllm_rotary(rot):
                raise SinkConfigError(
                    f"Sink mode does not support the rotary embedding "
                    f"{type(rot).__name__}. Fix: drop --attention-sink/--window "
                    "for this model."
                )
            table = RopeTable(rot.cos_sin_cache, rot.rotary_dim, rot.is_neox_style)
            for attn in _attention_children(module):
                tables[id(attn)] = table
            module.rotary_emb = SkipRotary(rot)

    hf_rotaries = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _is_hf_rotary(child)
    ]
    if hf_rotaries:
        if len({id(child) for _, _, child in hf_rotaries}) > 1:
            raise SinkConfigError(
                "This model has several rotary embeddings (per-layer rope types); "
                "sink mode supports one. Fix: drop --attention-sink/--window."
            )
        parent, name, child = hf_rotaries[0]
        table = _hf_rope_table(child, cfg.span)
        setattr(parent, name, UnitRotary(child))
        for attn in model.modules():
            if isinstance(attn, Attention) and id(attn) not in tables:
                tables[id(attn)] = table

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    missing = [a.layer_name for a in layers if id(a) not in tables]
    if not layers or missing:
        raise SinkConfigError(
            "Sink mode needs rotary position embeddings on every attention layer; "
            f"found none for {missing or 'the model'}. Models with absolute or "
            "ALiBi positions are not supported. Fix: drop --attention-sink/--window."
        )
    for attn in layers:
        attn.sink_rope = tables[id(attn)]
    return len(layers)


def install() -> None:
    """Prepare the model right after each model runner loads it."""
    from vllm.config import VllmConfig

    from vllm_sink.config import get_sink_config
    from vllm_sink.patching import ReachError, find_attr, wrap_method

    # Found by feature: the V1 runners (vLLM 0.32, 0.33; gone in 0.34) and the V2
    # runners (0.32+; in 0.34 the x86 CPUModelRunner is a V2 GPUModelRunner, the
    # standalone CPU runner serves other CPUs). Sink mode is tested on V1 only:
    # where V1 exists, use_v2_model_runner is False in sink mode.
    reason = "sink mode's rotary skip runs after a model runner loads the model"
    found = [
        find_attr(module, name, reason=reason, required=False)
        for module, name in (
            ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
            ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
            ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
            ("vllm.v1.worker.cpu.standalone_model_runner", "StandaloneCPUModelRunner"),
        )
    ]
    runners = [r for r in found if r is not None and "load_model" in vars(r)]
    if found[0] is None or found[1] is None:
        message = (
            "vllm-sink: this vLLM has no V1 model runner (vllm.v1.worker."
            "gpu_model_runner / cpu_model_runner, removed in vLLM 0.34); the plugin "
            "is tested on the V1 runners only (see the README's supported versions)."
        )
        if os.environ.get("VLLM_SINK_ALLOW_ANY_VLLM", "") != "1":
            raise ReachError(message)
        logger.warning("%s Going on with the V2 runners (untested).", message)

    if hasattr(VllmConfig, "use_v2_model_runner"):  # vLLM < 0.34

        @wrap_method(
            VllmConfig,
            "use_v2_model_runner",
            reason="sink mode runs on the V1 model runner (tested there)",
            diff="0004-rope-skip-in-sink-mode.diff",
            kind="property",
        )
        def use_v2_model_runner(original, self):
            if get_sink_config(self) is not None:
                return False
            return original(self)

    for runner in runners:

        @wrap_method(
            runner,
            "load_model",
            reason="skip the model's rotary and hand its table to the backend",
            diff="0004-rope-skip-in-sink-mode.diff",
        )
        def load_model(original, self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            cfg = get_sink_config(self.vllm_config)
            if cfg is not None:
                prepare_model(self.get_model(), cfg)
            return result
