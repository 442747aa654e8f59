"""Publish/subscribe as paho-mqtt clients of both versions see it, over real sockets."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest

VERSIONS = pytest.mark.parametrize("version", [paho.MQTTv31, paho.MQTTv311, paho.MQTTv5],
                                   ids=["3.1", "3.1.1", "5.0"])


@VERSIONS
def test_connect_and_publish_each_qos(broker, clients, version):
    sub = clients(broker.port, client_id="sub", version=version)
    pub = clients(broker.port, client_id="pub", version=version)
    assert sub.reason_code == 0
    assert sub.subscribe("t/#", qos=2) == [2]
    for qos in (0, 1, 2):
        pub.publish(f"t/{qos}", f"payload {qos}".encode(), qos=qos)
    got = sub.expect(3)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("t/0", b"payload 0", 0), ("t/1", b"payload 1", 1), ("t/2", b"payload 2", 2)]
    assert not any(m.retain for m in got)


@VERSIONS
def test_delivery_qos_is_the_lower_of_publish_and_subscription(broker, clients, version):
    sub = clients(broker.port, client_id="sub", version=version)
    pub = clients(broker.port, client_id="pub", version=version)
    assert sub.subscribe("down", qos=1) == [1]
    pub.publish("down", b"a", qos=2)
    pub.publish("down", b"b", qos=0)
    assert [(m.payload, m.qos) for m in sub.expect(2)] == [(b"a", 1), (b"b", 0)]


def test_wildcards(broker, clients):
    sub = clients(broker.port, client_id="sub")
    pub = clients(broker.port, client_id="pub")
    sub.subscribe("sport/+/player1", qos=1)
    sub.subscribe("finance/#", qos=1)
    for topic in ("sport/tennis/player1", "sport/tennis/player2", "sport/tennis/x/player1",
                  "finance", "finance/stock/ibm", "other"):
        pub.publish(topic, topic.encode(), qos=1)
    got = sub.expect(3)
    assert sorted(m.topic for m in got) == ["finance", "finance/stock/ibm", "sport/tennis/player1"]
    sub.subscribe("marker", qos=1)
    sub.expect_nothing_more("marker")


@pytest.mark.one_node("$SYS figures are one node's")
def test_dollar_topics_are_not_matched_by_leading_wildcards(broker, clients):
    everything = clients(broker.port, client_id="all")
    dollar = clients(broker.port, client_id="dollar")
    everything.subscribe("#", qos=1)
    everything.subscribe("+/info", qos=1)
    dollar.subscribe("$SYS/#", qos=1)
    broker.call(broker.broker.publish("$SYS/info", b"internal", qos=1))
    # The broker's own $SYS/broker/... figures (retained) may come first.
    topics = []
    while "$SYS/info" not in topics:
        topics.append(dollar.expect(1)[0].topic)
    assert all(topic.startswith("$SYS/") for topic in topics)
    everything.expect_nothing_more("marker")


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(broker, clients):
    sub = clients(broker.port, client_id="sub")
    pub = clients(broker.port, client_id="pub")
    sub.subscribe("a/+", qos=0)
    sub.subscribe("a/#", qos=2)
    sub.subscribe("a/b", qos=1)
    pub.publish("a/b", b"once", qos=2)
    message = sub.expect(1)[0]
    assert (message.payload, message.qos) == (b"once", 2)
    sub.expect_nothing_more("a/marker")


def test_unsubscribe_stops_delivery(broker, clients):
    sub = clients(broker.port, client_id="sub")
    pub = clients(broker.port, client_id="pub")
    sub.subscribe("x", qos=1)
    sub.subscribe("marker", qos=1)
    sub.unsubscribe("x")
    pub.publish("x", b"gone", qos=1)
    sub.expect_nothing_more("marker")


@VERSIONS
def test_retained_set_replace_clear_and_delivery_on_subscribe(broker, clients, version):
    pub = clients(broker.port, client_id="pub", version=version)
    pub.publish("r/1", b"first", qos=1, retain=True)
    pub.publish("r/1", b"second", qos=1, retain=True)
    pub.publish("r/2", b"other", qos=0, retain=True)
    sub = clients(broker.port, client_id="sub", version=version)
    sub.subscribe("r/+", qos=1)
    got = sorted((m.topic, m.payload, m.retain, m.qos) for m in sub.expect(2))
    assert got == [("r/1", b"second", True, 1), ("r/2", b"other", True, 0)]
    # A live message is delivered with RETAIN 0 to an existing subscriber.
    pub.publish("r/1", b"live", qos=1, retain=True)
    live = sub.expect(1)[0]
    assert (live.payload, live.retain) == (b"live", False)
    # An empty retained payload clears the topic (and is forwarded as is).
    pub.publish("r/1", b"", qos=1, retain=True)
    assert sub.expect(1)[0].payload == b""
    late = clients(broker.port, client_id="late", version=version)
    late.subscribe("r/#", qos=1)
    assert [(m.topic, m.payload) for m in late.expect(1)] == [("r/2", b"other")]
    late.subscribe("marker", qos=1)
    late.expect_nothing_more("marker")


def test_retain_as_published_keeps_the_flag_for_5_clients(broker, clients):
    sub = clients(broker.port, client_id="sub", version=paho.MQTTv5)
    pub = clients(broker.port, client_id="pub", version=paho.MQTTv5)
    sub.subscribe("rap", qos=1, retainAsPublished=True)
    pub.publish("rap", b"x", qos=1, retain=True)
    assert sub.expect(1)[0].retain is True


def test_no_local_for_5_clients(broker, clients):
    me = clients(broker.port, client_id="me", version=paho.MQTTv5)
    me.subscribe("chat", qos=1, noLocal=True)
    other = clients(broker.port, client_id="other", version=paho.MQTTv5)
    me.publish("chat", b"mine", qos=1)
    other.publish("chat", b"theirs", qos=1)
    assert [m.payload for m in me.expect(1)] == [b"theirs"]


def test_mixed_versions_exchange_messages(broker, clients):
    v5 = clients(broker.port, client_id="v5", version=paho.MQTTv5)
    v3 = clients(broker.port, client_id="v3", version=paho.MQTTv311)
    v5.subscribe("mix", qos=2)
    v3.subscribe("mix", qos=2)
    v3.publish("mix", b"from 3", qos=2)
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v"), ("k", "w")]
    props.ContentType = "text/plain"
    v5.publish("mix", b"from 5", qos=2, properties=props)
    got5 = v5.expect(2)
    got3 = v3.expect(2)
    assert [m.payload for m in got5] == [b"from 3", b"from 5"]
    assert [m.payload for m in got3] == [b"from 3", b"from 5"]
    forwarded = got5[1].properties
    assert forwarded.UserProperty == [("k", "v"), ("k", "w")]
    assert forwarded.ContentType == "text/plain"


@pytest.mark.one_node("the embedding API's publish counts the subscribers of its own node")
def test_embedding_publish_reaches_subscribers(broker, clients):
    sub = clients(broker.port, client_id="sub")
    sub.subscribe("from/app", qos=1)
    assert broker.call(broker.broker.publish("from/app", "hi", qos=1)) == 1
    message = sub.expect(1)[0]
    assert (message.payload, message.qos) == (b"hi", 1)
