"""MQTT 5 subscription options, subscription identifiers, will delay and the
client's Receive Maximum, with raw 5.0 packets."""

from __future__ import annotations

import pytest

from bastionmq.broker.codec import (
    MQTT_5, Puback, Publish, Subscribe, Subscription, Unsubscribe, Will,
)


def _client(raw_clients, port, client_id, **connect):
    client = raw_clients(port, MQTT_5)
    assert client.connect(client_id, **connect).reason_code == 0
    return client


def test_subscription_identifiers_one_per_matching_subscription(broker, raw_clients):
    sub = _client(raw_clients, broker.port, "ids")
    sub.send(Subscribe(1, [Subscription("a/+", 1)], {"subscription_identifier": 7}))
    sub.receive()
    sub.send(Subscribe(2, [Subscription("a/#", 0)], {"subscription_identifier": 9}))
    sub.receive()
    sub.send(Subscribe(3, [Subscription("a/c", 0)]))  # no identifier
    sub.receive()
    pub = _client(raw_clients, broker.port, "pub")
    pub.send(Publish("a/b", b"both"))
    pub.send(Publish("a/x/y", b"one"))
    both, one = sub.receive(), sub.receive()
    # Delivered once, carrying the identifier of every matching subscription.
    assert (both.payload, sorted(both.properties["subscription_identifier"])) == (b"both", [7, 9])
    assert (one.payload, one.properties["subscription_identifier"]) == (b"one", [9])
    pub.send(Publish("a/c", b"plain"))
    message = sub.receive()
    assert message.payload == b"plain"
    assert sorted(message.properties["subscription_identifier"]) == [7, 9]


def test_retain_handling(broker, raw_clients):
    pub = _client(raw_clients, broker.port, "pub")
    pub.send(Publish("r/t", b"retained", qos=1, packet_id=1, retain=True))
    pub.receive()
    sub = _client(raw_clients, broker.port, "rh")

    def subscribe(packet_id, handling):
        sub.send(Subscribe(packet_id, [Subscription("r/t", 0, retain_handling=handling)]))
        assert sub.receive().packet_id == packet_id

    subscribe(1, 1)  # new subscription: retained sent
    assert sub.receive().payload == b"retained"
    subscribe(2, 1)  # existing subscription: not sent again
    subscribe(3, 0)  # always sent
    assert sub.receive().payload == b"retained"
    sub.send(Unsubscribe(4, ["r/t"]))
    sub.receive()
    subscribe(5, 2)  # never sent
    pub.send(Publish("r/t", b"live"))
    assert sub.receive().payload == b"live"  # nothing retained came before it


def test_will_delay_sends_the_will_after_the_delay(broker, raw_clients):
    watcher = _client(raw_clients, broker.port, "watcher")
    watcher.send(Subscribe(1, [Subscription("w/#", 1)]))
    watcher.receive()
    dying = _client(raw_clients, broker.port, "dying",
                    properties={"session_expiry_interval": 60},
                    will=Will("w/dying", b"late will", 1,
                              properties={"will_delay_interval": 1, "content_type": "text/plain"}))
    dying.close()
    will = watcher.receive(timeout=10)
    assert will.payload == b"late will"
    assert will.properties["content_type"] == "text/plain"
    assert "will_delay_interval" not in will.properties


@pytest.mark.one_node("looks at the sessions of one node")
def test_clients_receive_maximum_limits_unacknowledged_messages(broker, raw_clients):
    sub = _client(raw_clients, broker.port, "small-window", properties={"receive_maximum": 2})
    sub.send(Subscribe(1, [Subscription("rm", 1)]))
    sub.receive()
    pub = _client(raw_clients, broker.port, "pub")
    for index in range(4):
        pub.send(Publish("rm", str(index).encode(), qos=1, packet_id=index + 1))
    for _ in range(4):
        pub.receive()
    first, second = sub.receive(), sub.receive()
    assert [first.payload, second.payload] == [b"0", b"1"]
    assert broker.run(lambda: len(broker.core.sessions["small-window"].queue)) == 2
    sub.send(Puback(first.packet_id))
    assert sub.receive().payload == b"2"


def test_request_response_metadata_passes_through_unchanged(broker, raw_clients):
    responder = _client(raw_clients, broker.port, "responder")
    responder.send(Subscribe(1, [Subscription("service/request", 1)]))
    responder.receive()
    requester = _client(raw_clients, broker.port, "requester")
    requester.send(Subscribe(1, [Subscription("reply/requester", 1)]))
    requester.receive()
    metadata = {
        "payload_format_indicator": 1,
        "content_type": "application/json",
        "response_topic": "reply/requester",
        "correlation_data": b"\x00\x01request-42",
        "user_property": [("trace", "a"), ("trace", "b"), ("tenant", "x")],
    }
    requester.send(Publish("service/request", b'{"ask": 1}', qos=1, packet_id=1,
                           properties=metadata))
    assert requester.receive() == Puback(1)
    request = responder.receive()
    assert dict(request.properties) == metadata  # every value, user properties in order
    responder.send(Puback(request.packet_id))
    responder.send(Publish(request.properties["response_topic"], b'{"answer": 2}', qos=1,
                           packet_id=1,
                           properties={"correlation_data": request.properties["correlation_data"]}))
    reply = requester.receive()
    assert (reply.topic, reply.properties["correlation_data"]) == \
        ("reply/requester", b"\x00\x01request-42")
