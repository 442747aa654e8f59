"""The broker's Receive Maximum (inbound quota) and the Reason Strings it
sends when Request Problem Information allows them."""

from __future__ import annotations

import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Disconnect, Publish, Pubrec, Subscribe, Subscription,
)


@pytest.mark.one_node(
    "0x10 (no matching subscribers) needs every node's subscriptions: across nodes the "
    "answer is 0")
@pytest.mark.parametrize("last_qos", [1, 2])
def test_exceeding_the_brokers_receive_maximum_is_disconnected_with_0x93(
        start_broker, raw_clients, last_qos):
    broker = start_broker("mqtt.max_awaiting_rel = 3")
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("eager").properties["receive_maximum"] == 3
    for packet_id in (1, 2, 3):
        # QoS 2 messages whose PUBREL the client never sends stay unacknowledged.
        client.send(Publish("t", b"x", qos=2, packet_id=packet_id))
        assert client.receive() == Pubrec(packet_id, 0x10)
    client.send(Publish("t", b"one too many", qos=last_qos, packet_id=4))
    disconnect = client.receive_until_closed()
    assert [p.reason_code for p in disconnect] == [0x93]
    assert "Receive Maximum" in disconnect[0].properties["reason_string"]


def test_qos1_within_the_receive_maximum_is_accepted(start_broker, raw_clients):
    broker = start_broker("mqtt.max_awaiting_rel = 2")
    client = raw_clients(broker.port, MQTT_5)
    client.connect("steady")
    client.send(Publish("t", b"x", qos=2, packet_id=1))
    client.receive()
    # One QoS 2 unacknowledged: QoS 1 messages (acknowledged at once) keep flowing.
    for packet_id in range(2, 50):
        client.send(Publish("t", b"x", qos=1, packet_id=packet_id))
        assert client.receive().packet_id == packet_id


def test_reason_strings_on_connack_disconnect_and_suback(start_broker, raw_clients):
    broker = start_broker("mqtt.wildcard_subscription = false, mqtt.max_clientid_len = 23")
    refused = raw_clients(broker.port, MQTT_5)
    connack = refused.connect("x" * 24)
    assert connack.reason_code == 0x85
    assert connack.properties["reason_string"] == "client id longer than 23"

    client = raw_clients(broker.port, MQTT_5)
    client.connect("explained")
    client.send(Subscribe(1, [Subscription("a/+", 0), Subscription("a/b", 0)]))
    suback = client.receive()
    assert suback.reason_codes == [0xA2, 0]
    assert suback.properties["reason_string"] == "'a/+': wildcards are turned off"

    client.send(Publish("t", b"x", qos=1, packet_id=1, properties={"topic_alias": 5000}))
    disconnect = client.receive_until_closed()
    assert [p.reason_code for p in disconnect] == [0x94]
    assert disconnect[0].properties["reason_string"] == "topic alias 5000 above the maximum of 64"


def test_no_reason_string_on_suback_when_problem_information_is_not_requested(
        start_broker, raw_clients):
    broker = start_broker("mqtt.wildcard_subscription = false")
    client = raw_clients(broker.port, MQTT_5)
    client.connect("quiet", properties={"request_problem_information": 0})
    client.send(Subscribe(1, [Subscription("a/+", 0)]))
    suback = client.receive()
    assert (suback.reason_codes, suback.properties) == ([0xA2], {})
    # CONNACK and DISCONNECT may still explain ([MQTT-3.1.2-29]).
    client.send(Publish("t", b"x", properties={"subscription_identifier": 1}))
    (disconnect,) = client.receive_until_closed()
    assert disconnect.reason_code == 0x82 and "reason_string" in disconnect.properties


def test_no_reason_string_beyond_the_clients_maximum_packet_size(broker, raw_clients):
    client = raw_clients(broker.port, MQTT_5)
    client.connect("tiny", properties={"maximum_packet_size": 16})
    client.send(Publish("t", b"x", properties={"subscription_identifier": 1}))
    assert client.receive_until_closed() == [Disconnect(0x82)]


def test_311_clients_get_no_properties(start_broker, raw_clients):
    broker = start_broker("mqtt.wildcard_subscription = false")
    client = raw_clients(broker.port, MQTT_3_1_1)
    client.connect("old")
    client.send(Subscribe(1, [Subscription("a/+", 0)]))
    assert client.receive().reason_codes == [0x80]
