"""Deviations from MQTT 3.1.1 / 5.0 found by outside clients and hostile
inputs: each case sends the exact bytes (or drives a real client) and checks
what a conforming broker answers."""

from __future__ import annotations

import time

import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Connect, Disconnect, Publish, Pubrec, Pubrel, Subscribe, Subscription, Will,
    encode,
)


@pytest.mark.parametrize("topic_filter", ["", "a/#/b", "a/b+/c"])
def test_an_invalid_filter_closes_a_3_1_1_connection(start_broker, raw_clients, topic_filter):
    # [MQTT-4.7.1-2], [MQTT-4.7.1-3], [MQTT-4.7.3-1] make these malformed;
    # [MQTT-4.8.0-1]: close the connection.
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_3_1_1)
    client.connect("strict")
    client.send(Subscribe(1, [Subscription(topic_filter, 0)]))
    assert client.receive_until_closed() == []


def test_a_filter_refused_by_policy_still_gets_0x80_in_3_1_1(start_broker, raw_clients):
    broker = start_broker("mqtt.wildcard_subscription = false")
    client = raw_clients(broker.port, MQTT_3_1_1)
    client.connect("policy")
    client.send(Subscribe(1, [Subscription("a/+", 0), Subscription("a/b", 0)]))
    assert client.receive().reason_codes == [0x80, 0]


def test_authentication_data_without_a_method_is_refused(start_broker, raw_clients):
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_5)
    connack = client.connect("data-only", properties={"authentication_data": b"secret"})
    assert connack.reason_code == 0x82


@pytest.mark.parametrize("raw_properties, reason", [
    (b"\x11\x00\x00\x00\x0a\x11\x00\x00\x00\x0a", 0x82),   # Session Expiry Interval twice
    (b"\x7f\x01", 0x81),                                    # unknown property identifier
    (b"\x23\x00\x01", 0x81),                                # Topic Alias in CONNECT
    (b"\x21\x00\x00", 0x82),                                # Receive Maximum 0
    (b"\x27\x00\x00\x00\x00", 0x82),                        # Maximum Packet Size 0
    (b"\x17\x02", 0x82),                                    # Request Problem Information 2
], ids=["duplicate", "unknown", "topic alias", "receive maximum 0", "maximum packet size 0",
        "request problem information 2"])
def test_a_bad_5_0_connect_gets_a_connack_with_the_reason(start_broker, raw_clients,
                                                           raw_properties, reason):
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_5)
    # CONNECT: "MQTT" 5, clean start, keep alive 0, the properties, client id "x".
    body = (b"\x00\x04MQTT\x05\x02\x00\x00" + bytes((len(raw_properties),)) + raw_properties
            + b"\x00\x01x")
    client.send(bytes((0x10, len(body))) + body)
    (connack,) = client.receive_until_closed()
    assert connack.reason_code == reason


def test_a_duplicated_will_property_gets_a_connack(start_broker, raw_clients):
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_5)
    will_props = b"\x18\x00\x00\x00\x01\x18\x00\x00\x00\x01"  # Will Delay Interval twice
    body = (b"\x00\x04MQTT\x05\x06\x00\x00\x00" + b"\x00\x01x"
            + bytes((len(will_props),)) + will_props + b"\x00\x01w" + b"\x00\x01p")
    client.send(bytes((0x10, len(body))) + body)
    (connack,) = client.receive_until_closed()
    assert connack.reason_code == 0x82


def test_a_wildcard_in_a_5_0_publish_topic_is_a_protocol_error(start_broker, raw_clients):
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_5)
    client.connect("wild")
    # PUBLISH QoS 0 to "a/+" (the codec refuses to encode it, so by hand).
    body = b"\x00\x03a/+" + b"\x00" + b"x"
    client.send(bytes((0x30, len(body))) + body)
    assert client.closing_reasons() == [0x82]


def test_keep_alive_counts_packets_not_bytes(start_broker, raw_clients, clients):
    # A client with keep alive 2 s that trickles one large PUBLISH, 128 bytes
    # a second, is alive by bytes but sends no packet: it is closed after
    # 1.5 x 2 s, and its will is published.
    broker = start_broker()
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("status/trickler", 0)
    client = raw_clients(broker.port, MQTT_3_1_1)
    client.connect("trickler", keepalive=2, will=Will("status/trickler", b"gone", 0))
    packet = encode(Publish("big", b"x" * 500_000), MQTT_3_1_1)
    client.sock.settimeout(0.1)
    start = time.monotonic()
    closed = False
    for offset in range(0, 128 * 60, 128):
        try:
            client.sock.sendall(packet[offset:offset + 128])
            if client.sock.recv(1) == b"":
                closed = True
                break
        except TimeoutError:
            pass
        except OSError:
            closed = True
            break
        time.sleep(0.9)
    assert closed, "still connected after a minute of trickling"
    assert time.monotonic() - start < 10
    assert watcher.expect(1)[0].payload == b"gone"


@pytest.mark.parametrize("asked, given", [(30, None), (120, 60), (0, 60)])
def test_max_keepalive_caps_a_5_0_client(start_broker, raw_clients, asked, given):
    broker = start_broker("mqtt.max_keepalive = 60")
    connack = raw_clients(broker.port, MQTT_5).connect("k", keepalive=asked)
    assert connack.reason_code == 0
    assert connack.properties.get("server_keep_alive") == given


@pytest.mark.parametrize("refuse, code", [(True, 2), (False, 0)])
def test_max_keepalive_for_a_3_1_1_client(start_broker, raw_clients, refuse, code):
    broker = start_broker(f"mqtt.max_keepalive = 60\n"
                          f"mqtt.max_keepalive_refuse_v3 = {str(refuse).lower()}")
    assert raw_clients(broker.port, MQTT_3_1_1).connect("k", keepalive=120).reason_code == code
    assert raw_clients(broker.port, MQTT_3_1_1).connect("ok", keepalive=60).reason_code == 0


@pytest.mark.one_node(
    "the PUBRECs wait for the stream, and a connection closed meanwhile gets none")
def test_a_client_still_writing_reads_the_reason_it_is_closed_for(start_broker, raw_clients):
    # A 5.0 client pipelines 101 QoS 2 PUBLISH past a Receive Maximum of 100,
    # then answers the PUBRECs with PUBRELs. Closed at once, the broker's
    # socket would answer those writes with a reset, and the client's kernel
    # would drop the DISCONNECT 0x93 it had not read yet: the close lingers.
    broker = start_broker("mqtt.max_awaiting_rel = 100")
    client = raw_clients(broker.port, MQTT_5)
    client.connect("eager")
    client.send(b"".join(encode(Publish("t", b"x", qos=2, packet_id=n), MQTT_5)
                         for n in range(1, 102)))
    time.sleep(0.3)  # the broker has refused the 101st and closed by now
    for n in range(1, 101):
        client.send(encode(Pubrel(n), MQTT_5))
    time.sleep(0.3)
    packets = client.receive_until_closed()
    assert [p.reason_code for p in packets if isinstance(p, Disconnect)] == [0x93]
    assert sum(isinstance(p, Pubrec) for p in packets) == 100


def test_a_lingering_close_is_bounded(start_broker, raw_clients):
    # A client that keeps writing after its DISCONNECT cannot hold the socket:
    # after 64 KiB (or 2 s) the broker closes it for good.
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_5)
    client.connect("stubborn")
    client.send(Connect("again", MQTT_5))  # [MQTT-3.1.0-2]: a second CONNECT
    assert [p.reason_code for p in client.receive_until_closed(timeout=0.5)] == [0x82]
    deadline = time.monotonic() + 5
    with pytest.raises(OSError):
        while time.monotonic() < deadline:
            client.sock.sendall(b"\x00" * 16384)
            time.sleep(0.01)
    assert time.monotonic() < deadline


def test_the_close_lingers_over_tls_too(start_broker, tmp_path):
    import ssl

    from bastionmq.pki import init_pki
    from conftest import RawClient
    from tls_helpers import ssl_listener, tls_socket
    init_pki(tmp_path)
    broker = start_broker(config=ssl_listener(tmp_path, "allow_anonymous = true\n"
                                                        "mqtt.max_awaiting_rel = 100"))
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client = RawClient(0, MQTT_5, sock=tls_socket(broker.port_of("ssl:default"), context))
    client.connect("eager")
    client.send(b"".join(encode(Publish("t", b"x", qos=2, packet_id=n), MQTT_5)
                         for n in range(1, 102)))
    time.sleep(0.3)
    for n in range(1, 101):
        client.send(encode(Pubrel(n), MQTT_5))
    time.sleep(0.3)
    packets = client.receive_until_closed()
    assert [p.reason_code for p in packets if isinstance(p, Disconnect)] == [0x93]
