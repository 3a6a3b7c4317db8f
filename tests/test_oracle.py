"""Tests of the StreamingLLM oracle (tests/oracle.py) and of the tiny-model factory.

The oracle is the yardstick for the plugin, so it is checked against two things it does
not share code with: HF's own dense forward (streams shorter than S+W, where sink
attention IS dense attention) and an explicit mask-and-positions recomputation of one
layer's attention that uses HF's rotary module and ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from families import FAMILIES, family_model  # noqa: E402
from oracle import SinkOracle, visible_set  # noqa: E402

from vllm_sink.tiny_models import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    make_tiny_model,
)
from vllm_sink.tiny_models import main as tiny_models_main  # noqa: E402

ARCHS = ("llama", "gpt_neox")
ATOL_FP32 = 1e-5


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Batch-1 steps on tiny matrices are ~40x slower multi-threaded on 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private model cache, so these tests never depend on a shared one."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def model_dirs(cache_dir: Path) -> dict[str, str]:
    return {arch: make_tiny_model(arch, cache_dir=cache_dir) for arch in ARCHS}


@pytest.fixture(scope="module")
def models(model_dirs: dict[str, str]) -> dict[str, torch.nn.Module]:
    return {
        arch: AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        for arch, path in model_dirs.items()
    }


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(
        0, 256, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


# ----------------------------------------------------------------------------- factory


def test_factory_caches_and_is_keyed_by_config(cache_dir: Path) -> None:
    first = make_tiny_model("llama", cache_dir=cache_dir)
    start = time.perf_counter()
    again = make_tiny_model("llama", cache_dir=cache_dir)
    assert again == first
    assert time.perf_counter() - start < 0.1
    other = make_tiny_model("llama", cache_dir=cache_dir, num_hidden_layers=1)
    assert other != first and Path(other).name.startswith("llama-")
    assert (
        json.loads((Path(other) / "config.json").read_text())["num_hidden_layers"] == 1
    )
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")], (
        "temp dir left"
    )


def test_factory_concurrent_builders_agree(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda _: make_tiny_model(cache_dir=tmp_path), range(3)))
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [Path(paths[0]).name]
    assert (Path(paths[0]) / "model.safetensors").is_file()


def test_factory_is_deterministic(cache_dir: Path, tmp_path: Path) -> None:
    ours = load_file(
        Path(make_tiny_model("gpt_neox", cache_dir=cache_dir)) / "model.safetensors"
    )
    fresh = load_file(
        Path(make_tiny_model("gpt_neox", cache_dir=tmp_path)) / "model.safetensors"
    )
    assert ours.keys() == fresh.keys()
    assert all(torch.equal(ours[name], fresh[name]) for name in ours)


@pytest.mark.parametrize("arch", ARCHS)
def test_factory_config(model_dirs: dict[str, str], arch: str) -> None:
    config = json.loads((Path(model_dirs[arch]) / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4 and config["vocab_size"] == 259
    assert config["max_position_embeddings"] == 256
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False
    if arch == "llama":
        assert config["num_key_value_heads"] == 2 and config["head_dim"] == 32
    else:
        assert config["rope_parameters"]["partial_rotary_factor"] == 0.25
        assert config["use_parallel_residual"] is True


def test_tokenizer_round_trips_bytes(model_dirs: dict[str, str]) -> None:
    tok = AutoTokenizer.from_pretrained(model_dirs["llama"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    for text in [
        "",
        "hello world",
        "  tabs\tand\nnewlines  ",
        "héllo wörld 日本語 🎉",
        "\x00\x7f",
    ]:
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode([BOS_ID, 104, 105, EOS_ID], skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("arch", ARCHS)
def test_model_generates_varied_tokens(
    models: dict[str, torch.nn.Module], arch: str
) -> None:
    prompt = torch.tensor([list(b"Once upon a time")])
    with torch.no_grad():
        out = models[arch].generate(
            prompt, max_new_tokens=100, do_sample=False, eos_token_id=None
        )
    generated = out[0, prompt.shape[1] :].tolist()
    assert len(set(generated)) >= 10
    assert not {BOS_ID, EOS_ID, PAD_ID} & set(generated)


def test_cli_prints_path(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_models_main(["llama", "--cache-dir", str(cache_dir)])
    assert capsys.readouterr().out.strip() == make_tiny_model(
        "llama", cache_dir=cache_dir
    )


# ----------------------------------------------------------- oracle vs dense HF forward


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("sink", "window", "length"), [(None, None, 64), (4, 60, 64), (0, 48, 48)]
)
def test_short_stream_equals_dense_hf(
    models: dict[str, torch.nn.Module],
    arch: str,
    sink: int | None,
    window: int | None,
    length: int,
) -> None:
    """For t < S+W the sink rule is plain causal attention at positions 0..t."""
    ids = random_ids(length, seed=1)
    with torch.no_grad():
        expected = models[arch](torch.tensor([ids])).logits[0]
    got = SinkOracle(models[arch], sink, window).logits(ids)
    torch.testing.assert_close(got, expected, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(("window", "length"), [(27, 30), (100, 103)])
def test_family_short_stream_equals_dense_hf(
    family: str, window: int, length: int
) -> None:
    """Each family of the matrix (tests/families.py), fp64: the oracle's rope
    variants, fused qkv, biases and q/k norms equal HF's dense forward for t < S+W.
    S+W = 31 and 104 sit on both sides of the scaled ropes' original context (64)."""
    model = AutoModelForCausalLM.from_pretrained(
        family_model(family), dtype=torch.float64
    ).eval()
    ids = random_ids(length, seed=2)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    got = SinkOracle(model, 4, window, dtype=torch.float64).logits(ids)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


# -------------------------------------------------- oracle vs explicit masked attention


def explicit_mask(length: int, sink: int, window: int) -> torch.Tensor:
    """``[T, T]`` bool: t sees key j iff j <= t and (j is a sink or j in the window)."""
    t = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= t) & ((j < sink) | (j > t - window))


def hf_rotary(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """HF's rotary-embedding module and ``apply_rotary_pos_emb`` for the model."""
    if model.config.model_type == "llama":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return model.model.rotary_emb, apply_rotary_pos_emb
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    return model.gpt_neox.rotary_emb, apply_rotary_pos_emb


def hf_rotate(
    model: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x`` ``[n, heads, d]`` row i at ``positions[i]`` with HF's own code."""
    rotary, apply = hf_rotary(model)
    cos, sin = rotary(x, positions[None])
    xb = x.transpose(0, 1)[None]  # [1, heads, n, d]
    rotated, _ = apply(xb, xb, cos, sin)
    return rotated[0].transpose(0, 1)


def explicit_attention(
    model: torch.nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per (query, key) positions = ranks inside the visible set; masked softmax."""
    length, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    ranks = mask.long().cumsum(dim=1) - 1  # rank of key j among the keys t sees
    q_pos = mask.sum(dim=1) - 1
    q_rot = hf_rotate(model, q, q_pos)
    k_rot = hf_rotate(
        model,
        k[None].expand(length, -1, -1, -1).reshape(length * length, -1, head_dim),
        ranks.clamp(min=0).reshape(-1),
    ).reshape(length, length, -1, head_dim)  # [query t, key j, kv head, d]
    k_rot = k_rot.repeat_interleave(group, dim=2)
    scores = torch.einsum("thd,tjhd->thj", q_rot, k_rot) / head_dim**0.5
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum(
        "thj,jhd->thd", scores.softmax(dim=-1), v.repeat_interleave(group, dim=1)
    )


def layer0_qkv(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Pre-RoPE q, k, v of layer 0 straight from the HF modules (no stream)."""
    tokens = torch.tensor(ids)
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    with torch.no_grad():
        if model.config.model_type == "llama":
            block = model.model.layers[0]
            h = block.input_layernorm(model.model.embed_tokens(tokens))
            attn = block.self_attn
            projections = (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
            return tuple(p.view(len(ids), -1, head_dim) for p in projections)
        block = model.gpt_neox.layers[0]
        h = block.input_layernorm(model.gpt_neox.embed_in(tokens))
        qkv = block.attention.query_key_value(h).view(len(ids), heads, 3 * head_dim)
        return qkv.chunk(3, dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("sink", "window"), [(4, 16), (0, 16), (3, 1)])
@pytest.mark.parametrize("layer", [0, 1])
def test_long_stream_attention_matches_explicit_mask(
    models: dict[str, torch.nn.Module], arch: str, sink: int, window: int, layer: int
) -> None:
    model = models[arch]
    ids = random_ids(80, seed=3)
    trace = SinkOracle(model, sink, window).layer_trace(ids, layer)
    if layer == 0:
        for ours, direct in zip(
            (trace.q, trace.k, trace.v), layer0_qkv(model, ids), strict=True
        ):
            torch.testing.assert_close(ours, direct, atol=ATOL_FP32, rtol=0)
    mask = explicit_mask(len(ids), sink, window)
    # The query position (rank of t in its own visible set) is min(t, S+W-1).
    q_pos = mask.sum(dim=1) - 1
    assert (
        q_pos.tolist() == torch.arange(len(ids)).clamp(max=sink + window - 1).tolist()
    )
    with torch.no_grad():
        expected = explicit_attention(model, trace.q, trace.k, trace.v, mask)
    torch.testing.assert_close(trace.attn, expected, atol=ATOL_FP32, rtol=0)


def test_visible_set_matches_design_examples() -> None:
    assert visible_set(2, sink=4, window=3) == [0, 1, 2]
    assert visible_set(10, sink=4, window=3) == [0, 1, 2, 3, 8, 9, 10]
    assert visible_set(5, sink=4, window=3) == [0, 1, 2, 3, 4, 5]
    assert visible_set(10, sink=0, window=3) == [8, 9, 10]
    for t in range(40):
        rows = explicit_mask(40, 4, 7)[t]
        assert visible_set(t, 4, 7) == rows.nonzero().flatten().tolist()


# --------------------------------------------------------------- API-level consistency


def test_api_is_self_consistent_past_the_context(
    models: dict[str, torch.nn.Module],
) -> None:
    """logits, logprobs, prompt_logprobs and generate agree past max positions."""
    oracle = SinkOracle(models["llama"], 4, 16)
    prompt = random_ids(12, seed=4)
    # 312 tokens: past max_position_embeddings (256), far past S+W.
    tokens, token_logprobs = oracle.generate(prompt, 300)
    stream = prompt + tokens
    logprobs = oracle.logprobs(stream)
    assert logprobs.shape == (len(stream), 259) and torch.isfinite(logprobs).all()
    chosen = logprobs[len(prompt) - 1 : -1]
    assert tokens == chosen.argmax(dim=-1).tolist()
    torch.testing.assert_close(
        torch.tensor(token_logprobs),
        chosen.gather(1, torch.tensor(tokens)[:, None])[:, 0],
    )
    prompt_lp = oracle.prompt_logprobs(stream)
    assert len(prompt_lp) == len(stream) - 1
    torch.testing.assert_close(
        torch.tensor(prompt_lp[len(prompt) - 1 :]), torch.tensor(token_logprobs)
    )


def test_sinks_and_window_change_long_streams(
    models: dict[str, torch.nn.Module],
) -> None:
    """Past S+W the three regimes differ (masks are applied); before it they agree."""
    ids = random_ids(60, seed=5)
    model = models["llama"]
    dense = SinkOracle(model, None, None).logits(ids)
    sink = SinkOracle(model, 4, 16).logits(ids)
    window_only = SinkOracle(model, None, 20).logits(ids)
    torch.testing.assert_close(sink[:20], dense[:20], atol=ATOL_FP32, rtol=0)
    assert (sink[30:] - dense[30:]).abs().mean() > 0.1
    assert (sink[30:] - window_only[30:]).abs().mean() > 0.1
