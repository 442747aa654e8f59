"""Retained messages for nodes that start later: the BMQ_RETAINED stream.

Every node already publishes each retained message it sets (and each clear)
on ``bmq.ret.<subject>`` for the nodes running (cluster.bus). A JetStream
stream on those subjects that keeps the last message of each subject is then
the cluster's retained store, replicated as ``cluster.replicas`` says: a
node that starts reads the last message of every subject once, through an
ephemeral consumer, before its listeners open. A clear purges its subject,
so that cleared topics leave nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .bus import RETAINED_PREFIX, RETAINED_STREAM, NatsBus
from .envelope import EnvelopeError, read_stored
from .jetstream import ensure_stream, read_last_per_subject

log = logging.getLogger("bastionmq.cluster")

STREAM = RETAINED_STREAM

#: How long start-up waits for the stream's messages, at most.
LOAD_TIMEOUT = 60.0


def stream_config(replicas: int) -> dict[str, Any]:
    return {
        "name": STREAM,
        "subjects": [RETAINED_PREFIX + ".>"],
        "retention": "limits",
        "max_msgs_per_subject": 1,
        "discard": "old",
        "storage": "file",
        "num_replicas": replicas,
    }


async def load_retained(bus: NatsBus, core: Any, replicas: int,
                        timeout: float = LOAD_TIMEOUT) -> int:
    """Make sure the stream exists, then set in ``core`` every retained
    message it holds; how many. A retained message set or cleared by a
    running node while this loads wins over the stream's older copy."""
    await ensure_stream(bus, stream_config(replicas))
    bus.purge_cleared = True
    loop = asyncio.get_running_loop()
    live: set[str] = set()
    loaded = 0

    def take(subject: str, payload: bytes, stored_at: int) -> None:
        nonlocal loaded
        topic = bus.topic_of(subject)
        if topic is None or topic in live:
            return
        try:
            message = read_stored(topic, payload, stored_at, loop.time())
        except EnvelopeError as exc:
            log.warning("a retained message in %s that no node writes (%s): skipped",
                        STREAM, exc)
            return
        core.retain(message, False)
        loaded += 1

    bus.retained_live = live
    try:
        await read_last_per_subject(bus, STREAM, RETAINED_PREFIX + ".>", take, timeout=timeout)
    finally:
        bus.retained_live = None
    return loaded
