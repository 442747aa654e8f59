"""Fixtures: a real broker on an ephemeral loopback port, real clients.

The broker runs in its own thread with its own event loop (uvloop, as in
production), so that synchronous clients (paho-mqtt, raw sockets) can talk to
it from the test's thread exactly as remote clients would. That broker is the
one the pytest plugin gives applications (bastionmq.testkit.RunningBroker),
so the project's tests exercise it too.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
import pytest
import uvloop
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Connect, Decoder, Disconnect, MalformedPacket, Packet, encode,
)
from bastionmq.testkit import RunningBroker

# Shared test helpers (mqtt_strategies) import by name; there is no tests package.
sys.path.insert(0, str(Path(__file__).parent))
import tls_helpers  # noqa: E402
from mosquitto_peer import tool  # noqa: E402
from cluster_switch import RunningCluster  # noqa: E402

TIMEOUT = 10.0

BASE_CONFIG = """
listeners.tcp.default { bind = "127.0.0.1:0" }
allow_anonymous = true
"""


@pytest.fixture(autouse=True, scope="session")
def _data_outside_home(tmp_path_factory):
    """A broker with no node.data_dir, run from a directory without
    etc/bastionmq.conf, would keep its data in the per-user (or, for root,
    the system) directory (bastionmq.data_dir): never from the tests, nor
    from the brokers they start as processes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request) -> Callable[[Any], Any]:
    """Run a coroutine the way an application would: asyncio.run or uvloop.run."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


@pytest.fixture(autouse=True)
def _close_test_sockets():
    yield
    tls_helpers.close_all()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster-workers", type=int, default=1, metavar="N",
        help="run every broker of the start_broker and broker fixtures as N nodes of a "
             "cluster on shared ports (tests/cluster_switch.py), and only the tests that "
             "start one and are not marked one_node")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "one_node(why): what the test holds is one node's by design; "
                   "left out of a --cluster-workers run")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--cluster-workers") <= 1:
        return
    kept, left = [], []
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        starts_one = "start_broker" in fixtures or "broker" in fixtures
        (kept if starts_one and item.get_closest_marker("one_node") is None else left).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


@pytest.fixture
def start_broker(request):
    """Start brokers from a HOCON text (default: anonymous tcp on an ephemeral
    port); with --cluster-workers, each is a cluster of that many nodes."""
    running: list[Any] = []
    workers = request.config.getoption("--cluster-workers")

    def start(extra: str = "", config: Any = None, **broker_options: Any) -> Any:
        """``extra`` HOCON is appended to the base config; ``config`` replaces it;
        ``broker_options`` go to Broker (auth_methods)."""
        text = config if config is not None else BASE_CONFIG + extra
        broker = (RunningCluster(text, workers, **broker_options) if workers > 1
                  else RunningBroker(text, **broker_options))
        running.append(broker)
        return broker

    yield start
    for broker in running:
        broker.stop()


@pytest.fixture
def broker(start_broker) -> RunningBroker:
    return start_broker()


class Client:
    """A paho-mqtt client that waits for each acknowledgement, with a message queue."""

    def __init__(self, port: int, client_id: str = "", version: int = paho.MQTTv311,
                 clean: bool = True, keepalive: int = 60, will: tuple | None = None,
                 session_expiry: int | None = None, connect: bool = True,
                 username: str | None = None, password: str | None = None,
                 tls: dict[str, Any] | None = None, transport: str = "tcp",
                 ws_path: str = "/mqtt") -> None:
        self.port = port
        self.version = version
        kwargs: dict[str, Any] = {}
        if version != paho.MQTTv5:
            kwargs["clean_session"] = clean
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=version, transport=transport, **kwargs)
        if transport == "websockets":
            self.paho.ws_set_options(path=ws_path)
        self.clean = clean
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.messages: queue.Queue = queue.Queue()
        self.connacks: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.paho.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags, rc, props))
        self.paho.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)
        self.paho.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put((mid, rcs))
        if username is not None:
            self.paho.username_pw_set(username, password)
        if tls is not None:
            self.paho.tls_set(**tls)
        if will is not None:
            topic, payload, qos, retain = will
            self.paho.will_set(topic, payload, qos, retain)
        self.connack = None
        if connect:
            self.connect()

    def connect(self) -> Any:
        kwargs: dict[str, Any] = {}
        if self.version == paho.MQTTv5:
            kwargs["clean_start"] = self.clean
            if self.session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry
                kwargs["properties"] = props
        self.paho.connect("127.0.0.1", self.port, keepalive=self.keepalive, **kwargs)
        self.paho.loop_start()
        self.connack = self.connacks.get(timeout=TIMEOUT)
        return self.connack

    @property
    def session_present(self) -> bool:
        return bool(self.connack[0].session_present)

    @property
    def reason_code(self) -> int:
        return self.connack[1].value

    def subscribe(self, topic: str, qos: int = 0, **options: Any) -> list[int]:
        if options:
            from paho.mqtt.subscribeoptions import SubscribeOptions
            result, mid = self.paho.subscribe(topic, options=SubscribeOptions(qos=qos, **options))
        else:
            result, mid = self.paho.subscribe(topic, qos)
        assert result == paho.MQTT_ERR_SUCCESS
        got_mid, codes = self.subacks.get(timeout=TIMEOUT)
        assert got_mid == mid
        return [code.value for code in codes]

    def unsubscribe(self, topic: str) -> None:
        done = threading.Event()
        self.paho.on_unsubscribe = lambda *args: done.set()
        self.paho.unsubscribe(topic)
        assert done.wait(TIMEOUT)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, properties: Properties | None = None) -> None:
        info = self.paho.publish(topic, payload, qos, retain, properties)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def expect(self, count: int = 1, timeout: float = TIMEOUT) -> list:
        return [self.messages.get(timeout=timeout) for _ in range(count)]

    def expect_nothing_more(self, marker_topic: str) -> None:
        """Prove that nothing else is queued for us: publish a marker on a topic
        we subscribe to and check it is the next thing to arrive."""
        self.publish(marker_topic, b"marker", qos=1)
        message = self.messages.get(timeout=TIMEOUT)
        assert (message.topic, message.payload) == (marker_topic, b"marker"), \
            f"unexpected message {message.topic} {message.payload!r}"

    def disconnect(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()

    def stop_network(self) -> None:
        """Vanish without DISCONNECT: the broker sees a lost connection."""
        self.paho.loop_stop()
        self.paho.socket().close()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(port: int, **kwargs: Any) -> Client:
        client = Client(port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.paho.disconnect()
        finally:
            client.paho.loop_stop()


class RawClient:
    """A client on a plain socket speaking through the project's own codec,
    for exact packets and for input no well-behaved library would send."""

    def __init__(self, port: int, version: int = MQTT_3_1_1,
                 sock: socket.socket | None = None) -> None:
        """On a new connection to ``port``, or on ``sock`` (a TLS socket, say)."""
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.version = version
        self.decoder = Decoder(version)
        self.pending: list[Packet] = []

    def send(self, packet: Packet | bytes) -> None:
        data = packet if isinstance(packet, bytes) else encode(packet, self.version)
        self.sock.sendall(data)

    def connect(self, client_id: str = "raw", **kwargs: Any):
        self.send(Connect(client_id, self.version, **kwargs))
        return self.receive()

    def receive(self, timeout: float = TIMEOUT) -> Packet:
        """The next packet; raises ConnectionError when the broker closes first."""
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def receive_until_closed(self, timeout: float = TIMEOUT) -> list[Packet]:
        """Every packet until the broker closes the connection."""
        packets = []
        while True:
            try:
                packets.append(self.receive(timeout))
            except (ConnectionError, OSError):
                return packets

    def closing_reasons(self, timeout: float = TIMEOUT) -> list[int]:
        """The reason codes of what arrives until the broker closes (reason
        strings and other properties aside)."""
        return [packet.reason_code for packet in self.receive_until_closed(timeout)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_clients():
    made: list[RawClient] = []

    def make(port: int, version: int = MQTT_3_1_1) -> RawClient:
        client = RawClient(port, version)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


__all__ = ["Client", "RawClient", "RunningBroker", "MQTT_5", "MalformedPacket", "Disconnect"]


@pytest.fixture
def passwd(tmp_path) -> Path:
    """A password file written by Debian's mosquitto_passwd, unchanged:
    alice (wonderland) and bob (builder)."""
    path = tmp_path / "passwd"
    subprocess.run([tool("mosquitto_passwd"), "-c", "-b", str(path), "alice", "wonderland"],
                   check=True, capture_output=True)
    subprocess.run([tool("mosquitto_passwd"), "-b", str(path), "bob", "builder"],
                   check=True, capture_output=True)
    return path
