"""Tiny random RoPE models with an offline byte-level tokenizer, for tests and demos.

``make_tiny_model("llama")`` returns a directory that ``transformers`` (and thus vLLM)
loads like any Hugging Face checkpoint: ``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json``.

Invariants:

- Same ``(arch, seed, overrides)`` -> same directory and bit-identical weights.
- Different configs -> different directories (name = arch + short hash of the config).
- A directory that exists under its final name is complete: it is built in a
  temporary sibling and renamed into place, so concurrent builders never see a
  half-written model.
- Token ids ``0..255`` are the bytes themselves; 256 is BOS, 257 EOS, 258 PAD. The
  tokenizer adds no special tokens, so ``decode(encode(text)) == text`` for any text.
- The lm_head rows of the special tokens are zero, so their logit is exactly 0 while
  byte logits are spread wide: greedy decoding never picks EOS (sampling rarely does).

No vLLM import here: the module must work in processes that only have transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vllm_sink import default_cache_dir

# Bump when the files made for a given config change, so stale caches are not reused.
FORMAT_VERSION = 2

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 259

# Plain "role: content" lines, enough for the OpenAI chat endpoints in server tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

_COMMON: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    # Std of lm_head only (see _init_weights): wide logits make greedy top-1 margins
    # large, so two correct implementations do not flip on a near-tie.
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "architectures": ["LlamaForCausalLM"],
        "head_dim": 32,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
    },
    "gpt_neox": {
        **_COMMON,
        "architectures": ["GPTNeoXForCausalLM"],
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "attention_bias": True,
    },
}
_LLAMA_LIKE = {
    k: v for k, v in DEFAULT_CONFIGS["llama"].items() if k != "architectures"
}
# Families served natively by vLLM, for the family matrix (tests/test_families.py).
DEFAULT_CONFIGS.update(
    mistral={
        **_LLAMA_LIKE,
        "architectures": ["MistralForCausalLM"],
        "sliding_window": None,
    },
    qwen2={  # q/k/v projections with biases
        **_LLAMA_LIKE,
        "architectures": ["Qwen2ForCausalLM"],
        "use_sliding_window": False,
    },
    qwen3={**_LLAMA_LIKE, "architectures": ["Qwen3ForCausalLM"]},  # q/k RMSNorm
    phi3={  # fused qkv_proj and gate_up_proj
        **_LLAMA_LIKE,
        "architectures": ["Phi3ForCausalLM"],
        "original_max_position_embeddings": 64,
        "rotary_pct": 1.0,  # Phi-3's config validation wants it in the rope dict
    },
    # Hybrid local/global (Gemma 3): two 16-token sliding-window layers per global
    # one, each kind with its own rotary table; scale query_pre_attn_scalar**-0.5.
    gemma3_text={
        **_LLAMA_LIKE,
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "sliding_window": 16,
        "rope_theta": 1000000.0,  # the global layers'
        "local_rope_theta": 10000.0,
        "query_pre_attn_scalar": 24,
        "hidden_activation": "gelu_pytorch_tanh",
    },
)


def tiny_config_dict(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    """Config kwargs for ``arch`` with ``overrides`` applied (ValueError if unknown)."""
    if arch not in DEFAULT_CONFIGS:
        raise ValueError(
            f"unknown tiny arch {arch!r}; choose from {sorted(DEFAULT_CONFIGS)}"
        )
    return {**DEFAULT_CONFIGS[arch], **overrides}


def _config_hash(arch: str, seed: int, kwargs: dict[str, Any]) -> str:
    blob = json.dumps(
        {"arch": arch, "seed": seed, "format": FORMAT_VERSION, "config": kwargs},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _build_config(arch: str, kwargs: dict[str, Any]) -> Any:
    """``rope_scaling`` (an override) is merged into the rope parameters."""
    from transformers import AutoConfig

    kwargs = dict(kwargs)
    # transformers 5 keeps theta and partial rotary only inside rope_parameters.
    rope = {"rope_type": "default", "rope_theta": float(kwargs.pop("rope_theta"))}
    if "rotary_pct" in kwargs:
        rope["partial_rotary_factor"] = float(kwargs.pop("rotary_pct"))
    rope.update(kwargs.pop("rope_scaling", None) or {})
    local_theta = kwargs.pop("local_rope_theta", None)
    config = AutoConfig.for_model(arch, **kwargs)
    config.rope_parameters = rope
    if local_theta is not None:  # one table per layer type (Gemma 3)
        local = {"rope_type": "default", "rope_theta": float(local_theta)}
        config.rope_parameters = {"full_attention": rope, "sliding_attention": local}
    config.dtype = torch.float32
    return config


@torch.no_grad()
def _init_weights(model: torch.nn.Module, head_std: float, seed: int) -> None:
    """Deterministic init, independent of transformers' own init code.

    - lm_head ~ N(0, head_std): with the unit-RMS final norm, logits have std
      ``head_std * sqrt(hidden)`` (about 2.3), wide enough that greedy top-1 margins
      dwarf fp32 noise; special-token rows are zero so their logit is exactly 0.
    - other matrices ~ N(0, 1/fan_in): unit-variance activations. Larger weights make
      the network amplify rounding (fp32 vs fp64 logits differ by 3e-5 with std
      2.3/sqrt(fan_in), 5e-6 here), which would eat into the 1e-4 oracle tolerance.
    - embeddings ~ N(0, 1); norm weights ~ 1 + N(0, 0.1); biases ~ N(0, 0.1), so that a
      backend that drops a bias or a norm weight is caught.
    """
    gen = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param is embed:
            param.copy_(noise)
        elif param is head:
            param.copy_(noise * head_std)
        elif param.dim() >= 2:
            param.copy_(noise / param.shape[1] ** 0.5)
        elif name.endswith("bias"):
            param.copy_(noise * 0.1)
        else:
            param.copy_(1.0 + noise * 0.1)
    head[BOS_ID:].zero_()


def _byte_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable char; invert GPT-2's table so id == byte.
    byte_to_char = _gpt2_bytes_to_unicode()
    assert sorted(byte_to_char.values()) == sorted(alphabet)
    return {byte_to_char[b]: b for b in range(256)}


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer() -> Any:
    """Byte-level ``PreTrainedTokenizerFast``: one token per UTF-8 byte, id == byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    assert tok.token_to_id(BOS_TOKEN) == BOS_ID and tok.token_to_id(PAD_TOKEN) == PAD_ID
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=DEFAULT_CONFIGS["llama"]["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write_model(arch: str, kwargs: dict[str, Any], seed: int, out: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = _build_config(arch, kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, float(kwargs["initializer_range"]), seed)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    ).save_pretrained(out)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = int(kwargs["max_position_embeddings"])
    tokenizer.save_pretrained(out)
    # mkdtemp makes the directory private; the cache is meant to be shared read-only.
    out.chmod(0o755)
    for path in out.iterdir():
        path.chmod(0o644)


def make_tiny_model(
    arch: str = "llama",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    **overrides: Any,
) -> str:
    """Return the directory of the tiny ``arch`` model, building it once if missing.

    ``overrides`` replace entries of :data:`DEFAULT_CONFIGS` (e.g.
    ``num_hidden_layers=3``, ``max_position_embeddings=512``); ``seed`` picks the
    weights. Safe to call from several processes at once: the loser of the final rename
    discards its copy.
    """
    kwargs = tiny_config_dict(arch, **overrides)
    if kwargs["vocab_size"] < VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {VOCAB_SIZE} (bytes + specials)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{arch}-{_config_hash(arch, seed, kwargs)}"
    if final.is_dir():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _write_model(arch, kwargs, seed, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process won the race with identical content.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m vllm_sink.tiny_models [llama|gpt_neox]`` prints the path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "arch", nargs="?", default="llama", choices=sorted(DEFAULT_CONFIGS)
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_model(args.arch, cache_dir=args.cache_dir, seed=args.seed))


if __name__ == "__main__":
    main()
