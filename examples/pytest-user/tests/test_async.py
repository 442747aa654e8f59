"""An async test: the broker runs in its own thread and loop, so any asyncio
client in the test's loop just connects to its address. A few bytes of MQTT
by hand here, so that the example needs no asyncio MQTT library; with
aiomqtt it is ``aiomqtt.Client(mqtt_broker.host, mqtt_broker.port)``."""

import asyncio

import pytest

pytest.importorskip("pytest_asyncio", reason="the async test runs under pytest-asyncio")

CONNECT = bytes.fromhex("1010 0004 4d515454 04 02 003c 0004 6173796e")  # 3.1.1, id "asyn"
SUBSCRIBE_NEWS = bytes.fromhex("8209 0001 0004 6e657773 00")  # id 1, "news", QoS 0


@pytest.mark.asyncio
async def test_an_asyncio_client_receives_what_the_broker_publishes(mqtt_broker):
    reader, writer = await asyncio.open_connection(mqtt_broker.host, mqtt_broker.port)
    try:
        writer.write(CONNECT)
        assert await asyncio.wait_for(reader.readexactly(4), 10) == bytes.fromhex("20020000")
        writer.write(SUBSCRIBE_NEWS)
        assert await asyncio.wait_for(reader.readexactly(5), 10) == bytes.fromhex("9003000100")

        # apublish: the test's loop keeps running while the broker's works.
        assert await mqtt_broker.apublish("news", b"hello") == 1
        publish = await asyncio.wait_for(reader.readexactly(2 + 6 + 5), 10)
        assert publish == bytes.fromhex("300b 0004 6e657773") + b"hello"
    finally:
        writer.close()
        await writer.wait_closed()
