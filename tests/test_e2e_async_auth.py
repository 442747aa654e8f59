"""An authenticator that answers later: packets sent behind CONNECT wait for it."""

from __future__ import annotations

import asyncio

from bastionmq.broker.codec import (
    MQTT_5, Connect, Publish, Suback, Subscribe, Subscription, encode,
)
from bastionmq.broker.ports import ALLOW, AuthResult
from cluster_switch import on_every_node


class SlowAuthenticator:
    """Answers after a look-up that takes a few loop turns, like a database."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    async def authenticate(self, request):
        for _ in range(5):
            await asyncio.sleep(0)
        return ALLOW if request.username in self.allowed else AuthResult(0x86)


def test_pipelined_packets_wait_for_an_asynchronous_answer(broker, raw_clients):
    on_every_node(broker, lambda node: setattr(node.core, "authenticator",
                                               SlowAuthenticator({"alice"})))
    client = raw_clients(broker.port, MQTT_5)
    # CONNECT, SUBSCRIBE and PUBLISH in one write, before any answer.
    client.send(encode(Connect("pipelined", MQTT_5, username="alice"), MQTT_5)
                + encode(Subscribe(1, [Subscription("loop", 0)]), MQTT_5)
                + encode(Publish("loop", b"to myself"), MQTT_5))
    assert client.receive().reason_code == 0
    assert client.receive() == Suback(1, [0])
    message = client.receive()
    assert (message.topic, message.payload) == ("loop", b"to myself")


def test_asynchronous_refusal(broker, raw_clients):
    on_every_node(broker, lambda node: setattr(node.core, "authenticator",
                                               SlowAuthenticator(set())))
    client = raw_clients(broker.port, MQTT_5)
    client.send(encode(Connect("mallory", MQTT_5, username="mallory"), MQTT_5)
                + encode(Subscribe(1, [Subscription("#", 0)]), MQTT_5))
    # Refused with the authenticator's reason; the SUBSCRIBE behind it is never handled.
    assert client.closing_reasons() == [0x86]
