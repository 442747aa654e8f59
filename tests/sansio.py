"""A harness that runs the protocol core without I/O: packets in as bytes,
bytes out from a list-backed transport, and a clock that moves only when a
test moves it. Nothing here is a stand-in for the broker's own code: the
BrokerCore, its Connections and their outboxes are the real ones; only the
event loop (time and timers) and the socket are replaced, which is what a
test about time cannot use for real without waiting.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable

from bastionmq.broker.codec import MQTT_5, Connect, Decoder, Packet, encode
from bastionmq.broker.connection import Connection
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.ports import ALLOW, AuthRequest, AuthResult, PeerInfo
from bastionmq.broker.settings import MqttSettings


class Timer:
    """What call_later returns: cancellable, as asyncio.TimerHandle."""

    __slots__ = ("when", "callback", "args", "_cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


class ManualClock:
    """The event loop as the core uses it (``time``, ``call_later``,
    ``call_at``, ``call_soon``), with time that passes only in ``advance``. Callbacks due
    at the same time run in the order they were scheduled."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._queue: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(self.now + max(0.0, delay), callback, args)
        heapq.heappush(self._queue, (timer.when, next(self._order), timer))
        return timer

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.call_later(when - self.now, callback, *args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.call_later(0.0, callback, *args)

    def create_task(self, coroutine: Any) -> Any:
        coroutine.close()
        raise NotImplementedError("the sans-IO harness runs synchronous authentication only")

    def run_due(self) -> None:
        """Run what is due now (call_soon included), and what that schedules for now."""
        while self._queue and self._queue[0][0] <= self.now:
            _, _, timer = heapq.heappop(self._queue)
            if not timer.cancelled():
                timer.callback(*timer.args)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, running each timer at its time, in order."""
        end = self.now + seconds
        while self._queue and self._queue[0][0] <= end:
            self.now = max(self.now, self._queue[0][0])
            self.run_due()
        self.now = end
        self.run_due()


class ListTransport:
    """A socket transport that keeps what is written; closing is recorded."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True
        self.address = address

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False  # no lingering close: closed is closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.address if name == "peername" else default


class AllowEveryone:
    def authenticate(self, request: AuthRequest) -> AuthResult:
        return ALLOW


class SansIoClient:
    """One client of the harness: what it sends goes straight into its
    Connection; ``received`` decodes what the broker wrote since last asked."""

    def __init__(self, harness: SansIoBroker, version: int, port: int) -> None:
        self.harness = harness
        self.version = version
        self.transport = ListTransport(("127.0.0.1", port))
        self.connection = Connection(harness.core, self.transport,
                                     PeerInfo(listener="tcp:default", address=self.transport.address))
        self._decoder = Decoder(version)
        self._read = 0
        #: Packets decoded and not yet handed to the test (what followed a CONNACK).
        self._pending: list[Packet] = []
        self.connack: Any = None

    def send_bytes(self, data: bytes) -> None:
        self.connection.data_received(data)
        self.harness.clock.run_due()

    def send(self, *packets: Packet) -> None:
        self.send_bytes(b"".join(encode(packet, self.version) for packet in packets))

    def written(self) -> bytes:
        """The bytes the broker wrote since the last call."""
        data = bytes(self.transport.written[self._read:])
        self._read = len(self.transport.written)
        return data

    def received(self) -> list[Packet]:
        """The packets the broker sent since the last call."""
        pending, self._pending = self._pending, []
        return pending + self._decoder.feed(self.written())

    def lose(self) -> None:
        """The network connection goes without a DISCONNECT."""
        self.transport.closed = True
        self.connection.connection_lost(None)
        self.harness.clock.run_due()


class SansIoBroker:
    """A BrokerCore on a manual clock; anyone may connect."""

    def __init__(self, settings: MqttSettings | None = None) -> None:
        self.clock = ManualClock()
        self.core = BrokerCore(settings or MqttSettings(), AllowEveryone(), self.clock)
        self._ports = itertools.count(40000)

    def client(self, version: int = MQTT_5) -> SansIoClient:
        return SansIoClient(self, version, next(self._ports))

    def connect(self, client_id: str, version: int = MQTT_5, **connect: Any) -> SansIoClient:
        """A client that has sent CONNECT and read its CONNACK."""
        client = self.client(version)
        client.send(Connect(client_id, version, **connect))
        connack, *client._pending = client.received()
        assert connack.reason_code == 0, connack
        client.connack = connack
        return client
