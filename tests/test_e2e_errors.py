"""Bad input closes only the offending connection, with the right reason code."""

from __future__ import annotations

import socket
import time

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Connack, Connect, Disconnect, Publish, Subscribe, Subscription, encode,
)

# Bytes that break a rule once the client is connected, with the reason a 5.0
# server gives in its DISCONNECT.
VIOLATIONS = {
    "reserved type 0": (b"\x00\x00", 0x81),
    "remaining length of five bytes": (b"\x30\xff\xff\xff\xff\x01", 0x81),
    "publish qos 3": (b"\x36\x05\x00\x01ta\x01", 0x81),
    "wildcard in publish topic": (b"\x30\x06\x00\x01#\x00xy", 0x82),
    "invalid utf-8 topic": (b"\x30\x05\x00\x02\xc3\x28x", 0x81),
    "subscribe with wrong flags": (b"\x80\x06\x00\x01\x00\x01t\x00", 0x81),
    "empty subscribe": (b"\x82\x03\x00\x01\x00", 0x82),
    "second connect": (encode(Connect("again", MQTT_5), MQTT_5), 0x82),
    "pubrel with wrong flags": (b"\x60\x02\x00\x01", 0x81),
    "subscription identifier from a client": (
        b"\x30\x07\x00\x01t\x02\x0b\x01x", 0x82),
}


@pytest.mark.parametrize("case", VIOLATIONS, ids=list(VIOLATIONS))
def test_violation_closes_only_the_offender(broker, clients, raw_clients, case):
    data, reason = VIOLATIONS[case]
    sub = clients(broker.port, client_id="sub", version=paho.MQTTv5)
    sub.subscribe("ok/#", qos=1)
    pub = clients(broker.port, client_id="pub", version=paho.MQTTv311)
    bad = raw_clients(broker.port, MQTT_5)
    assert bad.connect("bad").reason_code == 0
    pub.publish("ok/before", b"1", qos=1)
    bad.send(data)
    assert bad.closing_reasons() == [reason]
    pub.publish("ok/after", b"2", qos=1)
    assert [m.topic for m in sub.expect(2)] == ["ok/before", "ok/after"]


def test_violation_by_a_3_1_1_client_closes_without_disconnect(broker, raw_clients):
    bad = raw_clients(broker.port)
    bad.connect("bad3")
    bad.send(b"\x30\x05\x00\x01#xy")
    assert bad.receive_until_closed() == []


def test_packets_before_the_malformed_one_in_the_same_read_are_handled(broker, clients, raw_clients):
    sub = clients(broker.port, client_id="sub")
    sub.subscribe("seen", qos=0)
    bad = raw_clients(broker.port)
    bad.connect("batch")
    bad.send(encode(Publish("seen", b"valid"), MQTT_3_1_1) + b"\x30\x05\x00\x01#xy")
    bad.receive_until_closed()
    assert sub.expect(1)[0].payload == b"valid"


def test_packet_larger_than_max_packet_size(start_broker, clients, raw_clients):
    broker = start_broker("mqtt.max_packet_size = 1KB")
    raw = raw_clients(broker.port, MQTT_5)
    connack = raw.connect("big")
    assert connack.properties["maximum_packet_size"] == 1024
    raw.send(Publish("t", b"x" * 2000))
    assert raw.closing_reasons() == [0x95]
    # Refused from the fixed header alone: a client announcing a huge packet
    # is closed before sending its body.
    announcer = raw_clients(broker.port, MQTT_5)
    announcer.connect("announcer")
    announcer.send(b"\x30\xff\xff\xff\x7f")
    assert announcer.closing_reasons() == [0x95]


def test_broker_does_not_send_more_than_the_clients_maximum_packet_size(broker, clients, raw_clients):
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("small", properties={"maximum_packet_size": 64})
    raw.send(Subscribe(1, [Subscription("m", 0)]))
    raw.receive()
    pub = clients(broker.port, client_id="pub")
    pub.publish("m", b"y" * 100)
    pub.publish("m", b"fits")
    assert raw.receive().payload == b"fits"


@pytest.mark.parametrize("level, name", [(6, "MQTT"), (4, "MQIsdp"), (3, "MQTT")])
def test_unsupported_protocol_level_gets_return_code_1(broker, level, name):
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        _expect_connack_1(sock, name, level)


def _expect_connack_1(sock: socket.socket, name: str, level: int) -> None:
    body = len(name).to_bytes(2, "big") + name.encode() + bytes((level, 2, 0, 60, 0, 1)) + b"c"
    sock.sendall(bytes((0x10, len(body))) + body)
    assert sock.recv(100) == b"\x20\x02\x00\x01"
    assert sock.recv(100) == b""


def test_unknown_protocol_name_is_closed(broker):
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        body = b"\x00\x04XXXX\x04\x02\x00\x3c\x00\x01c"
        sock.sendall(bytes((0x10, len(body))) + body)
        assert sock.recv(100) == b""


def test_first_packet_must_be_connect(broker, raw_clients):
    raw = raw_clients(broker.port)
    raw.send(b"\xc0\x00")  # PINGREQ
    assert raw.receive_until_closed() == []


def test_idle_connection_without_connect_is_closed_however_slowly_it_trickles(start_broker):
    broker = start_broker("mqtt.idle_timeout = 1s")
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        index, closed = _trickle_connect(sock)
    assert closed
    assert index < 40, "the whole CONNECT trickled in before the broker closed"


def _trickle_connect(sock: socket.socket) -> tuple[int, bool]:
    """Send a CONNECT a byte at a time; returns (bytes sent, closed by the broker)."""
    connect = encode(Connect("trickle" * 5, MQTT_3_1_1), MQTT_3_1_1)
    closed = False
    deadline = time.monotonic() + 8
    index = 0
    sock.settimeout(0.2)
    while time.monotonic() < deadline and index < len(connect) - 1:
        try:
            sock.sendall(connect[index:index + 1])
        except OSError:
            closed = True
            break
        index += 1
        try:
            if sock.recv(100) == b"":
                closed = True
                break
        except socket.timeout:
            pass
    if not closed:
        sock.settimeout(8)
        closed = sock.recv(100) == b""
    return index, closed


@pytest.mark.one_node("a listener's max_connections is one node's")
def test_max_connections(start_broker, raw_clients):
    broker = start_broker('listeners.tcp.default.max_connections = 2')
    first, second = raw_clients(broker.port), raw_clients(broker.port)
    assert first.connect("one").reason_code == 0
    assert second.connect("two").reason_code == 0
    third = raw_clients(broker.port)
    with pytest.raises((ConnectionError, OSError)):
        third.connect("three")
    first.close()
    deadline = time.monotonic() + 10
    while True:
        fourth = raw_clients(broker.port)
        try:
            assert fourth.connect("four").reason_code == 0
            break
        except (ConnectionError, OSError):
            assert time.monotonic() < deadline


def test_invalid_filters_are_refused_in_a_5_0_suback(broker, raw_clients):
    # (3.1.1 closes the connection instead: test_e2e_protocol_strictness.py.)
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("filters")
    raw.send(Subscribe(5, [Subscription("a/#/b", 1), Subscription("ok/+", 1),
                           Subscription("a+", 0)]))
    assert raw.receive().reason_codes == [0x8F, 1, 0x8F]


def test_anonymous_access_is_refused_unless_allowed(start_broker, raw_clients):
    broker = start_broker(config='listeners.tcp.default.bind = "127.0.0.1:0"')
    v3 = raw_clients(broker.port)
    assert v3.connect("anon") == Connack(5)
    v5 = raw_clients(broker.port, MQTT_5)
    assert v5.connect("anon").reason_code == 0x87
    assert v5.receive_until_closed() == []


def test_payload_format_indicator_with_invalid_utf8(broker, raw_clients):
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("pfi")
    raw.send(Publish("t", b"\xff\xfe", properties={"payload_format_indicator": 1}))
    assert raw.closing_reasons() == [0x99]


def test_session_expiry_set_on_disconnect_after_zero_is_a_protocol_error(broker, raw_clients):
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("exp")
    raw.send(Disconnect(0, {"session_expiry_interval": 60}))
    assert raw.closing_reasons() == [0x82]
