"""Message Expiry Interval: expired messages are never delivered, and the
interval forwarded is what is left of it. These tests let real time pass: the
feature is about time, so a short wait is the input, not a race."""

from __future__ import annotations

import time

from bastionmq.broker.codec import MQTT_5, Puback, Publish, Subscribe, Subscription

EXPIRING = {"message_expiry_interval": 1}


def _persistent(raw_clients, port, client_id="keeper", topic_filter="e/#", qos=1):
    client = raw_clients(port, MQTT_5)
    client.connect(client_id, clean_start=False, properties={"session_expiry_interval": 600})
    client.send(Subscribe(1, [Subscription(topic_filter, qos)]))
    client.receive()
    return client


def _reconnect(raw_clients, port, client_id="keeper"):
    client = raw_clients(port, MQTT_5)
    connack = client.connect(client_id, clean_start=False,
                             properties={"session_expiry_interval": 600})
    assert connack.session_present
    return client


def _publisher(raw_clients, port):
    pub = raw_clients(port, MQTT_5)
    pub.connect("pub")
    return pub


def test_live_delivery_carries_the_interval(broker, raw_clients):
    sub = _persistent(raw_clients, broker.port)
    pub = _publisher(raw_clients, broker.port)
    pub.send(Publish("e/live", b"x", properties={"message_expiry_interval": 60}))
    assert sub.receive().properties["message_expiry_interval"] == 60


def test_queued_message_expires_and_the_rest_arrive_with_reduced_intervals(broker, raw_clients):
    _persistent(raw_clients, broker.port).close()
    pub = _publisher(raw_clients, broker.port)
    pub.send(Publish("e/short", b"gone", qos=1, packet_id=1, properties=EXPIRING))
    pub.send(Publish("e/long", b"kept", qos=1, packet_id=2,
                     properties={"message_expiry_interval": 100}))
    pub.send(Publish("e/none", b"kept too", qos=1, packet_id=3))
    assert [pub.receive().packet_id for _ in range(3)] == [1, 2, 3]
    time.sleep(2.1)
    sub = _reconnect(raw_clients, broker.port)
    first, second = sub.receive(), sub.receive()
    assert [first.payload, second.payload] == [b"kept", b"kept too"]
    # [MQTT-3.3.2-6]: the interval sent is what is left after the wait.
    assert 97 <= first.properties["message_expiry_interval"] <= 98
    assert "message_expiry_interval" not in second.properties
    assert broker.run(lambda: broker.core.stats.dropped_expired) == 1


def test_expired_retained_message_is_not_delivered(broker, raw_clients):
    pub = _publisher(raw_clients, broker.port)
    pub.send(Publish("e/retained", b"stale", qos=1, packet_id=1, retain=True, properties=EXPIRING))
    pub.send(Publish("e/kept", b"fresh", qos=1, packet_id=2, retain=True))
    pub.receive(), pub.receive()
    time.sleep(1.2)
    sub = raw_clients(broker.port, MQTT_5)
    sub.connect("late")
    sub.send(Subscribe(1, [Subscription("e/#", 1)]))
    sub.receive()
    message = sub.receive()
    assert (message.topic, message.payload) == ("e/kept", b"fresh")
    assert broker.run(lambda: broker.core.retained.get("e/retained")) is None


def test_expired_inflight_message_is_not_resent(broker, raw_clients):
    sub = _persistent(raw_clients, broker.port)
    pub = _publisher(raw_clients, broker.port)
    pub.send(Publish("e/inflight", b"late", qos=1, packet_id=1, properties=EXPIRING))
    pub.send(Publish("e/inflight", b"durable", qos=1, packet_id=2))
    unacked = [sub.receive(), sub.receive()]
    assert [m.payload for m in unacked] == [b"late", b"durable"]
    sub.close()  # neither acknowledged
    time.sleep(1.2)
    again = _reconnect(raw_clients, broker.port)
    resent = again.receive()
    assert (resent.payload, resent.dup) == (b"durable", True)
    again.send(Puback(resent.packet_id))
    pub.send(Publish("e/marker", b"m", qos=1, packet_id=3))
    assert again.receive().payload == b"m"
