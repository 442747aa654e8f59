"""The application's own helper: a paho-mqtt client that waits for what it
asks for, so that no test sleeps. Nothing here comes from bastionmq: its
fixtures (mqtt_broker, mqtt_broker_factory, mqtt_pki) are there already."""

from __future__ import annotations

import queue
import ssl
from collections.abc import Iterator
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

TIMEOUT = 10.0


class Client:
    def __init__(self, connect_args: dict[str, Any], tls: ssl.SSLContext | None = None,
                 client_id: str = "") -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._events: queue.Queue[Any] = queue.Queue()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=mqtt.MQTTv5)
        if tls is not None:
            self.paho.tls_set_context(tls)
        self.paho.on_connect = lambda c, u, flags, code, props: self._events.put(code)
        self.paho.on_disconnect = lambda c, u, flags, code, props: self._events.put(code)
        self.paho.on_subscribe = lambda c, u, mid, codes, props: self._events.put(codes)
        self.paho.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.paho.connect(**connect_args)
        self.paho.loop_start()
        #: The CONNACK's reason code (0: accepted).
        self.connack = self._events.get(timeout=TIMEOUT)

    def subscribe(self, topic: str) -> list[int]:
        self.paho.subscribe(topic, qos=1)
        return [code.value for code in self._events.get(timeout=TIMEOUT)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.paho.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def client() -> Iterator[Callable[..., Client]]:
    """``client(mqtt_broker.client_args(), tls=context)``, closed after the test."""
    made: list[Client] = []

    def connect(*args: Any, **kwargs: Any) -> Client:
        made.append(Client(*args, **kwargs))
        return made[-1]

    yield connect
    for each in made:
        each.close()
