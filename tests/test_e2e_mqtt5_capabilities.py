"""What a 5.0 client learns from the CONNACK, and the broker holding to it."""

from __future__ import annotations

import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Connack, Publish, Subscribe, Subscription, Will,
)


def _subscriber(raw_clients, port, topic_filter="#"):
    sub = raw_clients(port, MQTT_5)
    sub.connect("watcher")
    sub.send(Subscribe(1, [Subscription(topic_filter, 2)]))
    sub.receive()
    return sub


def test_default_connack_capabilities(broker, raw_clients):
    connack = raw_clients(broker.port, MQTT_5).connect("caps")
    props = connack.properties
    assert props["topic_alias_maximum"] == 64
    assert props["maximum_packet_size"] == 1024 * 1024
    assert props["receive_maximum"] == 100
    # Absent means available (3.2.2.3): QoS 2, retain, wildcards, shared subscriptions.
    for absent in ("maximum_qos", "retain_available", "wildcard_subscription_available",
                   "shared_subscription_available", "server_keep_alive"):
        assert absent not in props


def test_inbound_topic_alias_is_resolved_and_not_forwarded(broker, raw_clients):
    sub = _subscriber(raw_clients, broker.port)
    pub = raw_clients(broker.port, MQTT_5)
    pub.connect("aliaser")
    pub.send(Publish("sensors/kitchen/temperature", b"21", properties={"topic_alias": 3}))
    pub.send(Publish("", b"22", properties={"topic_alias": 3}))
    first, second = sub.receive(), sub.receive()
    assert (first.topic, first.payload) == ("sensors/kitchen/temperature", b"21")
    assert (second.topic, second.payload) == ("sensors/kitchen/temperature", b"22")
    assert "topic_alias" not in first.properties and "topic_alias" not in second.properties


@pytest.mark.parametrize("publish, reason", [
    (Publish("t", b"x", properties={"topic_alias": 3}), 0x94),   # above the maximum of 2
    (Publish("t", b"x", properties={"topic_alias": 0}), 0x94),   # alias 0
    (Publish("", b"x", properties={"topic_alias": 1}), 0x82),    # never set
], ids=["above maximum", "zero", "unknown"])
def test_bad_topic_alias(start_broker, raw_clients, publish, reason):
    broker = start_broker("mqtt.max_topic_alias = 2")
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("alias").properties["topic_alias_maximum"] == 2
    client.send(publish)
    assert client.closing_reasons() == [reason]


def test_topic_aliases_off(start_broker, raw_clients):
    broker = start_broker("mqtt.max_topic_alias = 0")
    client = raw_clients(broker.port, MQTT_5)
    assert "topic_alias_maximum" not in client.connect("alias").properties
    client.send(Publish("t", b"x", properties={"topic_alias": 1}))
    assert client.closing_reasons() == [0x94]


def test_maximum_qos(start_broker, raw_clients):
    broker = start_broker("mqtt.max_qos_allowed = 1")
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("q").properties["maximum_qos"] == 1
    client.send(Subscribe(1, [Subscription("a", 2), Subscription("b", 0)]))
    assert client.receive().reason_codes == [1, 0]   # granted at the maximum
    client.send(Publish("a", b"x", qos=2, packet_id=1))
    assert client.closing_reasons() == [0x9B]
    will = raw_clients(broker.port, MQTT_5)
    assert will.connect("w", will=Will("w", b"x", 2)).reason_code == 0x9B


def test_retain_not_available(start_broker, raw_clients):
    broker = start_broker("mqtt.retain_available = false")
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("r").properties["retain_available"] == 0
    client.send(Publish("a", b"x", retain=True))
    assert client.closing_reasons() == [0x9A]
    will = raw_clients(broker.port, MQTT_5)
    assert will.connect("w", will=Will("w", b"x", 0, retain=True)).reason_code == 0x9A
    old = raw_clients(broker.port, MQTT_3_1_1)
    assert old.connect("w3", will=Will("w", b"x", 0, retain=True)) == Connack(3)


@pytest.mark.parametrize("version, code", [(MQTT_5, 0xA2), (MQTT_3_1_1, 0x80)])
def test_wildcard_subscriptions_off(start_broker, raw_clients, version, code):
    broker = start_broker("mqtt.wildcard_subscription = false")
    client = raw_clients(broker.port, version)
    connack = client.connect("wild")
    if version == MQTT_5:
        assert connack.properties["wildcard_subscription_available"] == 0
    client.send(Subscribe(1, [Subscription("a/+", 1), Subscription("a/b", 1),
                              Subscription("#", 0)]))
    assert client.receive().reason_codes == [code, 1, code]


@pytest.mark.parametrize("version, code", [(MQTT_5, 0x9E), (MQTT_3_1_1, 0x80)])
def test_shared_subscriptions_off(start_broker, raw_clients, version, code):
    broker = start_broker("mqtt.shared_subscription = false")
    client = raw_clients(broker.port, version)
    connack = client.connect("share")
    if version == MQTT_5:
        assert connack.properties["shared_subscription_available"] == 0
    client.send(Subscribe(1, [Subscription("$share/group/t", 1), Subscription("t", 1)]))
    assert client.receive().reason_codes == [code, 1]


@pytest.mark.parametrize("version, code", [(MQTT_5, 0x97), (MQTT_3_1_1, 0x80)])
def test_subscriptions_beyond_max_subscriptions_are_refused(start_broker, raw_clients,
                                                            version, code):
    broker = start_broker("mqtt.max_subscriptions = 2")
    client = raw_clients(broker.port, version)
    client.connect("quota")
    client.send(Subscribe(1, [Subscription("a", 1), Subscription("$share/g/b", 1),
                              Subscription("c", 1)]))
    assert client.receive().reason_codes == [1, 1, code]
    # Replacing a subscription it holds is not a new one.
    client.send(Subscribe(2, [Subscription("a", 0)]))
    assert client.receive().reason_codes == [0]


def test_server_keep_alive_overrides_the_clients(start_broker, raw_clients):
    broker = start_broker("mqtt.server_keepalive = 1")
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("ka", keepalive=600).properties["server_keep_alive"] == 1
    # Silent past 1.5 x the server's keep alive, not the client's 600 s.
    assert client.closing_reasons() == [0x8D]


@pytest.mark.one_node(
    "orders messages of different QoS levels, which take different paths between nodes")
def test_outbound_topic_aliases_when_the_client_accepts_them(broker, raw_clients):
    sub = raw_clients(broker.port, MQTT_5)
    sub.connect("aliased", properties={"topic_alias_maximum": 2})
    sub.send(Subscribe(1, [Subscription("#", 1)]))
    sub.receive()
    pub = raw_clients(broker.port, MQTT_5)
    pub.connect("pub")
    topics = ["a/long/topic", "a/long/topic", "b/other", "c/third", "b/other", "c/third"]
    for packet_id, topic in enumerate(topics, 1):
        pub.send(Publish(topic, topic.encode(), qos=packet_id % 2, packet_id=packet_id))
    received = [sub.receive() for _ in topics]
    seen = [(p.topic, p.properties.get("topic_alias"), p.payload) for p in received]
    assert seen == [
        ("a/long/topic", 1, b"a/long/topic"),   # alias set up with the topic
        ("", 1, b"a/long/topic"),               # then the alias alone
        ("b/other", 2, b"b/other"),
        ("c/third", None, b"c/third"),          # beyond the client's maximum of 2
        ("", 2, b"b/other"),
        ("c/third", None, b"c/third"),
    ]


def test_no_outbound_aliases_unless_the_client_asks(broker, raw_clients):
    sub = _subscriber(raw_clients, broker.port)
    pub = raw_clients(broker.port, MQTT_5)
    pub.connect("pub")
    for _ in range(2):
        pub.send(Publish("t", b"x"))
    assert [(p.topic, p.properties) for p in (sub.receive(), sub.receive())] == \
        [("t", {}), ("t", {})]


def test_an_alias_is_set_up_only_by_a_packet_the_client_receives(broker, raw_clients):
    sub = raw_clients(broker.port, MQTT_5)
    sub.connect("small", properties={"topic_alias_maximum": 5, "maximum_packet_size": 64})
    sub.send(Subscribe(1, [Subscription("t", 0)]))
    sub.receive()
    pub = raw_clients(broker.port, MQTT_5)
    pub.connect("pub")
    pub.send(Publish("t", b"x" * 100))   # too large for the subscriber: dropped
    pub.send(Publish("t", b"small"))
    message = sub.receive()
    assert (message.topic, message.properties["topic_alias"], message.payload) == ("t", 1, b"small")
