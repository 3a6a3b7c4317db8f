"""``--attention-sink`` and ``--window`` on every vLLM CLI that takes engine args.

The flags are folded into ``additional_config["attention_sink"]`` when engine
args are built from the command line, so from there on the CLI, ``LLM(...,
additional_config=...)`` and Ray deployments all read the same value.
"""

from __future__ import annotations

import argparse
from typing import Any

from vllm.engine.arg_utils import EngineArgs

from vllm_sink.config import CONFIG_KEY, DEFAULT_SINK, SinkConfigError, from_flags
from vllm_sink.patching import wrap_method

GROUP_TITLE = "Attention sinks (vllm-sink)"


def _positive_int(flag: str, minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be an integer, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{flag} must be >= {minimum}, got {value}"
            )
        return value

    return parse


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the sink flags, in their own help group, unless already present."""
    if any("--window" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description=(
            "StreamingLLM attention: every token attends to the first "
            "--attention-sink tokens and the last --window tokens, with rotary "
            "positions relative to the cache, so streams of any length run in "
            "constant memory. Without these flags vLLM is unchanged."
        ),
    )
    group.add_argument(
        "--attention-sink",
        type=_positive_int("--attention-sink", 0),
        default=None,
        metavar="S",
        help=f"Number of initial sink tokens kept for the whole stream "
        f"(default {DEFAULT_SINK} when --window is given; 0 = window only).",
    )
    group.add_argument(
        "--zero-sink",
        action="store_true",
        default=None,
        help="Add exp(0) to every softmax denominator (SoftMax-off-by-One, the "
        "paper's 'zero sink'), for models trained that way; any "
        "--attention-sink, including 0.",
    )
    group.add_argument(
        "--sink-token-id",
        type=_positive_int("--sink-token-id", 0),
        default=None,
        metavar="ID",
        help="A dedicated sink token (the paper's learnable sink) put at position "
        "0 of every stream unless the prompt starts with it; counted among the "
        "sink tokens, hidden from returned prompts and usage.",
    )
    group.add_argument(
        "--window",
        type=_positive_int("--window", 1),
        default=None,
        metavar="W",
        help="Number of most recent tokens attended to (the current one "
        "included). Enables sink mode.",
    )


def fold_flags(args: argparse.Namespace) -> None:
    """Move the parsed flags into ``args.additional_config[CONFIG_KEY]``."""
    cfg = from_flags(
        getattr(args, "attention_sink", None),
        getattr(args, "window", None),
        bool(getattr(args, "zero_sink", None)),
        getattr(args, "sink_token_id", None),
    )
    if cfg is None:
        return
    extra: Any = getattr(args, "additional_config", None) or {}
    given = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if given is not None and given != cfg.to_dict():
        raise SinkConfigError(
            f"--attention-sink/--window ({cfg.to_dict()}) disagree with "
            f'--additional-config "{CONFIG_KEY}" ({given}). Fix: give one of them.'
        )
    args.additional_config = {**extra, CONFIG_KEY: cfg.to_dict()}


def install() -> None:
    @wrap_method(
        EngineArgs,
        "add_cli_args",
        kind="staticmethod",
        reason="add --attention-sink/--window to every engine CLI",
        diff="0001-cli-attention-sink-flags.diff",
        params=("parser",),
    )
    def add_cli_args(original, parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        add_flags(parser)
        return parser

    @wrap_method(
        EngineArgs,
        "from_cli_args",
        kind="classmethod",
        reason="carry the sink flags into additional_config",
        diff="0001-cli-attention-sink-flags.diff",
        params=("args",),
    )
    def from_cli_args(original, args):
        fold_flags(args)
        return original(args)
