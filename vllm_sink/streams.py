"""Unbounded streams past max_model_len: one user request, a chain of engine requests.

vLLM caps every request at ``max_model_len`` (prompt validation, default
max_tokens, stop check, scheduler budget, per-request worker buffers). In sink
mode a request only ever attends to its S sink tokens and last W tokens, so
when a request would pass ``max_model_len`` it *rolls over*: it continues as a
new engine request (a segment) whose prompt is a seed, the stream's pinned
blocks plus its block-aligned window blocks, followed by new tokens. The
segment takes the previous one's blocks through the prefix cache (``seams``
says how and why that is exact), so nothing is recomputed. Prompts longer than
``max_model_len`` are fed the same way, in prefill-only segments whose sampled
token is discarded; one that extends a stream the engine still caches (a chat
re-sending its history) starts from that stream's blocks (``sink_lookup``).

The caller sees one stream: one request id, the original prompt, continuous
token ids / text / logprobs, usage over the whole stream, ``finish_reason``
only at the real end. Segment ``k`` samples with ``seed + k`` (reproducible).
A stop string spanning a seam is found: each segment's detokenizer starts from
the stream's last characters (``carry``), held back from the caller meanwhile.

This module is the stream's state machine (plain Python over vLLM's request
and output types, unit-tested without an engine); ``stream_engines`` hooks it
into ``LLMEngine`` and ``AsyncLLM``, ``stream_limits`` lifts the front-end's
length checks for sink engines.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from vllm.inputs.engine import tokens_input
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_sink import seams
from vllm_sink.config import SinkConfig, SinkConfigError
from vllm_sink.seams import SEGMENT_SEP

SEED_STRIDE = 1_000_003


@dataclass
class Segment:
    """One engine request of a stream."""

    engine_id: str
    prompt_ids: list[int]
    num_seed: int  # leading prompt tokens that re-seed sinks + window
    prefill_only: bool  # feeds prompt tokens; its sampled token is dropped
    params: SamplingParams
    offset: int  # stream tokens (prompt + generated) before this segment's new ones
    hold: bool = False  # the engine core keeps its blocks if it ends capped

    def stream_position(self, num_computed_tokens: int) -> int:
        """Stream tokens processed once this segment computed that many tokens."""
        return self.offset + max(0, num_computed_tokens - self.num_seed)


@dataclass
class Stream:
    """A user request served as a chain of segments (see module docstring)."""

    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    cfg: SinkConfig
    max_model_len: int
    hidden: int = 0  # leading prompt tokens (the sink token) kept from the user
    block_size: int = 16
    pending: list[int] = field(default_factory=list)
    head: list[int] = field(default_factory=list)  # stream tokens [0, p*bs)
    tail: list[int] = field(default_factory=list)  # stream tokens [tail_start, known)
    tail_start: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list | None = None
    segments: int = 0
    current: Segment | None = None
    seg_tokens: list[int] = field(default_factory=list)
    seg_text: str = ""  # the segment's text, starting with the carry it was given
    seg_logprobs: list = field(default_factory=list)
    seg_cumulative: float | None = None
    carry: str = ""  # stream text handed to the segment for its stop check
    sent_tokens: int = 0  # what DELTA outputs have shown so far
    sent_text: int = 0
    done: bool = False
    continued: bool = False  # started from a cached stream (sink_lookup)
    reuse: bool = True  # the engine caches prefixes (so sink_lookup may hit)

    def __post_init__(self) -> None:
        self.pending = list(self.prompt_ids)
        self.tail_start = self.head_len
        if self.params.logprobs is not None:
            self.logprobs = []
            self.cumulative_logprob = 0.0
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def pinned(self) -> int:
        return seams.pinned_blocks(self.cfg.sink, self.block_size)

    @property
    def head_len(self) -> int:
        return self.pinned * self.block_size

    @property
    def known(self) -> int:
        """Stream tokens fed to the engine so far (prompt and output)."""
        return len(self.head) + self.tail_start - self.head_len + len(self.tail)

    @property
    def rollovers(self) -> int:
        return max(0, self.segments - 1)

    def can_continue_cached(self) -> bool:
        """Whether a cached stream may be looked up for this prompt."""
        return self.reuse and self.params.prompt_logprobs is None and not self.hidden

    @property
    def may_be_held(self) -> bool:
        """Whether the engine core may hold blocks for this stream now that it
        ends: it ended between or inside segments, or its last segment (marked
        to hold) ended early, where the core may have capped it first (a stop
        string found by the front-end, an abort arriving late)."""
        if not self.reuse:
            return False
        return not self.done or (self.current is not None and self.current.hold)

    def continue_from(self, first_block: int, hit_blocks: int) -> None:
        """Start after ``hit_blocks`` prompt blocks the engine holds (sink_lookup)."""
        if hit_blocks <= 0:
            return
        fed = hit_blocks * self.block_size
        self.head = self.prompt_ids[: self.head_len]
        self.tail_start = first_block * self.block_size
        self.tail = self.prompt_ids[self.tail_start : fed]
        self.pending = self.prompt_ids[fed:]
        self.continued = True

    def _remember(self, token_ids: list[int]) -> None:
        """Keep only what a seed needs: the pinned blocks and the window blocks."""
        room = self.head_len - len(self.head)
        if room > 0:
            self.head.extend(token_ids[:room])
            token_ids = token_ids[room:]
        self.tail.extend(token_ids)
        first, _ = self._seed_blocks(recompute_last=True)
        drop = first * self.block_size - self.tail_start
        if drop > 0:
            del self.tail[:drop]
            self.tail_start += drop

    def _seed_blocks(self, recompute_last: bool) -> tuple[int, int]:
        return seams.seed_blocks(
            self.known, recompute_last, self.cfg.sink, self.cfg.window, self.block_size
        )

    def _seed(self) -> tuple[list[int], int, int]:
        """The next segment's seed tokens and its ``(k0, hb)``."""
        if self.known == 0:
            return [], self.pinned, 0
        recompute_last = not self.pending or self.prompt_logprobs is not None
        k0, hb = self._seed_blocks(recompute_last)
        start = k0 * self.block_size - self.tail_start
        return self.head + self.tail[max(0, start) :], k0, hb

    def next_segment(self) -> Segment:
        seed, k0, hb = self._seed()
        room = self.max_model_len - len(seed) - 1
        if room < 1:
            raise SinkConfigError(
                f"--max-model-len {self.max_model_len} leaves no room past the "
                f"{len(seed)}-token seed of a rollover. Fix: --max-model-len "
                f"{2 * (len(seed) + 2)} or more."
            )
        offset = len(self.prompt_ids) - len(self.pending) + len(self.tokens)
        chunk, self.pending = self.pending[:room], self.pending[room:]
        prompt = seed + chunk
        self._remember(chunk)
        prefill_only = bool(self.pending)
        left = self.params.max_tokens - len(self.tokens)
        params = copy.copy(self.params)
        gen_room = self.max_model_len - len(prompt)
        params.max_tokens = 1 if prefill_only else min(left, gen_room)
        params.min_tokens = (
            0 if prefill_only else max(0, params.min_tokens - len(self.tokens))
        )
        if self.params.seed is not None:
            params.seed = self.params.seed + SEED_STRIDE * self.segments
        if prefill_only or params.output_kind == RequestOutputKind.FINAL_ONLY:
            params.output_kind = RequestOutputKind.FINAL_ONLY
        else:  # the stream makes the user's deltas itself (see _user_output)
            params.output_kind = RequestOutputKind.CUMULATIVE
        reach = 0 if prefill_only else self._stop_reach
        self.carry = self.text[len(self.text) - reach :] if reach else ""
        cap = None
        if seed:
            cap = (self.pinned + hb - k0) * self.block_size
            params.skip_reading_prefix_cache = False  # the seed is always read
        marker = seams.SeamMarker(
            stream=self.request_id,
            first_block=k0,
            cap_tokens=cap,
            hold=prefill_only or left > gen_room,
            carry_text=self.carry,
            segment=self.segments,
        )
        params.extra_args = marker.to_extra_args(self.params.extra_args)
        suffix = f"{SEGMENT_SEP}{self.segments}" if self.segments else ""
        self.segments += 1
        engine_id = f"{self.request_id}{suffix}"
        self.current = Segment(
            engine_id, prompt, len(seed), prefill_only, params, offset, marker.hold
        )
        self.seg_tokens, self.seg_text, self.seg_logprobs = [], "", []
        self.seg_cumulative = None
        self._took_prompt_logprobs = False
        return self.current

    def engine_input(self, segment: Segment) -> dict[str, Any]:
        return tokens_input(segment.prompt_ids)

    def _take_prompt_logprobs(self, out: RequestOutput) -> None:
        if self.prompt_logprobs is None or out.prompt_logprobs is None:
            return
        if self._took_prompt_logprobs:
            return
        self._took_prompt_logprobs = True
        seg = self.current
        first_new = max(seg.num_seed, 1)
        self.prompt_logprobs.extend(out.prompt_logprobs[first_new:])

    @property
    def _stop_reach(self) -> int:
        """Trailing characters of the stream a stop string may span into the
        next segment: the longest stop string but one."""
        stops = self.params.stop
        stops = [stops] if isinstance(stops, str) else (stops or [])
        return max((len(stop) for stop in stops), default=1) - 1

    @property
    def _held(self) -> int:
        """Characters held back at a rollover (those a stop string may cut;
        vLLM holds back as many inside a request)."""
        return 0 if self.params.include_stop_str_in_output else self._stop_reach

    def accept(self, out: RequestOutput) -> tuple[RequestOutput | None, bool]:
        """Map a segment's output to the user's stream.

        Returns the output to hand to the caller (or None) and whether a new
        segment must be started now.
        """
        seg = self.current
        self._take_prompt_logprobs(out)
        if seg.prefill_only:
            if not out.finished:
                return None, False
            if out.outputs[0].finish_reason == "abort":
                self.done = True
                return self._user_output(out), False
            return None, True
        completion = out.outputs[0]  # cumulative over the segment
        self.seg_tokens = list(completion.token_ids)
        self.seg_text = completion.text
        self.seg_logprobs = list(completion.logprobs or [])
        self.seg_cumulative = completion.cumulative_logprob
        roll = False
        if out.finished:
            roll = self._close_segment(completion)
        user = self._user_output(out, rolling=roll)
        if roll:
            user.finished = False
            user.outputs[0] = replace(
                user.outputs[0], finish_reason=None, stop_reason=None
            )
            if self.params.output_kind == RequestOutputKind.FINAL_ONLY:
                user = None
        return user, roll

    def _close_segment(self, completion) -> bool:
        """Fold the finished segment into the stream; True to roll over.

        A stop string that began in the carry cut the segment's text inside
        it: the stream's text is then shorter than before this segment.
        """
        self.tokens.extend(self.seg_tokens)
        self.text = self._visible_text(rolling=False)
        if self.logprobs is not None:
            self.logprobs.extend(self.seg_logprobs)
            self.cumulative_logprob += self.seg_cumulative or 0.0
        self._remember(self.seg_tokens)
        hit_cap = (
            len(self.current.prompt_ids) + len(self.seg_tokens) >= self.max_model_len
        )
        more = len(self.tokens) < self.params.max_tokens
        roll = completion.finish_reason == "length" and hit_cap and more
        self.done = not roll
        self.seg_tokens, self.seg_text, self.seg_logprobs = [], "", []
        self.seg_cumulative, self.carry = None, ""
        return roll

    def _visible_text(self, rolling: bool) -> str:
        """The stream's text a user may see now: never what a stop string
        spanning the next seam could still cut (held back at a rollover)."""
        if rolling:
            return self.text[: len(self.text) - self._held]
        return self.text[: len(self.text) - len(self.carry)] + self.seg_text

    def _user_output(self, out: RequestOutput, rolling: bool = False) -> RequestOutput:
        tokens = self.tokens + self.seg_tokens
        text = self._visible_text(rolling)
        logprobs = cumulative = None
        if self.logprobs is not None:
            logprobs = self.logprobs + self.seg_logprobs
            cumulative = self.cumulative_logprob + (self.seg_cumulative or 0.0)
        delta = self.params.output_kind == RequestOutputKind.DELTA
        if delta:
            tokens, text = tokens[self.sent_tokens :], text[self.sent_text :]
            if logprobs is not None:
                logprobs = logprobs[self.sent_tokens :]
            self.sent_tokens += len(tokens)
            self.sent_text += len(text)
        user = copy.copy(out)
        user.outputs = [
            replace(
                out.outputs[0],
                token_ids=list(tokens),
                text=text,
                logprobs=logprobs,
                cumulative_logprob=cumulative,
            )
        ]
        user.request_id = self.request_id
        user.prompt_token_ids = self.prompt_ids[self.hidden :]
        user.prompt = self.prompt_text
        user.prompt_logprobs = self.prompt_logprobs
        if self.hidden and self.prompt_logprobs is not None:
            user.prompt_logprobs = [None, *self.prompt_logprobs[self.hidden + 1 :]]
        if delta and not self._first_visible:
            user.prompt_logprobs = None
        self._first_visible = False
        return user

    _first_visible: bool = True
    _took_prompt_logprobs: bool = False
    engine_options: tuple = ((), {})  # extra add_request arguments, every segment


def plan_stream(
    request_id: str,
    prompt: Any,
    params: Any,
    cfg: SinkConfig | None,
    max_model_len: int,
    tokenizer: Any = None,
    block_size: int = 16,
) -> Stream | None:
    """A Stream when this request needs rollover, else None (vLLM as usual)."""
    if cfg is None or not isinstance(params, SamplingParams):
        return None
    ids, text = _prompt_ids(prompt, tokenizer)
    if ids is None:
        return None
    hidden = 0
    token = cfg.sink_token_id
    if token is not None and ids[:1] != [token]:
        ids, hidden = [token, *ids], 1
    if params.max_tokens is None:
        params = copy.copy(params)
        params.max_tokens = default_max_tokens(max_model_len, len(ids) - hidden)
    fits = len(ids) + params.max_tokens <= max_model_len
    if fits and not hidden:
        return None
    seed = seams.largest_seed(cfg.sink, cfg.window, block_size)
    if not fits and max_model_len < seed + 2:
        raise SinkConfigError(
            f"This request needs more than --max-model-len {max_model_len} tokens, "
            f"which sink mode serves by continuing the stream in a new engine "
            f"request that starts with up to {seed} cached tokens: no room is "
            f"left. Fix: --max-model-len {2 * (seed + 2)} or more, a smaller "
            "--window, or a shorter request."
        )
    if params.n != 1:
        raise SinkConfigError(
            "Streams past --max-model-len and --sink-token-id support n=1 only. "
            "Fix: use n=1, or keep prompt + max_tokens within --max-model-len."
        )
    return Stream(
        request_id, list(ids), text, params, cfg, max_model_len, hidden, block_size
    )


def wants_lookup(stream: Stream) -> bool:
    """A prompt the first plain segment cannot hold may continue a cached stream."""
    return stream.can_continue_cached() and len(stream.prompt_ids) >= (
        stream.max_model_len - 1
    )


def default_max_tokens(max_model_len: int, prompt_len: int) -> int:
    """vLLM's default (fill the context), but at least 16 after a long prompt."""
    return max(16, max_model_len - prompt_len)


def _prompt_ids(prompt: Any, tokenizer: Any) -> tuple[list[int] | None, str | None]:
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        if prompt.get("type", "token") != "token":
            return None, None
        return list(prompt["prompt_token_ids"]), prompt.get("prompt")
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        prompt = prompt["prompt"]
    if isinstance(prompt, str) and tokenizer is not None:
        return list(tokenizer.encode(prompt)), prompt
    return None, None


class StreamTable:
    """Streams of one engine front-end, by user id and by segment id."""

    def __init__(self) -> None:
        self.by_user: dict[str, Stream] = {}
        self.by_engine: dict[str, Stream] = {}
        self.lock = threading.Lock()

    def start(self, stream: Stream) -> Segment:
        with self.lock:
            self.by_user[stream.request_id] = stream
            return self._advance(stream)

    def _advance(self, stream: Stream) -> Segment:
        if stream.current is not None:
            self.by_engine.pop(stream.current.engine_id, None)
        segment = stream.next_segment()
        self.by_engine[segment.engine_id] = stream
        return segment

    def advance(self, stream: Stream) -> Segment:
        with self.lock:
            return self._advance(stream)

    def finish(self, stream: Stream) -> None:
        with self.lock:
            self.by_user.pop(stream.request_id, None)
            if stream.current is not None:
                self.by_engine.pop(stream.current.engine_id, None)

    def engine_ids(self, request_ids: list[str], forget: bool = False) -> list[str]:
        """Segment ids now serving these user ids; ``forget`` drops the streams."""
        with self.lock:
            ids = []
            for rid in request_ids:
                stream = self.by_user.get(rid)
                if stream is None or stream.current is None:
                    ids.append(rid)
                    continue
                ids.append(stream.current.engine_id)
                if forget:
                    self.by_user.pop(rid, None)
                    self.by_engine.pop(stream.current.engine_id, None)
            return ids
