"""$SYS topics as Mosquitto 2.0 publishes them (src/sys_tree.c): the same
names and value formats, so that a dashboard made for Mosquitto works, and
bastionmq's own figures beside them (drops by reason, publisher flow
control). They are retained messages, published every ``sys_interval`` (each
only when its value changed), so that a monitoring client gets the latest
values the moment it subscribes to ``$SYS/#``. A leading wildcard never
matches them ([MQTT-4.7.2-1]), so ordinary ``#`` subscribers see none.

As in Mosquitto, ``messages/*`` count MQTT packets of every type and
``publish/messages/*`` PUBLISH packets; ``subscriptions/count`` leaves out
shared subscriptions, which ``shared_subscriptions/count`` counts.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import sys
import tracemalloc
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .core import BrokerCore
    from .stats import Stats

PREFIX = "$SYS/broker/"

#: The windows of the load averages, in minutes (load/.../1min, 5min, 15min).
LOAD_MINUTES = (1, 5, 15)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else resource.getpagesize()


def load_counters(stats: Stats) -> dict[str, Callable[[], int]]:
    """The counters Mosquitto publishes load averages of, by the name under
    ``load/``: packets, PUBLISH packets, bytes, accepted sockets and
    CONNECT packets."""
    return {
        "messages/received": lambda: stats.packets_received,
        "messages/sent": lambda: stats.packets_sent,
        "publish/dropped": lambda: stats.messages_dropped,
        "publish/received": lambda: stats.messages_received,
        "publish/sent": lambda: stats.messages_sent,
        "bytes/received": lambda: stats.bytes_received,
        "bytes/sent": lambda: stats.bytes_sent,
        "sockets": lambda: stats.sockets_opened,
        "connections": lambda: stats.connects_received,
    }


class LoadAverages:
    """Mosquitto's load figures: at each update, a counter's rate per minute
    since the last update is folded into averages that decay exponentially
    over 1, 5 and 15 minutes, ``new = rate + exp(-elapsed / window) * (old -
    rate)`` (sys_tree.c, calc_load). They start at 0."""

    __slots__ = ("counters", "last", "averages", "updated")

    def __init__(self, counters: dict[str, Callable[[], int]], now: float) -> None:
        self.counters = counters
        self.last = {name: read() for name, read in counters.items()}
        self.averages = {name: [0.0] * len(LOAD_MINUTES) for name in counters}
        self.updated = now

    def update(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed <= 0:
            return
        self.updated = now
        decays = [math.exp(-elapsed / (60.0 * minutes)) for minutes in LOAD_MINUTES]
        for name, read in self.counters.items():
            value = read()
            rate = (value - self.last[name]) * 60.0 / elapsed
            self.last[name] = value
            averages = self.averages[name]
            for index, decay in enumerate(decays):
                averages[index] = rate + decay * (averages[index] - rate)

    def figures(self) -> dict[str, str]:
        """Each average by its topic under $SYS/broker/, as Mosquitto writes it ("%.2f")."""
        return {f"load/{name}/{minutes}min": f"{average:.2f}"
                for name, averages in self.averages.items()
                for minutes, average in zip(LOAD_MINUTES, averages)}


def heap_bytes() -> tuple[int, int]:
    """(current, maximum) for heap/current and heap/maximum. Mosquitto
    counts its own allocations; Python's are counted only while tracemalloc
    traces (which slows every allocation, so it is never turned on for
    this): then its traced current and peak bytes. Otherwise the process's
    resident set size (/proc/self/statm) and its peak (getrusage's
    ru_maxrss)."""
    if tracemalloc.is_tracing():
        return tracemalloc.get_traced_memory()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform != "darwin":
        peak *= 1024  # kibibytes on Linux, bytes on macOS
    try:
        with open("/proc/self/statm", "rb") as statm:
            current = int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        current = peak
    return current, max(current, peak)


def stored_messages(core: BrokerCore) -> tuple[int, int]:
    """Mosquitto's message store: the distinct messages the broker holds
    (retained, queued, in flight; one queued for many sessions counts once)
    and the bytes of their payloads. It walks every queue, so it runs once
    per sys_interval, never on the hot path."""
    seen: set[int] = set()
    size = 0
    for message in core.retained:
        seen.add(id(message))
        size += len(message.payload)
    for session in core.sessions.values():
        if session.queue:
            for message, _, _, _, _, _ in session.queue:
                if id(message) not in seen:
                    seen.add(id(message))
                    size += len(message.payload)
        if session.inflight:
            for entry in session.inflight.values():
                message = entry.message
                if id(message) not in seen:
                    seen.add(id(message))
                    size += len(message.payload)
    return len(seen), size


class SysTopics:
    def __init__(self, core: BrokerCore, interval: float, version: str) -> None:
        self.core = core
        self.interval = interval
        self.version = version
        self.started = core.loop.time()
        self.load = LoadAverages(load_counters(core.stats), self.started)
        self._handle: asyncio.TimerHandle | None = None
        #: Last value published per topic: only what changed is published again.
        self._published: dict[str, str] = {}

    def figures(self) -> dict[str, str]:
        """Every figure by its topic under $SYS/broker/, as published now."""
        core = self.core
        stats = core.stats
        sessions = core.sessions
        total = len(sessions)
        connected = sum(1 for session in sessions.values() if session.connection is not None)
        stats.clients_maximum = max(stats.clients_maximum, total)
        stored, stored_bytes = stored_messages(core)
        heap, heap_peak = heap_bytes()
        figures: dict[str, object] = {
            "version": self.version,
            "uptime": f"{int(core.loop.time() - self.started)} seconds",
            "clients/total": total,
            "clients/maximum": stats.clients_maximum,
            # Mosquitto publishes each of these under two names.
            "clients/connected": connected,
            "clients/active": connected,
            "clients/disconnected": total - connected,
            "clients/inactive": total - connected,
            "clients/expired": stats.clients_expired,
            "messages/received": stats.packets_received,
            "messages/sent": stats.packets_sent,
            "messages/stored": stored,
            "store/messages/count": stored,
            "store/messages/bytes": stored_bytes,
            "publish/messages/received": stats.messages_received,
            "publish/messages/sent": stats.messages_sent,
            "publish/messages/dropped": stats.messages_dropped,
            "publish/bytes/received": stats.publish_bytes_received,
            "publish/bytes/sent": stats.publish_bytes_sent,
            "bytes/received": stats.bytes_received,
            "bytes/sent": stats.bytes_sent,
            "subscriptions/count": len(core.trie),
            "shared_subscriptions/count": sum(len(group.members)
                                              for group in core.groups.values()),
            "retained messages/count": len(core.retained),
            "heap/current": heap,
            "heap/maximum": heap_peak,
            # bastionmq's own. Drops by reason: QoS 0 to a slow subscriber
            # over its write mark; the oldest of a full queue (offline or
            # slow session); larger than the client's Maximum Packet Size;
            # expired before delivery.
            "messages/dropped": stats.messages_dropped,
            "messages/dropped/qos0_backpressure": stats.dropped_qos0_backpressure,
            "messages/dropped/queue_full": stats.dropped_queue_full,
            "messages/dropped/too_large": stats.dropped_too_large,
            "messages/dropped/expired": stats.dropped_expired,
            "flow_control/publisher_pauses": stats.publisher_pauses,
            "flow_control/publisher_paused_seconds": round(stats.publisher_paused_seconds, 3),
            "flow_control/slow_subscribers": stats.slow_subscribers,
        }
        return {**{name: str(value) for name, value in figures.items()}, **self.load.figures()}

    def start(self) -> None:
        self.publish()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def publish(self) -> None:
        self.load.update(self.core.loop.time())
        for name, value in self.figures().items():
            if self._published.get(name) != value:
                self._published[name] = value
                self.core.publish(PREFIX + name, value.encode(), retain=True)
        self._handle = self.core.loop.call_later(self.interval, self.publish)
