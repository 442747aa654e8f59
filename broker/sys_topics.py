"""$SYS topics in Mosquitto's style: the broker's own figures, published as
retained messages every ``sys_interval`` so that a monitoring client gets the
latest values the moment it subscribes to ``$SYS/#``. A leading wildcard never
matches them ([MQTT-4.7.2-1]), so ordinary ``#`` subscribers see none."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .core import BrokerCore

PREFIX = "$SYS/broker/"


class SysTopics:
    def __init__(self, core: BrokerCore, interval: float, version: str) -> None:
        self.core = core
        self.interval = interval
        self.version = version
        self.started = core.loop.time()
        self._handle: asyncio.TimerHandle | None = None
        #: Last value published per topic: only what changed is published again.
        self._published: dict[str, str] = {}

    def figures(self) -> dict[str, Callable[[], object]]:
        core = self.core
        stats = core.stats
        return {
            "version": lambda: self.version,
            "uptime": lambda: f"{int(core.loop.time() - self.started)} seconds",
            "clients/connected": lambda: sum(
                1 for session in core.sessions.values() if session.connection is not None),
            "clients/total": lambda: len(core.sessions),
            "messages/received": lambda: stats.messages_received,
            "messages/sent": lambda: stats.messages_sent,
            "bytes/received": lambda: stats.bytes_received,
            "bytes/sent": lambda: stats.bytes_sent,
            "subscriptions/count": core.subscription_count,
            "retained messages/count": lambda: len(core.retained),
            "messages/dropped": lambda: (stats.dropped_qos0_backpressure + stats.dropped_queue_full
                                         + stats.dropped_too_large + stats.dropped_expired),
            # By reason: QoS 0 to a slow subscriber over its write mark; the
            # oldest of a full queue (offline or slow session); larger than
            # the client's Maximum Packet Size; expired before delivery.
            "messages/dropped/qos0_backpressure": lambda: stats.dropped_qos0_backpressure,
            "messages/dropped/queue_full": lambda: stats.dropped_queue_full,
            "messages/dropped/too_large": lambda: stats.dropped_too_large,
            "messages/dropped/expired": lambda: stats.dropped_expired,
            "flow_control/publisher_pauses": lambda: stats.publisher_pauses,
            "flow_control/publisher_paused_seconds": lambda: round(
                stats.publisher_paused_seconds, 3),
            "flow_control/slow_subscribers": lambda: stats.slow_subscribers,
        }

    def start(self) -> None:
        self.publish()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def publish(self) -> None:
        for name, read in self.figures().items():
            value = str(read())
            if self._published.get(name) != value:
                self._published[name] = value
                self.core.publish(PREFIX + name, value.encode(), retain=True)
        self._handle = self.core.loop.call_later(self.interval, self.publish)
