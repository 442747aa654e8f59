"""Publish and subscribe through the embedded broker with paho-mqtt."""


def test_a_subscriber_gets_what_a_publisher_sends(mqtt_broker, client):
    subscriber = client(mqtt_broker.client_args())
    assert subscriber.subscribe("sensors/+/temperature") == [1]

    publisher = client(mqtt_broker.client_args())
    publisher.publish("sensors/kitchen/temperature", b"21.5")

    assert subscriber.messages.get(timeout=10) == ("sensors/kitchen/temperature", b"21.5")


def test_the_broker_itself_can_publish(mqtt_broker, client):
    subscriber = client(mqtt_broker.client_args())
    subscriber.subscribe("commands/#")
    assert mqtt_broker.publish("commands/heater", b"on", qos=1) == 1
    assert subscriber.messages.get(timeout=10) == ("commands/heater", b"on")
