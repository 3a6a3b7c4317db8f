"""Blocks the plugin holds outside requests, given back when the queue stalls.

Seams (``seams.Holds``) keep a stream's pinned and window blocks referenced
between two segments (stream hold) and while the next segment waits or is
preempted (seed hold), so that segment finds its seed in the prefix cache and
recomputes nothing. Those references are not a request's blocks: vLLM's
scheduler cannot preempt them. With a small pool, many streams between
segments can hold enough blocks that no waiting request can be allocated; with
nothing running, nothing is ever freed and the engine stalls (seen with 32
clients on a 48-block pool: 0 running, 32 waiting, 85% of the pool held).

So after a step that scheduled nothing while requests wait, the oldest waiting
segment whose seed is held goes to the front of the queue (it needs only the
blocks past its seed; exact). If the head already holds its seed, or none does,
one hold is given back to the pool (newest first, the head's own last). Its blocks
keep their hashes in the prefix cache until the pool reuses them, so a segment
whose seed survives still continues exactly; one whose seed was evicted
recomputes it from the seed tokens (alive, no longer bit-exact with a single
request: the seed's first window keys then see the pinned block's non-sink
slots). ``vllm:sink_seed_holds_released_total`` counts the holds given back;
0 means every seam was exact.

Hook (engine core): ``Scheduler.schedule`` through ``patching``;
``patches/0008-plugin-held-blocks.diff`` is the upstream hook.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_sink.metrics import engine_stats
from vllm_sink.seams import stream_of

logger = logging.getLogger("vllm.vllm_sink.pressure")  # under vLLM's handler


def _head(scheduler: Any) -> Any:
    for name in ("kv_holding_waiting", "waiting"):
        queue = getattr(scheduler, name, None)
        if queue:
            return queue.peek_request()
    return None


def release_one(holds: Any, keep: set[str]) -> str | None:
    """Give one hold's blocks back (newest first, not those in ``keep``).

    The hold's hashes stay, so the segment that continues it still re-chains
    its block hashes and finds whatever of its seed the pool still caches.
    """
    for key in reversed(list(holds.held)):
        blocks = holds.held[key]
        if not blocks or key in keep:
            continue
        holds.held[key] = {}
        holds.pool.free_blocks(b for row in blocks.values() for b in row)
        return key
    return None


def promote_seeded(scheduler: Any, holds: Any) -> bool:
    """Move the oldest waiting segment whose seed is held to the queue's front.

    It needs only the blocks past its seed, and when it ends its blocks become
    the next segment's hold: the streams keep cycling through the blocks they
    hold, exactly, while requests that hold nothing wait.
    """
    queue = scheduler.waiting
    if not queue or not hasattr(queue, "prepend_request"):
        return False
    head = queue.peek_request()
    for request in queue:
        if holds.held.get(request.request_id):
            if request is head:
                return False  # it is first already, and still does not fit
            queue.remove_request(request)
            queue.prepend_request(request)
            return True
    return False


def relieve(scheduler: Any) -> str | None:
    """After an empty step with requests waiting: let a held stream go first,
    else give back one hold. Returns what it did."""
    holds = scheduler.__dict__.get("_sink_holds")
    if holds is None or not any(holds.held.values()):
        return None
    head = _head(scheduler)
    if head is None:
        return None
    if promote_seeded(scheduler, holds):
        return "promoted"
    own = {head.request_id, "stream:" + stream_of(scheduler, head.request_id)}
    key = release_one(holds, own) or release_one(holds, set())
    if key:
        engine_stats.count_released()
        logger.info("vllm-sink: gave back seam hold %s (nothing fit the pool)", key)
        return "released"
    return None


def install() -> None:
    """Engine-core hook (scheduler process)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_sink.patching import wrap_method

    @wrap_method(
        Scheduler,
        "schedule",
        reason="held blocks given back when nothing can be scheduled",
        diff="0008-plugin-held-blocks.diff",
    )
    def schedule(original, self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if output.total_num_scheduled_tokens == 0:
            relieve(self)
        return output
