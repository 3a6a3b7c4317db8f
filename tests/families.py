"""The family matrix: tiny random checkpoints of each served model family / rotary.

Each entry: family -> (tiny_models arch, config overrides). ``rope_scaling`` is merged
into the rope parameters. Context (max_position_embeddings) is 256 everywhere;
scaled ropes pretend an original context of 64.
"""

from __future__ import annotations

from typing import Any

from vllm_sink.tiny_models import make_tiny_model

ORIGINAL = 64
_SHORT = [1.0 + 0.02 * i for i in range(16)]
_LONG = [1.0 + 0.25 * i for i in range(16)]

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gpt_neox": ("gpt_neox", {}),
    "linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
            }
        },
    ),
    "yarn": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
            }
        },
    ),
    "yarn_partial": (  # YaRN's factor on a quarter of the dims only
        "gpt_neox",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
            }
        },
    ),
    "phi3": (
        "phi3",
        {
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": _SHORT,
                "long_factor": _LONG,
                "original_max_position_embeddings": ORIGINAL,
            }
        },
    ),
    # Hybrid local/global: 16-token local windows (own rope theta), global layers
    # with linear scaling, as Gemma 3's 4B+ checkpoints ship.
    "gemma3": (
        "gemma3_text",
        {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    ),
}


def family_model(family: str) -> str:
    arch, overrides = FAMILIES[family]
    return make_tiny_model(arch, **overrides)
