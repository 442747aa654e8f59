"""Publisher flow control: nothing the broker acknowledged is lost to a
subscriber that keeps up, however fast its publishers are; a slow or stalled
subscriber holds its publishers back for at most mqtt.slow_subscriber_timeout
and then loses only its own oldest messages.

The clients here write whole bursts without waiting for acknowledgements (as
fast as TCP lets them) and acknowledge every QoS 1 message they receive, all
from one select loop, so that no client's reading waits on another's writing.
"""

from __future__ import annotations

import select
import socket
import time
import types

import attrs
import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, Connect, Decoder, Puback, Publish, Subscribe, Subscription, encode,
)
from bastionmq.broker.packet_types import PUBACK, PUBLISH
from cluster_switch import on_every_node

PUMP_LIMIT = 60.0


class PipeClient:
    """A 3.1.1 client on a non-blocking socket. What it is given to publish
    goes out as fast as the broker reads it; every QoS 1 PUBLISH it receives
    is acknowledged; the payloads it receives are kept in order.

    ``read_every`` and ``read_size`` make a slow reader: one recv of at most
    ``read_size`` bytes every ``read_every`` seconds."""

    def __init__(self, port: int, client_id: str, subscribe: tuple[str, int] | None = None,
                 clean: bool = True, rcvbuf: int | None = None) -> None:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(encode(Connect(client_id, MQTT_3_1_1, clean_start=clean), MQTT_3_1_1))
        expected = 1
        if subscribe is not None:
            sock.sendall(encode(Subscribe(1, [Subscription(*subscribe)]), MQTT_3_1_1))
            expected = 2
        self.decoder = Decoder(MQTT_3_1_1)
        answers = []
        while len(answers) < expected:
            answers += self.decoder.feed(sock.recv(4096))
        assert answers[0].reason_code == 0, answers
        sock.setblocking(False)
        self.sock = sock
        self.out = bytearray()
        self.received: list[bytes] = []
        self.pubacks = 0
        self.published = 0
        self.read_every = 0.0
        self.read_size = 65536
        self.next_read = 0.0
        self.reading = True
        #: Messages to publish at a steady rate or in a window: (topic,
        #: payloads, qos, per second or window, start or None for a window,
        #: messages published before).
        self.plan = None

    def publish(self, topic: str, payloads: list[bytes], qos: int) -> None:
        parts = []
        for payload in payloads:
            self.published += 1
            packet_id = self.published % 65535 + 1 if qos else None
            parts.append(encode(Publish(topic, payload, qos, packet_id=packet_id), MQTT_3_1_1))
        self.out += b"".join(parts)

    def publish_at_rate(self, topic: str, payloads: list[bytes], qos: int, rate: float) -> None:
        self.plan = (topic, payloads, qos, rate, time.monotonic(), self.published)

    def publish_in_window(self, topic: str, payloads: list[bytes], window: int) -> None:
        """QoS 1 as most clients publish: at most ``window`` unacknowledged."""
        self.plan = (topic, payloads, 1, window, None, self.published)

    def tick(self, now: float) -> None:
        if self.plan is not None:
            topic, payloads, qos, rate, start, before = self.plan
            sent = self.published - before
            if start is None:
                due = min(len(payloads), self.pubacks + rate)
            else:
                due = min(len(payloads), int((now - start) * rate) + 1)
            if due > sent:
                self.publish(topic, payloads[sent:due], qos)

    def wants_read(self, now: float) -> bool:
        return self.reading and now >= self.next_read

    def on_readable(self, now: float) -> None:
        try:
            data = self.sock.recv(self.read_size)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("the broker closed the connection")
        self.next_read = now + self.read_every
        for packet in self.decoder.feed(data):
            if packet.type == PUBLISH:
                self.received.append(packet.payload)
                if packet.qos == 1:
                    self.out += encode(Puback(packet.packet_id), MQTT_3_1_1)
            elif packet.type == PUBACK:
                self.pubacks += 1

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        del self.out[:sent]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pipe():
    """Makes PipeClients, and closes them after the test."""
    made: list[PipeClient] = []

    def make(*args, **kwargs) -> PipeClient:
        client = PipeClient(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def pump(clients: list[PipeClient], done, limit: float = PUMP_LIMIT) -> None:
    """Run the clients until ``done()``; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not done():
        now = time.monotonic()
        assert now < deadline, "the clients did not finish: " + ", ".join(
            f"received {len(c.received)}, pubacks {c.pubacks}/{c.published}" for c in clients)
        for client in clients:
            client.tick(now)
        readers = [c.sock for c in clients if c.wants_read(now)]
        writers = [c.sock for c in clients if c.out]
        readable, writable, _ = select.select(readers, writers, [], 0.005)
        by_sock = {c.sock: c for c in clients}
        for sock in readable:
            by_sock[sock].on_readable(now)
        for sock in writable:
            by_sock[sock].on_writable()


def numbered(count: int, size: int = 100) -> list[bytes]:
    return [b"%08d" % i + b"." * (size - 8) for i in range(count)]


def stats(broker) -> types.SimpleNamespace:
    """The core's figures, added up over every node of a cluster (those
    that are not counts: node 1's)."""
    figures = on_every_node(broker, lambda node: attrs.asdict(node.core.stats))
    return types.SimpleNamespace(**{
        name: sum(each[name] for each in figures) if isinstance(value, (int, float)) else value
        for name, value in figures[0].items()})


@pytest.mark.one_node(
    "a shared group's members on another node are not held to flow control "
    "(docs/cluster.md, Not yet)")
@pytest.mark.parametrize("topic_filter", ["fast/q1", "$share/g/fast/q1"])
def test_a_fast_qos1_publisher_loses_nothing_to_a_subscriber_that_keeps_up(
        pipe, start_broker, topic_filter):
    # 5,000 QoS 1 messages written at once: without flow control the broker
    # acknowledges them far faster than the subscriber's in-flight window
    # lets it deliver them, and a 100-message queue drops most of them.
    # A shared subscription's member is held to the same rule.
    broker = start_broker("mqtt.max_mqueue_len = 100")
    subscriber = pipe(broker.port, "keeps-up", (topic_filter, 1))
    publisher = pipe(broker.port, "fast-pub")
    payloads = numbered(5000)
    publisher.publish("fast/q1", payloads, qos=1)
    pump([subscriber, publisher],
         lambda: publisher.pubacks == 5000 and len(subscriber.received) == 5000)
    assert subscriber.received == payloads
    figures = stats(broker)
    assert figures.dropped_queue_full == 0
    assert figures.publisher_pauses > 0  # the publisher was held back, not its messages dropped
    assert figures.slow_subscribers == 0


def test_two_clients_publishing_to_each_other_at_full_speed_finish(pipe, start_broker):
    # Each is held back by the other's queue; each still reads the PUBACKs
    # for what it is sent, so both queues drain and neither waits forever.
    # (Each keeps 500 unacknowledged, as a client's window; one that writes
    # far more without waiting is the next test's case.)
    broker = start_broker("mqtt.max_mqueue_len = 100, mqtt.slow_subscriber_timeout = 1h")
    alice = pipe(broker.port, "alice", ("to/alice", 1))
    bob = pipe(broker.port, "bob", ("to/bob", 1))
    payloads = numbered(4000)
    alice.publish_in_window("to/bob", payloads, window=500)
    bob.publish_in_window("to/alice", payloads, window=500)
    pump([alice, bob], lambda: (alice.pubacks == bob.pubacks == 4000
                                and len(alice.received) == len(bob.received) == 4000))
    assert alice.received == bob.received == payloads
    figures = stats(broker)
    assert figures.dropped_queue_full == 0 and figures.slow_subscribers == 0


@pytest.mark.one_node(
    "counts the publisher pauses of one node; across nodes the stream is held back instead")
def test_a_client_publishing_to_its_own_subscription_at_full_speed_finishes(pipe, start_broker):
    # As fast as its window of unacknowledged messages lets it: what it sends
    # while held back waits in the broker, and its PUBACKs behind it are read.
    broker = start_broker("mqtt.max_mqueue_len = 100, mqtt.slow_subscriber_timeout = 1h")
    echo = pipe(broker.port, "echo", ("echo/#", 1))
    payloads = numbered(4000)
    echo.publish_in_window("echo/me", payloads, window=500)
    pump([echo], lambda: echo.pubacks == 4000 and len(echo.received) == 4000)
    assert echo.received == payloads
    figures = stats(broker)
    assert figures.dropped_queue_full == 0 and figures.slow_subscribers == 0
    assert figures.publisher_pauses > 0


def test_a_client_that_pipelines_past_the_held_bytes_to_itself_is_unstuck_by_the_timeout(
        pipe, start_broker):
    # 460 KB written at once to its own subscription: past HELD_BYTES_LIMIT
    # the broker stops reading it, so it no longer sees the client's PUBACKs
    # and its queue cannot drain. The slow-subscriber timeout is what bounds
    # such a wait: then the client's own queue bound applies, and it goes on.
    broker = start_broker("mqtt.max_mqueue_len = 100, mqtt.slow_subscriber_timeout = 500ms")
    echo = pipe(broker.port, "echo", ("echo/#", 1))
    payloads = numbered(4000)
    echo.publish("echo/me", payloads, qos=1)
    pump([echo], lambda: echo.pubacks == 4000
         and echo.received and echo.received[-1] == payloads[-1])
    figures = stats(broker)
    assert figures.slow_subscribers >= 1
    assert len(echo.received) + figures.dropped_queue_full == 4000


@pytest.mark.one_node(
    "counts the publisher pauses of one node; across nodes the stream is held back instead")
def test_a_slow_reader_holds_its_publisher_back_for_the_timeout_then_loses_its_oldest(
        pipe, start_broker):
    broker = start_broker("mqtt.max_mqueue_len = 100, mqtt.slow_subscriber_timeout = 1s")
    fast = pipe(broker.port, "fast", ("news", 1))
    slow = pipe(broker.port, "slow", ("news", 1), rcvbuf=4096)
    slow.read_every, slow.read_size = 0.05, 120  # about one message per 50 ms: 20 a second
    publisher = pipe(broker.port, "news-pub")
    payloads = numbered(600)
    publisher.publish_at_rate("news", payloads, qos=1, rate=200)  # ten times what slow reads
    pump([fast, slow, publisher],
         lambda: publisher.pubacks == 600 and len(fast.received) == 600)
    # The fast subscriber got everything while the slow one was still reading:
    # the slow one stopped holding the publisher back.
    assert fast.received == payloads
    assert len(slow.received) < 300
    figures = stats(broker)
    assert figures.slow_subscribers >= 1
    assert figures.dropped_queue_full > 0
    # Then the slow reader speeds up: it gets what its queue kept, the newest.
    slow.read_every, slow.read_size = 0.0, 65536
    pump([slow], lambda: slow.received and slow.received[-1] == payloads[-1])
    assert slow.received == sorted(slow.received)
    assert len(slow.received) < 600
    # Its losses are its own: the broker counted them, nobody else's.
    assert len(slow.received) + stats(broker).dropped_queue_full == 600


@pytest.mark.one_node(
    "counts the publisher pauses of one node; across nodes the stream is held back instead")
def test_a_stalled_subscriber_holds_its_publisher_back_for_the_timeout_only(pipe, start_broker):
    broker = start_broker("mqtt.max_mqueue_len = 100, mqtt.slow_subscriber_timeout = 500ms")
    fast = pipe(broker.port, "fast", ("alerts", 1))
    stalled = pipe(broker.port, "stalled", ("alerts", 1), rcvbuf=4096)
    stalled.reading = False
    publisher = pipe(broker.port, "alerts-pub")
    payloads = numbered(2000)
    publisher.publish("alerts", payloads, qos=1)
    pump([fast, stalled, publisher],
         lambda: publisher.pubacks == 2000 and len(fast.received) == 2000)
    assert fast.received == payloads
    figures = stats(broker)
    assert figures.slow_subscribers == 1
    assert figures.dropped_queue_full > 0
    # The stalled client's memory stays bounded by its queue.
    assert broker.run(lambda: len(broker.core.sessions["stalled"].queue)) <= 100


@pytest.mark.one_node(
    "a QoS 0 publisher is not held back for a subscriber of another node (docs/cluster.md)")
def test_a_qos0_publisher_to_a_slow_reader_is_slowed_instead_of_dropped(pipe, start_broker):
    # 10 MB of QoS 0, more than every socket buffer on the way, to a reader
    # that takes it a few kilobytes at a time: it makes progress all along,
    # so its publisher is held back each time its write buffer fills.
    broker = start_broker("""
        listeners.tcp.default.tcp_options.high_watermark = 16KB
        mqtt.slow_subscriber_timeout = 1h
    """)
    reader = pipe(broker.port, "reader", ("bulk", 0), rcvbuf=8192)
    reader.read_every, reader.read_size = 0.001, 16384
    publisher = pipe(broker.port, "bulk-pub")
    payloads = numbered(10_000, size=1000)
    publisher.publish("bulk", payloads, qos=0)
    pump([reader, publisher], lambda: len(reader.received) == 10_000)
    assert reader.received == payloads
    figures = stats(broker)
    assert figures.dropped_qos0_backpressure == 0
    assert figures.publisher_pauses > 0


@pytest.mark.one_node("looks at the sessions of one node")
def test_an_offline_session_never_holds_its_publishers_back(pipe, start_broker):
    broker = start_broker("mqtt.max_mqueue_len = 100")
    away = pipe(broker.port, "away", ("later", 1), clean=False)
    away.close()
    while broker.run(lambda: broker.core.sessions["away"].connection) is not None:
        time.sleep(0.01)
    publisher = pipe(broker.port, "later-pub")
    publisher.publish("later", numbered(500), qos=1)
    pump([publisher], lambda: publisher.pubacks == 500)
    figures = stats(broker)
    assert figures.publisher_pauses == 0
    # Its queue bound applies: the oldest 400 went, counted.
    assert figures.dropped_queue_full == 400


@pytest.mark.one_node("$SYS figures are one node's")
def test_flow_control_figures_are_in_sys(pipe, start_broker, clients):
    broker = start_broker("mqtt.max_mqueue_len = 100, sys_topics.sys_interval = 100ms")
    subscriber = pipe(broker.port, "keeps-up", ("sys/q1", 1))
    publisher = pipe(broker.port, "sys-pub")
    publisher.publish("sys/q1", numbered(2000), qos=1)
    pump([subscriber, publisher], lambda: len(subscriber.received) == 2000)
    monitor = clients(broker.port, client_id="monitor")
    monitor.subscribe("$SYS/broker/flow_control/#")
    monitor.subscribe("$SYS/broker/messages/dropped/#")
    deadline = time.monotonic() + 10
    seen: dict[str, str] = {}
    while (seen.get("flow_control/publisher_pauses", "0") == "0" or len(seen) < 8
           or seen["flow_control/publisher_paused_seconds"] == "0.0"):
        assert time.monotonic() < deadline, seen
        for message in monitor.expect(1):
            seen[message.topic.removeprefix("$SYS/broker/")] = message.payload.decode()
    assert seen["flow_control/slow_subscribers"] == "0"
    assert seen["messages/dropped/queue_full"] == "0"
    assert set(seen) == {
        "messages/dropped", "flow_control/publisher_pauses", "flow_control/publisher_paused_seconds",
        "flow_control/slow_subscribers", "messages/dropped/qos0_backpressure",
        "messages/dropped/queue_full", "messages/dropped/too_large", "messages/dropped/expired"}
