"""One timer for every client's keep-alive.

A timer per connection (``loop.call_later``) costs about 550 bytes per idle
client with uvloop (the handle, its libuv timer, the bound method), a fifth
of what an idle client holds. Here the connections wait in buckets by the
tenth of a second at which their keep-alive may fall due; one timer wakes
for the earliest bucket, and each of its connections is asked again
(``Connection._keepalive_check``), which closes it or files it under its new
due time. A client that talks keeps being filed further on: the check does
not run for every packet, only when a bucket falls due, as the timer did.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Any

#: Seconds per bucket: how much later than its exact due time a silent
#: client may be closed.
RESOLUTION = 0.1


class KeepAliveWheel:
    """The connections of one core waiting for their keep-alive check."""

    __slots__ = ("loop", "_buckets", "_order", "_handle", "_armed_for")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Bucket number (due time / RESOLUTION, rounded up) -> connections.
        #: (A dict used as an ordered set: about half the bytes per entry of a set.)
        self._buckets: dict[int, dict[Any, None]] = {}
        #: The bucket numbers, as a heap.
        self._order: list[int] = []
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def add(self, connection: Any, due: float) -> None:
        """Check ``connection`` at loop time ``due`` (or just after)."""
        number = math.ceil(due / RESOLUTION)
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = {}
            heapq.heappush(self._order, number)
        bucket[connection] = None
        connection.keepalive_bucket = number
        if self._handle is None or number < self._armed_for:
            self._arm(number)

    def remove(self, connection: Any) -> None:
        bucket = self._buckets.get(connection.keepalive_bucket)
        if bucket is not None:
            bucket.pop(connection, None)
        connection.keepalive_bucket = 0

    def _arm(self, number: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = number
        self._handle = self.loop.call_at(number * RESOLUTION, self._tick)

    def _tick(self) -> None:
        self._handle = None
        order = self._order
        cutoff = math.floor(self.loop.time() / RESOLUTION)
        due = []
        while order and order[0] <= cutoff:
            due.append(heapq.heappop(order))
        # Taken out first: a connection filed again lands in a later bucket
        # (or, at a rounding edge, in a new one for the next tick), never
        # in one this tick is going through.
        for number in due:
            for connection in self._buckets.pop(number, {}):
                connection.keepalive_bucket = 0
                connection._keepalive_check()
        # Empty buckets (every connection left) are skipped when they come.
        while order and not self._buckets.get(order[0]):
            self._buckets.pop(heapq.heappop(order), None)
        if order:
            self._arm(order[0])
