"""What one client can make the broker hold or decode is bounded by default:
subscriptions, the routing match cache, what it sends before it is in."""

from __future__ import annotations

import pytest

from bastionmq.broker import topics
from bastionmq.broker.codec import MQTT_5, Connect, Publish, Subscribe, Subscription
from bastionmq.broker.topics import SubscriptionTrie


def test_subscriptions_per_client_are_bounded_by_default(start_broker, raw_clients):
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_5)
    client.connect("collector")
    for batch in range(10):
        client.send(Subscribe(batch + 1, [Subscription(f"s/{batch}/{n}", 0)
                                          for n in range(1000)]))
        assert client.receive().reason_codes == [0] * 1000
    client.send(Subscribe(11, [Subscription("s/one/too/many", 0), Subscription("s/0/0", 1)]))
    # Beyond 10,000 a new filter is refused; replacing one still works.
    assert client.receive().reason_codes == [0x97, 1]


def test_a_client_sends_little_before_it_is_in(start_broker, raw_clients):
    broker = start_broker()
    # A 100 KB CONNECT (user properties) is refused before it is read whole.
    big = raw_clients(broker.port, MQTT_5)
    big.send(Connect("big", MQTT_5, properties={"user_property": [("k", "v" * 50_000)] * 2}))
    assert big.receive_until_closed() == []
    # Once in, max_packet_size (1MB) applies.
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("in").reason_code == 0
    client.send(Subscribe(1, [Subscription("big", 1)]))
    client.receive()
    client.send(Publish("big", b"x" * 100_000, qos=1, packet_id=2))
    packets = [client.receive(), client.receive()]
    assert sorted(type(p).__name__ for p in packets) == ["Puback", "Publish"]


def test_the_match_cache_is_bounded_by_the_size_of_its_topics(monkeypatch):
    monkeypatch.setattr(topics, "MATCH_CACHE_BYTES", 1_000_000)
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("#", "everyone", 0)
    for n in range(100):
        assert trie.match(f"{n}/" + "t" * 60_000) == [("everyone", 0)]
    assert sum(len(topic) for topic in trie._cache) <= 1_000_000 + 60_010


@pytest.mark.parametrize("setting, limit", [("", 64), ("mqtt.max_topic_alias = 10", 10)])
def test_topic_aliases_are_bounded_by_default(start_broker, raw_clients, setting, limit):
    broker = start_broker(setting)
    connack = raw_clients(broker.port, MQTT_5).connect("aliases")
    assert connack.properties["topic_alias_maximum"] == limit


def test_user_properties_per_packet_are_bounded_by_default(start_broker, raw_clients):
    broker = start_broker()
    many = [("k", "")] * 129
    refused = raw_clients(broker.port, MQTT_5)
    assert refused.connect("props", properties={"user_property": many}).reason_code == 0x97
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("props").reason_code == 0
    client.send(Subscribe(1, [Subscription("p", 0)]))
    client.receive()
    client.send(Publish("p", b"ok", properties={"user_property": many[:128]}))
    assert len(client.receive().properties["user_property"]) == 128
    client.send(Publish("p", b"too many", properties={"user_property": many}))
    assert client.closing_reasons() == [0x97]
