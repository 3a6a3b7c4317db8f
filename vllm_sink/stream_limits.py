"""vLLM's front-end length limits, lifted for sink engines.

The renderer refuses (or truncates) a prompt longer than ``max_model_len`` and
the OpenAI entrypoints cap ``max_tokens`` by it. A sink engine serves both as a
stream (``streams``), so for it these limits go; every other engine keeps them.
Which engine a check belongs to is told by the limit itself: a sink engine's
``max_model_len`` is a ``config.SinkModelLen``.
"""

from __future__ import annotations

from vllm_sink.config import streams_past
from vllm_sink.streams import default_max_tokens


def install() -> None:
    from vllm_sink.patching import wrap_method

    diff = "0006-streams-past-max-model-len.diff"
    from vllm.entrypoints.openai.chat_completion import serving as chat_serving
    from vllm.entrypoints.openai.completion import serving as completion_serving
    from vllm.renderers.params import TokenizeParams

    @wrap_method(
        TokenizeParams,
        "max_input_tokens",
        reason="no prompt-length limit (nor truncation) in sink mode",
        diff=diff,
        kind="property",
    )
    def max_input_tokens(original, self):
        if streams_past(self.max_total_tokens):
            return None  # a prompt of any length streams through
        return original(self)

    @wrap_method(
        TokenizeParams,
        "__post_init__",
        reason="accept max_tokens beyond max_model_len in sink mode",
        diff=diff,
    )
    def tokenize_params_post_init(original, self):
        total, asked = self.max_total_tokens, self.max_output_tokens
        if streams_past(total) and asked and asked > total:
            # The stream rolls over; per engine request the cap still holds.
            object.__setattr__(self, "max_output_tokens", int(total))
        return original(self)

    def get_max_tokens(
        original,
        max_model_len,
        max_tokens,
        input_length,
        defaults,
        override_max_tokens=None,
        truncate_prompt_tokens=None,
    ):
        fits = input_length < max_model_len and (
            max_tokens is None or input_length + max_tokens <= max_model_len
        )
        if not streams_past(max_model_len) or fits:
            return original(
                max_model_len,
                max_tokens,
                input_length,
                defaults,
                override_max_tokens,
                truncate_prompt_tokens,
            )
        asked = max_tokens if max_tokens is not None else defaults.get("max_tokens")
        limits = [v for v in (asked, override_max_tokens) if v is not None]
        return (
            min(limits) if limits else default_max_tokens(max_model_len, input_length)
        )

    for module in (completion_serving, chat_serving):
        wrap_method(
            module,
            "get_max_tokens",
            reason="max_tokens beyond max_model_len in sink mode",
            diff=diff,
            kind="function",
        )(get_max_tokens)
