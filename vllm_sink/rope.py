"""Rotary embeddings in sink mode: the model stops rotating, the backend rotates.

After the model is loaded, each rotary module is replaced by an identity, so
queries and keys reach the attention unrotated (keys are cached pre-RoPE), and
every attention layer gets ``layer.sink_rope``: the model's own cos/sin table
(first ``S+W`` rows), its rotary_dim and neox/gptj style.

Invariant the backend relies on (docs/architecture.md §1): every row of
``RopeTable.cos_sin_cache`` has unit magnitude (``cos^2 + sin^2 = 1``), so
rotating a key by its *distance* to the query equals rotating both. Tables
that carry an attention factor ``m`` in every row (YaRN's mscale, LongRoPE's
scaling) are divided by ``m`` here and ``m^2`` travels as
``RopeTable.qk_factor``: the backend multiplies the rotated dims of the query
by it (or the softmax scale, when every dim is rotated), which is exactly what
``m*R q . m*R k`` gives, partial rotary included. A table whose rows do not
share one magnitude is refused at start-up.

Two model families are handled:
- vLLM-native models: a ``rotary_emb`` attribute holding a vLLM rotary module
  next to the ``Attention`` layer(s) it feeds. Its class must be in ``SERVED``
  (proven against the oracle in tests/test_families.py); classes in
  ``REFUSED`` and any class in neither list are refused at start-up.
- The Transformers modeling backend (e.g. GPT-NeoX in vLLM 0.32): one HF rotary
  module computing (cos, sin) for all layers; it is made to return (1, 0).

LongRoPE (Phi-3): vLLM picks the short or the long factor set once, by
``max_model_len``. In sink mode rotary positions stay below ``S+W`` whatever
the stream length, so the set is the one vLLM (and Transformers) use for a
sequence of ``S+W`` tokens: short when ``S+W <= original_max_position_embeddings``,
else long. Below ``S+W`` this can differ from plain vLLM started with a
``--max-model-len`` past the original context (which forces the long set).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

from vllm_sink.attention.inputs import RopeTable
from vllm_sink.config import SinkConfig, SinkConfigError

logger = logging.getLogger("vllm_sink")


_VLLM_ROTARY = "vllm.model_executor.layers.rotary_embedding"

# vLLM 0.32.0's rotary classes (rotary_embedding/*.py), each served or refused;
# tests/test_families.py fails when vLLM ships a class in neither list.
SERVED = {
    "RotaryEmbedding": "plain RoPE (Llama, Mistral, Qwen2, Qwen3, ...)",
    "LinearScalingRotaryEmbedding": "linear position interpolation",
    "Llama3RotaryEmbedding": "Llama-3 frequency scaling",
    "DynamicNTKScalingRotaryEmbedding": "dynamic NTK: vLLM tabulates it once, "
    "and Transformers' table equals it for sequences within the context",
    "YaRNScalingRotaryEmbedding": "YaRN: rows scaled by mscale, normalised",
    "Phi3LongRoPEScaledRotaryEmbedding": "LongRoPE: the factor set for S+W "
    "tokens, rows scaled, normalised",
}
REFUSED = {
    "RotaryEmbeddingBase": "base class without a forward of its own",
    "NTKScalingRotaryEmbedding": "fixed/mixed NTK: not yet proven against the oracle",
    "DynamicNTKAlphaRotaryEmbedding": "NTK alpha (Hunyuan): not yet proven "
    "against the oracle",
    "FourierRotaryEmbedding": "Fourier RoPE mixes frequencies per head: not a "
    "cos/sin table",
    "Gemma4RotaryEmbedding": "proportional RoPE (Gemma 4, hybrid local/global "
    "layers): not yet proven against the oracle",
    "DeepseekScalingRotaryEmbedding": "DeepSeek-YaRN rotates in its own forward "
    "(MLA models, refused anyway)",
    "DeepseekV4ScalingRotaryEmbedding": "DeepSeek-V4 YaRN rotates in its own forward",
    "DualChunkRotaryEmbedding": "dual-chunk attention: positions depend on chunks",
    "MRotaryEmbedding": "multimodal rotary (mrope): 3-D positions",
    "MRotaryEmbeddingInterleaved": "multimodal rotary (mrope): 3-D positions",
    "BailingMRotaryEmbedding": "multimodal rotary (mrope): 3-D positions",
    "Ernie4_5_VLRotaryEmbedding": "multimodal rotary (mrope): 3-D positions",
    "Llama4VisionRotaryEmbedding": "2-D vision rotary",
}


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


def _is_vllm_rotary(module: nn.Module) -> bool:
    cls = type(module)
    return isinstance(module, RotaryEmbeddingBase) or (
        cls.__module__.startswith("vllm.") and "RotaryEmbedding" in cls.__name__
    )


def _refuse(model: str, what: str) -> SinkConfigError:
    return SinkConfigError(
        f"Sink mode cannot serve {model}: {what}. Fix: drop --attention-sink/"
        "--window for this model (README, 'Supported models')."
    )


def _vllm_rope_table(rot: nn.Module, cfg: SinkConfig, model: str) -> RopeTable:
    """The unit table of a served vLLM rotary module; refuses any other."""
    cls = type(rot)
    name = cls.__name__
    if name not in SERVED or not cls.__module__.startswith(_VLLM_ROTARY):
        why = REFUSED.get(name, "not proven against the reference")
        raise _refuse(model, f"its rotary embedding {name} ({why})")
    if name == "Phi3LongRoPEScaledRotaryEmbedding":
        k = rot.original_max_position_embeddings
        cache = rot.long_short_cos_sin_cache
        cache = cache[:k] if cfg.span <= k else cache[k:]
        return unit_table(cache[: cfg.span], rot.rotary_dim, True, model)
    return unit_table(
        rot.cos_sin_cache[: cfg.span], rot.rotary_dim, rot.is_neox_style, model
    )


def unit_table(
    cache: torch.Tensor, rotary_dim: int, is_neox_style: bool, model: str
) -> RopeTable:
    """A table with unit rows; a common row magnitude ``m`` becomes
    ``qk_factor = m^2`` (module docstring). Refuses rows of unequal magnitude."""
    cos, sin = cache.float().chunk(2, dim=-1)
    magnitude = (cos.square() + sin.square()).sqrt()
    m = float(magnitude.mean())
    tol = 16 * torch.finfo(cache.dtype).eps
    if float((magnitude - m).abs().max()) > tol * m:
        raise _refuse(model, "its rotary table rows do not share one magnitude")
    if abs(m - 1.0) <= 1e-6:  # unit already (fp32 tables of plain RoPE)
        return RopeTable(cache, rotary_dim, is_neox_style)
    return RopeTable(cache.float() / m, rotary_dim, is_neox_style, m * m)


def _attention_children(module: nn.Module) -> list[Attention]:
    return [m for m in module.children() if isinstance(m, Attention)]


def _hf_rope_table(rotary: nn.Module, length: int, model: str) -> RopeTable:
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
    return unit_table(table, 2 * half, True, model)


def _is_hf_rotary(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding") and not _is_vllm_rotary(
        module
    )


def prepare_model(model: nn.Module, cfg: SinkConfig, name: str = "this model") -> int:
    """Move rotary from the model into the attention layers; return layer count.

    Raises ``SinkConfigError`` for a model whose rotary cannot be handled.
    """
    tables: dict[int, RopeTable] = {}
    by_rotary: dict[int, RopeTable] = {}  # vLLM shares one rotary module per config
    for module in list(model.modules()):
        rot = getattr(module, "rotary_emb", None)
        if rot is not None and _is_vllm_rotary(rot):
            if id(rot) not in by_rotary:
                by_rotary[id(rot)] = _vllm_rope_table(rot, cfg, name)
            table = by_rotary[id(rot)]
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
        table = _hf_rope_table(child, cfg.span, name)
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
                prepare_model(self.get_model(), cfg, self.model_config.model)
            return result
