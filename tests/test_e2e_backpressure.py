"""A subscriber that stops reading costs bounded memory and slows nobody else."""

from __future__ import annotations

import socket

import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, Connect, Decoder, Publish, Subscribe, Subscription, encode,
)


def _stalled_subscriber(port: int) -> socket.socket:
    """A client with a tiny receive buffer that subscribes and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(encode(Connect("stalled", MQTT_3_1_1)) +
                 encode(Subscribe(1, [Subscription("flood", 0), Subscription("flood1", 1)])))
    decoder = Decoder(MQTT_3_1_1)
    packets = []
    while len(packets) < 2:
        packets += decoder.feed(sock.recv(100))
    return sock


@pytest.mark.one_node("looks at the sessions of one node")
def test_stalled_subscriber_loses_qos0_queues_qos1_and_stays_bounded(start_broker, clients,
                                                                     raw_clients):
    # It holds the flooder back for 200 ms, then is a slow subscriber: from
    # then on its own bounds apply.
    broker = start_broker("""
        listeners.tcp.default.tcp_options.high_watermark = 16KB
        mqtt.max_mqueue_len = 50
        mqtt.slow_subscriber_timeout = 200ms
    """)
    stalled = _stalled_subscriber(broker.port)
    healthy = clients(broker.port, client_id="healthy")
    healthy.subscribe("done", qos=1)
    publisher = raw_clients(broker.port)
    publisher.connect("flooder")
    payload = b"p" * 1024
    batch = encode(Publish("flood", payload)) * 256
    for _ in range(40):  # 10 MB: far beyond every socket buffer on the way
        publisher.send(batch)
    for index in range(100):
        publisher.send(Publish("flood1", payload, qos=1, packet_id=index + 1))
    for _ in range(100):
        publisher.receive()  # every PUBACK: the broker took all of them
    healthy.publish("done", b"still served", qos=1)
    assert healthy.expect(1)[0].payload == b"still served"

    def state():
        core = broker.core
        session = core.sessions["stalled"]
        return (core.stats.dropped_qos0_backpressure, len(session.queue or ()),
                core.stats.dropped_queue_full,
                session.connection.transport.get_write_buffer_size())

    dropped_qos0, queued, dropped_from_queue, buffered = broker.run(state)
    assert dropped_qos0 > 0
    # QoS 1 waits in the session's queue, bounded by max_mqueue_len.
    assert queued == 50 and dropped_from_queue > 0
    # What the broker holds for the stalled client stays near its high-water mark
    # (one read's worth can land on top before the transport says "pause").
    assert buffered < 1024 * 1024
    stalled.close()
