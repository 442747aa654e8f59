"""Message Expiry Interval over real sockets: the interval is forwarded.
That expired messages are never delivered (queued, retained, in flight), and
that the interval forwarded is what is left of it, is tested on a manual
clock in tests/test_sansio.py, where time passes without waiting."""

from __future__ import annotations

from bastionmq.broker.codec import MQTT_5, Publish, Subscribe, Subscription


def _persistent(raw_clients, port, client_id="keeper", topic_filter="e/#", qos=1):
    client = raw_clients(port, MQTT_5)
    client.connect(client_id, clean_start=False, properties={"session_expiry_interval": 600})
    client.send(Subscribe(1, [Subscription(topic_filter, qos)]))
    client.receive()
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
