"""Embedding: ``async with Broker(config)`` inside an application's own event loop."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

import bastionmq
from bastionmq import Broker, ConfigError
from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Connack, Connect, Decoder, MalformedPacket, Packet, Puback,
    Publish, Suback, Subscribe, Subscription, encode,
)
from bastionmq.config import Bind, Config, ListenersConfig, TcpListenerConfig

TIMEOUT = 10.0
SERVER_SHUTTING_DOWN = 0x8B
NOT_AUTHORIZED = 0x87
CONNACK_NOT_AUTHORIZED_3_1_1 = 5

ANONYMOUS = """
listeners.tcp.default { bind = "127.0.0.1:0" }
allow_anonymous = true
"""



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AsyncClient:
    """An MQTT client on asyncio streams, speaking through the project's codec."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 version: int) -> None:
        self.reader = reader
        self.writer = writer
        self.version = version
        self.decoder = Decoder(version)
        self.pending: list[Packet] = []

    @classmethod
    async def open(cls, port: int, version: int = MQTT_3_1_1) -> AsyncClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        return cls(reader, writer, version)

    async def send(self, packet: Packet) -> None:
        self.writer.write(encode(packet, self.version))
        await self.writer.drain()

    async def receive(self) -> Packet:
        """The next packet; ConnectionError when the broker closes first."""
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not data:
                raise ConnectionError("closed by the broker")
            try:
                self.pending.extend(self.decoder.feed(data))
            except MalformedPacket as exc:
                raise AssertionError(f"the broker sent a malformed packet: {exc}") from None
        return self.pending.pop(0)

    async def receive_until_closed(self) -> list[Packet]:
        packets = []
        while True:
            try:
                packets.append(await self.receive())
            except (ConnectionError, OSError):
                return packets

    async def closing_reasons(self) -> list[int]:
        return [packet.reason_code for packet in await self.receive_until_closed()]

    async def connect(self, client_id: str, **kwargs: Any) -> Connack:
        await self.send(Connect(client_id, self.version, **kwargs))
        connack = await self.receive()
        assert isinstance(connack, Connack)
        return connack

    async def subscribe(self, topic_filter: str, qos: int = 0) -> Suback:
        await self.send(Subscribe(1, [Subscription(topic_filter, qos)]))
        suback = await self.receive()
        assert isinstance(suback, Suback)
        return suback

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class ClientSet:
    """Opens clients and closes every one of them on leaving, whatever happened,
    so that no transport outlives the event loop."""

    def __init__(self) -> None:
        self.opened: list[AsyncClient] = []

    async def __call__(self, port: int, version: int = MQTT_3_1_1) -> AsyncClient:
        client = await AsyncClient.open(port, version)
        self.opened.append(client)
        return client

    async def __aenter__(self) -> ClientSet:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for client in self.opened:
            await client.close()


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


# ------------------------------------------------------------------ config forms


def config_source(form: str, tmp_path: Path) -> Any:
    if form == "hocon text":
        return ANONYMOUS
    if form in ("path str", "pathlib.Path"):
        path = tmp_path / "embedded.conf"
        path.write_text(ANONYMOUS, encoding="utf-8")
        return str(path) if form == "path str" else path
    return Config(allow_anonymous=True, listeners=ListenersConfig(
        tcp={"default": TcpListenerConfig(bind=Bind("127.0.0.1", 0))}))


@pytest.mark.parametrize("form", ["hocon text", "path str", "pathlib.Path", "Config object"])
def test_broker_takes_every_config_form_and_binds_an_ephemeral_port(run, tmp_path, form):
    source = config_source(form, tmp_path)

    async def main():
        async with Broker(source) as broker, ClientSet() as open_client:
            host, port = broker.listeners["tcp:default"].address
            assert host == "127.0.0.1"
            assert port != 0
            for version in (MQTT_3_1_1, MQTT_5):
                client = await open_client(port, version)
                connack = await client.connect(f"embedded-{version}")
                assert connack.reason_code == 0

    run(main())


def test_public_api_is_exported_from_the_package():
    assert bastionmq.Broker is Broker
    assert bastionmq.ConfigError is ConfigError
    assert isinstance(bastionmq.load_config(text=ANONYMOUS), bastionmq.Config)
    assert isinstance(bastionmq.__version__, str) and bastionmq.__version__ != "0.0.0"


# ------------------------------------------------------------------ publish


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5], ids=["3.1.1", "5.0"])
def test_publish_reaches_a_subscriber(run, version):
    async def main():
        async with Broker(ANONYMOUS) as broker, ClientSet() as open_client:
            port = broker.listeners["tcp:default"].address[1]
            sub = await open_client(port, version)
            await sub.connect("sub")
            assert (await sub.subscribe("app/#", qos=1)).reason_codes == [1]

            assert await broker.publish("app/greeting", b"hello", qos=1) == 1
            message = await sub.receive()
            assert isinstance(message, Publish)
            assert (message.topic, message.payload, message.qos, message.retain) == \
                ("app/greeting", b"hello", 1, False)
            await sub.send(Puback(message.packet_id))

            await broker.publish("app/text", "héllo", qos=0)
            message = await sub.receive()
            assert (message.topic, message.payload, message.qos) == \
                ("app/text", "héllo".encode(), 0)
            assert await broker.publish("elsewhere", b"nobody") == 0

    run(main())


def test_publish_reaches_paho_clients_in_threads(run, clients):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            port = broker.listeners["tcp:default"].address[1]
            subscribers = []
            for version in (paho.MQTTv311, paho.MQTTv5):
                client = await asyncio.to_thread(clients, port, client_id=f"paho-{version}",
                                                 version=version)
                assert await asyncio.to_thread(client.subscribe, "news/+", 2) == [2]
                subscribers.append(client)
            assert await broker.publish("news/today", b"headline", qos=2) == 2
            for client in subscribers:
                [message] = await asyncio.to_thread(client.expect)
                assert (message.topic, message.payload, message.qos) == \
                    ("news/today", b"headline", 2)
            for client in subscribers:
                await asyncio.to_thread(client.disconnect)

    run(main())


def test_retained_publish_reaches_a_later_subscriber(run):
    async def main():
        async with Broker(ANONYMOUS) as broker, ClientSet() as open_client:
            port = broker.listeners["tcp:default"].address[1]
            assert await broker.publish("state/door", b"open", qos=1, retain=True) == 0
            sub = await open_client(port, MQTT_5)
            await sub.connect("late")
            await sub.subscribe("state/#", qos=1)
            message = await sub.receive()
            assert isinstance(message, Publish)
            assert (message.topic, message.payload, message.retain) == \
                ("state/door", b"open", True)

    run(main())


# Topics no client could publish: wildcards and the empty name (4.7), U+0000
# and unpaired surrogates ([MQTT-1.5.4-1], [MQTT-1.5.4-2]), and a name longer
# than the 65535 bytes a UTF-8 string can hold (1.5.4).
INVALID_TOPICS = {
    "empty": "",
    "single-level wildcard": "a/+/c",
    "multi-level wildcard": "a/#",
    "bare #": "#",
    "bare +": "+",
    "null character": "a\0b",
    "unpaired surrogate": "a\ud800b",
    "longer than 65535 bytes": "x" * 65536,
}


@pytest.mark.parametrize("topic", INVALID_TOPICS.values(), ids=list(INVALID_TOPICS))
def test_publish_refuses_an_invalid_topic(run, topic):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            with pytest.raises(ValueError):
                await broker.publish(topic, b"x")

    run(main())


@pytest.mark.parametrize("topic", INVALID_TOPICS.values(), ids=list(INVALID_TOPICS))
def test_an_invalid_topic_leaves_subscribers_unharmed(run, topic):
    """Whatever the application passes, clients keep getting well-formed packets,
    whether they subscribed before the attempt or after it."""
    async def attempt(broker: Broker) -> None:
        try:
            await broker.publish(topic, b"bad", qos=1, retain=True)
        except Exception:  # the refusal itself is test_publish_refuses_an_invalid_topic
            pass

    async def main():
        async with Broker(ANONYMOUS) as broker, ClientSet() as open_client:
            port = broker.listeners["tcp:default"].address[1]
            await attempt(broker)  # nobody subscribed yet
            early = await open_client(port, MQTT_5)
            await early.connect("early")
            assert (await early.subscribe("#", qos=1)).reason_codes == [1]
            await attempt(broker)  # with a subscriber
            late = await open_client(port, MQTT_3_1_1)
            await late.connect("late")
            assert (await late.subscribe("#", qos=1)).reason_codes == [1]
            await broker.publish("good", b"ok", qos=1)
            for client in (early, late):
                message = await client.receive()
                assert isinstance(message, Publish)
                assert (message.topic, message.payload) == ("good", b"ok")

    run(main())


def test_publish_refuses_an_invalid_qos(run):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            with pytest.raises(ValueError):
                await broker.publish("ok", b"x", qos=3)

    run(main())


# ------------------------------------------------------------------ leaving the block


def test_leaving_the_block_closes_every_socket_and_task(run):
    async def main():
        before = asyncio.all_tasks()
        async with ClientSet() as open_client:
            async with Broker(ANONYMOUS) as broker:
                port = broker.listeners["tcp:default"].address[1]
                v5 = await open_client(port, MQTT_5)
                await v5.connect("v5")
                await v5.subscribe("t/#", qos=1)
                v311 = await open_client(port, MQTT_3_1_1)
                await v311.connect("v311")
                silent = await open_client(port, MQTT_5)  # never sends CONNECT
                await broker.publish("t/1", b"x", qos=1)
                assert isinstance(await v5.receive(), Publish)

            leftover = asyncio.all_tasks() - before
            assert not leftover, leftover
            assert await refuses_connections(port)
            assert await v5.closing_reasons() == [SERVER_SHUTTING_DOWN]
            assert await v311.receive_until_closed() == []
            assert await silent.receive_until_closed() == []

    run(main())


def test_leaving_the_block_on_an_exception_also_closes(run):
    async def main():
        async with ClientSet() as open_client:
            with pytest.raises(RuntimeError, match="application failed"):
                async with Broker(ANONYMOUS) as broker:
                    port = broker.listeners["tcp:default"].address[1]
                    client = await open_client(port, MQTT_5)
                    await client.connect("app")
                    raise RuntimeError("application failed")
            assert await refuses_connections(port)
            assert await client.closing_reasons() == [SERVER_SHUTTING_DOWN]

    run(main())


def test_a_listener_that_cannot_bind_closes_those_already_open(run):
    with socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen()
        taken = occupier.getsockname()[1]
        free = free_port()
        config = f"""
allow_anonymous = true
listeners.tcp.a {{ bind = "127.0.0.1:{free}" }}
listeners.tcp.b {{ bind = "127.0.0.1:{taken}" }}
"""

        async def main():
            before = asyncio.all_tasks()
            with pytest.raises(OSError):
                async with Broker(config):
                    pass
            assert await refuses_connections(free)
            assert not asyncio.all_tasks() - before

        run(main())


# ------------------------------------------------------------------ bad config


def test_a_bad_config_raises_config_error_before_any_port_opens(run):
    port = free_port()
    config = f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
allow_anonymous = true
mqtt.max_inflight = 0
listeners.tcp.default.bogus = 1
"""

    async def main():
        with pytest.raises(ConfigError) as raised:
            async with Broker(config):
                pass
        paths = [where for where, _ in raised.value.errors]
        assert "mqtt.max_inflight" in paths
        assert "listeners.tcp.default.bogus" in paths
        assert "mqtt.max_inflight: 0 is out of range" in str(raised.value)
        assert await refuses_connections(port)

    run(main())


def test_a_missing_config_file_raises_config_error_naming_it(tmp_path):
    missing = tmp_path / "absent.conf"
    for source in (missing, str(missing)):
        with pytest.raises(ConfigError) as raised:
            Broker(source)
        assert str(missing) in str(raised.value)


# ------------------------------------------------------------------ anonymous access


@pytest.mark.parametrize("version, refusal", [
    (MQTT_3_1_1, CONNACK_NOT_AUTHORIZED_3_1_1),
    (MQTT_5, NOT_AUTHORIZED),
], ids=["3.1.1", "5.0"])
@pytest.mark.parametrize("form", ["hocon text", "Config object"])
def test_anonymous_clients_are_refused_by_default(run, version, refusal, form):
    if form == "hocon text":
        source: Any = 'listeners.tcp.default.bind = "127.0.0.1:0"'
    else:
        source = Config(listeners=ListenersConfig(
            tcp={"default": TcpListenerConfig(bind=Bind("127.0.0.1", 0))}))

    async def main():
        async with Broker(source) as broker, ClientSet() as open_client:
            port = broker.listeners["tcp:default"].address[1]
            client = await open_client(port, version)
            connack = await client.connect("anonymous")
            assert connack.reason_code == refusal
            assert connack.session_present is False
            assert await client.receive_until_closed() == []

    run(main())


def test_an_embedded_broker_reads_the_environment_only_when_asked(monkeypatch):
    from bastionmq.app import resolve_config
    monkeypatch.setenv("BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND", "127.0.0.1:9999")
    text = 'listeners.tcp.default { bind = "127.0.0.1:0" }'
    assert Broker(text).config.listeners.tcp["default"].bind.port == 0
    assert Broker(text, env=True).config.listeners.tcp["default"].bind.port == 9999
    assert resolve_config(None).listeners.tcp == {}
