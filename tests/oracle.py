"""Independent StreamingLLM reference (docs/architecture.md §1).

Written with transformers + torch only, never vLLM. The oracle decodes one token at a
time. Per layer it keeps a cache of PRE-RoPE keys and values: the first ``S`` tokens
(sinks) and the last ``W`` tokens (window, current one included). Every step it rotates
the cached keys at read time, at their rank inside the visible set
``V(t) = {0 .. min(S, t+1)-1} | {max(S, t-W+1) .. t}``:

- sink ``i`` at position ``i``;
- window key ``j`` at ``S + (j - max(S, t-W+1))``;
- the query at ``|V(t)| - 1 = min(t, S+W-1)``.

Only the HF model's weights and leaf modules are used (embedding, norms, linear
projections, MLP, lm_head); attention, GQA, rotary tables and rotation are written here,
so nothing depends on HF's attention or rotary code. ``window=None`` means dense causal
attention (positions ``0..t``), which equals HF's own forward.

Hybrid local/global models (Gemma 3: ``layer_types`` mixing ``sliding_attention`` and
``full_attention``): global layers follow the rule above; a local layer keeps its own
``sliding_window`` ``w`` and no sinks, ``V(t) = {max(0, t-w+1) .. t}`` at ranks
``0 .. |V(t)|-1``, with its own rotary table (``rope_parameters[layer_type]``), whatever
``sink``/``window`` are (dense included: that is the model's own attention).

Numerics: projections, norms and MLP run in ``dtype``; rotation, scores, softmax and
the weighted sum of values run in ``promote(dtype, fp32)`` (fp32 for half types) and
are cast back to ``dtype``. cos/sin are computed in fp32 like HF does. Logits come back
fp32 (fp64 for an fp64 oracle).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# attend(q [n_heads, d], k [n_kv, d], v [n_kv, d]) -> [n_heads, d]
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "gpt_neox", "gemma3_text")
LOCAL = "sliding_attention"  # a hybrid model's local layers (layer_types)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary frequencies and attention factor, computed here from the HF config.

    ``attention_factor`` multiplies cos and sin (YaRN's mscale, LongRoPE's scaling), so
    it enters q.k squared, as in HF. Neox / rotate_half style only.
    """

    inv_freq: Tensor  # [rotary_dim / 2], fp32
    rotary_dim: int
    attention_factor: float = 1.0


def rope_spec(
    config: object,
    head_dim: int,
    span: int | None = None,
    layer_type: str = "full_attention",
) -> RopeSpec:
    """RoPE of a HF config: default, linear, dynamic, llama3, yarn or longrope.

    ``span``: the longest sequence the rotary sees (``S+W``; None = the model's
    context). Dynamic NTK and LongRoPE depend on it: within the original context
    dynamic NTK is plain RoPE, and LongRoPE uses its short factors. Parameters kept
    per layer type (Gemma 3) are those of ``layer_type``.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    fraction = params.get(
        "partial_rotary_factor",
        getattr(config, "partial_rotary_factor", getattr(config, "rotary_pct", 1.0)),
    )
    dim = int(head_dim * fraction)
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    max_pos = config.max_position_embeddings
    span = max_pos if span is None else span
    if rope_type == "default":
        return RopeSpec(plain, dim)
    if rope_type == "linear":
        return RopeSpec(plain / params["factor"], dim)
    if rope_type == "dynamic":
        if span > params.get("original_max_position_embeddings", max_pos):
            raise NotImplementedError("dynamic NTK past the original context")
        return RopeSpec(plain, dim)
    if rope_type == "llama3":
        return RopeSpec(_llama3(plain, params), dim)
    if rope_type == "yarn":
        return _yarn(plain, params, theta, dim)
    if rope_type == "longrope":
        return _longrope(plain, params, max_pos, span, dim)
    raise NotImplementedError(f"oracle does not support rope_type {rope_type!r}")


def _llama3(inv_freq: Tensor, p: dict) -> Tensor:
    """Llama-3.1: long wavelengths divided by ``factor``, a smooth ramp between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _yarn(inv_freq: Tensor, p: dict, theta: float, dim: int) -> RopeSpec:
    """YaRN (Peng et al. 2023): ramp between interpolated and original frequencies."""
    factor, old = p["factor"], p["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(p.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(p.get("beta_slow") or 1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(
        0, 1
    )
    mixed = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention = p.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    return RopeSpec(mixed, dim, attention)


def _longrope(inv_freq: Tensor, p: dict, max_pos: int, span: int, dim: int) -> RopeSpec:
    """LongRoPE (Phi-3): per-frequency factors, the short set within the context."""
    old = p["original_max_position_embeddings"]
    factors = p["short_factor"] if span <= old else p["long_factor"]
    scale = max_pos / old
    attention = math.sqrt(1 + math.log(scale) / math.log(old)) if scale > 1 else 1.0
    return RopeSpec(
        inv_freq / torch.tensor(factors, dtype=torch.float32), dim, attention
    )


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Neox-style RoPE on the first ``cos.shape[-1]`` dims of ``x``; the rest pass.

    ``cos``/``sin`` are ``[n, rotary_dim]`` (halves duplicated) and broadcast against
    the last two dims of ``x`` (``[..., n, head_dim]``).
    """
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


class _Rotary:
    """The fp32 cos/sin rows of one ``RopeSpec``, tabulated on demand."""

    def __init__(self, rope: RopeSpec) -> None:
        self.rope = rope
        self._cos = self._sin = torch.empty(0, rope.rotary_dim)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos``/``sin`` ``[n, rotary_dim]`` for integer ``positions [n]``."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0]:
            size = max(needed, 2 * self._cos.shape[0], 64)
            freqs = (
                torch.arange(size, dtype=torch.float32)[:, None]
                * self.rope.inv_freq[None, :]
            )
            emb = torch.cat((freqs, freqs), dim=-1)
            factor = self.rope.attention_factor
            self._cos, self._sin = emb.cos() * factor, emb.sin() * factor
        return self._cos[positions], self._sin[positions]


@dataclass(frozen=True)
class LayerRule:
    """One layer's visible set (``sink`` first tokens + last ``window``, None =
    dense) and its rotary table."""

    sink: int
    window: int | None
    rotary: _Rotary


class _Arch:
    """Per-architecture wiring of an HF causal LM into embed / layer / head steps."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def layer_types(self) -> list[str]:
        return ["full_attention"] * self.n_layers

    def embed(self, token: int) -> Tensor:
        raise NotImplementedError

    def layer(self, index: int, x: Tensor, attend: Attend) -> Tensor:
        raise NotImplementedError

    def head(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class _Llama(_Arch):
    """Pre-norm, sequential residual, GQA; q/k/v projections with or without biases
    (Qwen2), fused into ``qkv_proj`` (Phi-3), per-head q/k RMSNorm before rotary
    (Qwen3)."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.inner = model.model
        self.lm_head = model.get_output_embeddings()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = (
            getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        )
        self.n_layers = cfg.num_hidden_layers

    def embed(self, token: int) -> Tensor:
        return self.inner.embed_tokens.weight[token]

    def layer(self, index: int, x: Tensor, attend: Attend) -> Tensor:
        block = self.inner.layers[index]
        attn = block.self_attn
        q, k, v = self._qkv(attn, block.input_layernorm(x))
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        x = x + attn.o_proj(attend(q, k, v).reshape(-1))
        return x + block.mlp(block.post_attention_layernorm(x))

    def _qkv(self, attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if hasattr(attn, "qkv_proj"):
            sizes = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
            q, k, v = attn.qkv_proj(h).split([n * self.head_dim for n in sizes])
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        return (
            q.view(self.n_heads, self.head_dim),
            k.view(self.n_kv_heads, self.head_dim),
            v.view(self.n_kv_heads, self.head_dim),
        )

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.inner.norm(x))


class _GPTNeoX(_Arch):
    """Fused query_key_value, per head [q | k | v]; parallel or sequential residual."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.inner = model.gpt_neox
        self.lm_head = model.get_output_embeddings()
        self.n_heads = self.n_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.n_heads
        self.n_layers = cfg.num_hidden_layers
        self.parallel = bool(cfg.use_parallel_residual)

    def embed(self, token: int) -> Tensor:
        return self.inner.embed_in.weight[token]

    def layer(self, index: int, x: Tensor, attend: Attend) -> Tensor:
        block = self.inner.layers[index]
        attn = block.attention
        qkv = attn.query_key_value(block.input_layernorm(x)).view(
            self.n_heads, 3 * self.head_dim
        )
        q, k, v = qkv.chunk(3, dim=-1)
        attn_out = attn.dense(attend(q, k, v).reshape(-1))
        if self.parallel:
            return x + attn_out + block.mlp(block.post_attention_layernorm(x))
        x = x + attn_out
        return x + block.mlp(block.post_attention_layernorm(x))

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.inner.final_layer_norm(x))


class _Gemma3(_Llama):
    """Gemma 3 text: embeddings scaled by sqrt(hidden), q/k RMSNorm, sandwich norms
    around attention and MLP, scale ``query_pre_attn_scalar**-0.5``, local layers
    with their own window and rotary table (``layer_types``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        self.query_pre_attn_scalar = cfg.query_pre_attn_scalar
        self.types = list(cfg.layer_types)
        self.local_window = cfg.sliding_window
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.normalizer = cfg.hidden_size**0.5

    @property
    def scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def layer_types(self) -> list[str]:
        return self.types

    def embed(self, token: int) -> Tensor:
        row = self.inner.embed_tokens.weight[token]
        return row * torch.tensor(self.normalizer, dtype=row.dtype)

    def layer(self, index: int, x: Tensor, attend: Attend) -> Tensor:
        block = self.inner.layers[index]
        attn = block.self_attn
        q, k, v = self._qkv(attn, block.input_layernorm(x))
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = attn.o_proj(attend(q, k, v).reshape(-1))
        x = x + block.post_attention_layernorm(out)
        mlp = block.mlp(block.pre_feedforward_layernorm(x))
        return x + block.post_feedforward_layernorm(mlp)

    def head(self, x: Tensor) -> Tensor:
        logits = self.lm_head(self.inner.norm(x))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _wrap(model: nn.Module) -> _Arch:
    model_type = model.config.model_type
    if model_type in LLAMA_LIKE:
        return _Llama(model)
    if model_type == "gpt_neox":
        return _GPTNeoX(model)
    if model_type == "gemma3_text":
        return _Gemma3(model)
    raise NotImplementedError(
        f"oracle supports {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
    )


@dataclass
class LayerTrace:
    """What one layer saw and produced for each token of a stream (row t = token t).

    ``q``: ``[T, n_heads, head_dim]``, ``k``/``v``: ``[T, n_kv_heads, head_dim]``, all
    pre-RoPE; ``attn``: ``[T, n_heads, head_dim]``, the attention output before the
    output projection. All in the oracle's ``compute_dtype`` (fp32 unless fp64).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor


class _LayerCache:
    """Pre-RoPE K/V of the sinks (first ``S`` tokens) and of the last ``W`` tokens.

    Invariant after ``append`` for token ``t``: the sink part holds tokens
    ``0 .. min(S, t+1)-1`` and the window part ``max(S, t-W+1) .. t``: exactly V(t).
    """

    def __init__(
        self,
        sink: int,
        window: int | None,
        n_kv: int,
        head_dim: int,
        dtype: torch.dtype,
    ):
        self.sink, self.window = sink, window
        empty = torch.empty(n_kv, 0, head_dim, dtype=dtype)
        self.sink_k, self.sink_v = empty, empty
        self.win_k, self.win_v = empty, empty

    def append(self, t: int, k: Tensor, v: Tensor) -> None:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
        if t < self.sink:
            self.sink_k = torch.cat((self.sink_k, k), dim=1)
            self.sink_v = torch.cat((self.sink_v, v), dim=1)
            return
        self.win_k = torch.cat((self.win_k, k), dim=1)
        self.win_v = torch.cat((self.win_v, v), dim=1)
        if self.window is not None and self.win_k.shape[1] > self.window:
            self.win_k = self.win_k[:, -self.window :]
            self.win_v = self.win_v[:, -self.window :]

    def visible(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values ``[n_kv, n, head_dim]`` and their rotary positions ``[n]``."""
        n_sink, n_win = self.sink_k.shape[1], self.win_k.shape[1]
        positions = torch.cat((torch.arange(n_sink), self.sink + torch.arange(n_win)))
        keys = torch.cat((self.sink_k, self.win_k), dim=1)
        values = torch.cat((self.sink_v, self.win_v), dim=1)
        return keys, values, positions


class SinkStream:
    """An open stream: feed tokens one by one, get next-token logits after each."""

    def __init__(self, oracle: SinkOracle) -> None:
        self._oracle = oracle
        arch = oracle.arch
        self._caches = [
            _LayerCache(
                rule.sink, rule.window, arch.n_kv_heads, arch.head_dim, oracle.dtype
            )
            for rule in oracle.rules
        ]
        self.length = 0
        self.trace_layer: int | None = None
        self.trace: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    @torch.inference_mode()
    def feed(self, token: int) -> Tensor:
        """Process token at index ``self.length``; return its next-token logits.

        Logits are fp32 (fp64 when the oracle's dtype is fp64), shape ``[vocab]``.
        """
        arch = self._oracle.arch
        with _torch_threads(self._oracle.num_threads):
            x = arch.embed(int(token))
            for index in range(arch.n_layers):
                x = arch.layer(index, x, self._attend_fn(index))
            logits = arch.head(x).to(self._oracle.compute_dtype)
        self.length += 1
        return logits

    def _attend_fn(self, index: int) -> Attend:
        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cache = self._caches[index]
            cache.append(self.length, k, v)
            keys, values, key_pos = cache.visible()
            out = self._oracle.attend(
                q,
                keys,
                values,
                key_pos,
                int(key_pos.numel()) - 1,
                self._oracle.rules[index].rotary,
            )
            if index == self.trace_layer:
                ct = self._oracle.compute_dtype
                self.trace.append((q.to(ct), k.to(ct), v.to(ct), out.to(ct)))
            return out

        return attend


class SinkOracle:
    """Reference StreamingLLM decoder with ``sink`` sinks and a ``window``-token window.

    ``window=None`` gives dense causal attention (``sink`` is then ignored);
    ``sink=None`` means 0 sinks (window-only attention with rank positions).
    ``num_threads`` caps torch's intra-op threads while feeding: one-token steps are far
    slower multi-threaded (OpenMP hand-off dominates, 40x on a 2-core box); None leaves
    torch's setting alone.
    """

    def __init__(
        self,
        model_dir_or_model: str | os.PathLike[str] | nn.Module,
        sink: int | None,
        window: int | None,
        dtype: torch.dtype = torch.float32,
        *,
        num_threads: int | None = 1,
        zero_sink: bool = False,
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if sink is not None and sink < 0:
            raise ValueError(f"sink must be >= 0 or None, got {sink}")
        self.model = _load(model_dir_or_model, dtype)
        self.dtype = dtype
        self.compute_dtype = torch.promote_types(dtype, torch.float32)
        self.num_threads = num_threads
        self.zero_sink = zero_sink  # softmax off-by-one: exp(0) in the denominator
        self.window = window
        self.sink = 0 if window is None or sink is None else sink
        self.arch = _wrap(self.model)
        span = None if window is None else self.sink + window
        self.rules = [self._rule(kind, span) for kind in self.arch.layer_types()]
        self.scale = self.arch.scale

    def _rule(self, layer_type: str, span: int | None) -> LayerRule:
        config, head_dim = self.model.config, self.arch.head_dim
        if layer_type == LOCAL:
            local = self.arch.local_window  # type: ignore[attr-defined]
            rope = rope_spec(config, head_dim, local, layer_type)
            return LayerRule(0, local, _Rotary(rope))
        rope = rope_spec(config, head_dim, span, layer_type)
        return LayerRule(self.sink, self.window, _Rotary(rope))

    @property
    def max_position(self) -> int | None:
        """Largest rotary position ever used (``S+W-1``), or None when dense."""
        return None if self.window is None else self.sink + self.window - 1

    def stream(self) -> SinkStream:
        """A fresh stream at token index 0."""
        return SinkStream(self)

    def attend(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        key_pos: Tensor,
        q_pos: int,
        rotary: _Rotary,
    ) -> Tensor:
        """Softmax attention of one query over pre-RoPE keys, rotated here at read time.

        ``q``: ``[n_heads, d]``; ``keys``/``values``: ``[n_kv, n, d]``; ``key_pos``:
        ``[n]``. Query head ``h`` reads KV head ``h // (n_heads // n_kv)`` (HF's
        ``repeat_kv`` order).
        """
        ct = self.compute_dtype
        cos_k, sin_k = (x.to(ct) for x in rotary.cos_sin(key_pos))
        cos_q, sin_q = (x.to(ct) for x in rotary.cos_sin(torch.tensor([q_pos])))
        q_rot = rotate(q.to(ct).unsqueeze(1), cos_q, sin_q).squeeze(1)
        k_rot = rotate(keys.to(ct), cos_k, sin_k)
        group = q.shape[0] // keys.shape[0]
        k_rot = k_rot.repeat_interleave(group, dim=0)
        v = values.to(ct).repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hnd->hn", q_rot, k_rot) * self.scale
        if self.zero_sink:
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            # exp(0) rescaled by the same max: the off-by-one term.
            floor = torch.exp(-scores.max(dim=-1, keepdim=True).values)
            probs = weights / (weights.sum(dim=-1, keepdim=True) + floor)
        else:
            probs = torch.softmax(scores, dim=-1)
        return torch.einsum("hn,hnd->hd", probs, v).to(self.dtype)

    def logits(self, token_ids: list[int]) -> Tensor:
        """``[len, vocab]`` fp32; row t = next-token logits after streaming 0..t."""
        stream = self.stream()
        return torch.stack([stream.feed(token) for token in token_ids])

    def logprobs(self, token_ids: list[int]) -> Tensor:
        """``log_softmax`` of :meth:`logits` (fp32)."""
        return torch.log_softmax(self.logits(token_ids), dim=-1)

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """For t >= 1, log p(token_ids[t] | stream 0..t-1): ``len - 1`` values."""
        if len(token_ids) < 2:
            return []
        rows = self.logprobs(token_ids[:-1])
        targets = torch.tensor(token_ids[1:])
        return rows.gather(1, targets[:, None]).squeeze(1).tolist()

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int
    ) -> tuple[list[int], list[float]]:
        """Greedy continuation: chosen tokens and each one's fp32 logprob."""
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        stream = self.stream()
        for token in prompt_ids:
            logits = stream.feed(token)
        tokens: list[int] = []
        logprobs: list[float] = []
        for step in range(max_new_tokens):
            row = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(row))
            tokens.append(token)
            logprobs.append(float(row[token]))
            if step + 1 < max_new_tokens:
                logits = stream.feed(token)
        return tokens, logprobs

    def layer_trace(self, token_ids: list[int], layer: int) -> LayerTrace:
        """Stream ``token_ids``, recording layer ``layer``'s q/k/v and attention."""
        if not 0 <= layer < self.arch.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.arch.n_layers - 1}")
        stream = self.stream()
        stream.trace_layer = layer
        for token in token_ids:
            stream.feed(token)
        q, k, v, attn = (
            torch.stack(parts) for parts in zip(*stream.trace, strict=True)
        )
        return LayerTrace(q=q, k=k, v=v, attn=attn)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load(
    model_dir_or_model: str | os.PathLike[str] | nn.Module, dtype: torch.dtype
) -> nn.Module:
    if isinstance(model_dir_or_model, nn.Module):
        model = model_dir_or_model
        if next(model.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(model_dir_or_model), dtype=dtype
        )
    return model.eval()


def visible_set(t: int, sink: int, window: int) -> list[int]:
    """``V(t)`` of docs/architecture.md §1, in increasing order (for tests and docs)."""
    sinks = range(min(sink, t + 1))
    start = max(sink, t - window + 1)
    return [*sinks, *range(start, t + 1)]


__all__ = [
    "LayerTrace",
    "RopeSpec",
    "SinkOracle",
    "SinkStream",
    "rope_spec",
    "rotate",
    "visible_set",
]
