"""MQTT over WebSocket (``listeners.ws``): paho-mqtt with transport="websockets",
and a raw WebSocket client (wsproto over a socket) for what a library hides:
frame boundaries, refusals, close codes, headers."""

from __future__ import annotations

import collections
import socket
import time
import types
import zlib

import paho.mqtt.client as paho
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, RejectConnection, RejectData,
    Request, TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, Opcode, RsvBits

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Connack, Connect, Decoder, Disconnect, Publish, Pubrel, Suback, Subscribe,
    Subscription, Will, encode,
)
from bastionmq.listeners.ws import BoundedDeflate
from cluster_switch import counted, gathered, on_every_node

TIMEOUT = 10.0

WS = 'listeners.ws.default { bind = "127.0.0.1:0" }\n'


def ws_port(broker, name: str = "default") -> int:
    return broker.port_of(f"ws:{name}")


class WsClient:
    """A WebSocket client on a plain socket, driven by wsproto, speaking MQTT
    through the project's codec."""

    def __init__(self, port: int, path: str = "/mqtt", subprotocols: tuple[str, ...] = ("mqtt",),
                 headers: tuple[tuple[bytes, bytes], ...] = (), extensions: tuple = (),
                 version: int = MQTT_3_1_1, receive_buffer: int | None = None,
                 sock: socket.socket | None = None) -> None:
        """``sock``: a socket already connected to ``port`` (a TLS socket for wss)."""
        if sock is None:
            sock = socket.socket()
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.connect(("127.0.0.1", port))
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.version = version
        self.decoder = Decoder(version)
        self.pending: collections.deque = collections.deque()
        self.packets: list = []
        #: Complete binary messages received, each as its bytes.
        self.messages: list[bytes] = []
        self._message = bytearray()
        self.sock.sendall(self.ws.send(Request(
            host=f"127.0.0.1:{port}", target=path, subprotocols=list(subprotocols),
            extra_headers=list(headers), extensions=list(extensions))))
        self.response = self.next_event()
        self.body = b""
        if isinstance(self.response, RejectConnection):
            while True:
                event = self.next_event()
                assert isinstance(event, RejectData)
                self.body += event.data
                if event.body_finished:
                    break

    @property
    def accepted(self) -> bool:
        return isinstance(self.response, AcceptConnection)

    @property
    def status(self) -> int:
        return 101 if self.accepted else self.response.status_code

    def next_event(self):
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.popleft()

    # sending ------------------------------------------------------------

    def send_event(self, event) -> None:
        self.sock.sendall(self.ws.send(event))

    def send_message(self, data: bytes, finished: bool = True) -> None:
        self.send_event(BytesMessage(data=data, message_finished=finished))

    def encode(self, packet) -> bytes:
        return encode(packet, self.version)

    def send_packets(self, *packets) -> None:
        """All ``packets`` in one binary message."""
        self.send_message(b"".join(self.encode(packet) for packet in packets))

    def connect(self, client_id: str = "ws-raw", **kwargs):
        self.send_packets(Connect(client_id, self.version, **kwargs))
        return self.receive()

    # receiving ----------------------------------------------------------

    def receive(self):
        """The next MQTT packet; ConnectionError when the WebSocket closes first."""
        while not self.packets:
            event = self.next_event()
            if isinstance(event, BytesMessage):
                self._message += event.data
                if event.message_finished:
                    self.messages.append(bytes(self._message))
                    self._message.clear()
                self.packets.extend(self.decoder.feed(event.data))
            elif isinstance(event, CloseConnection):
                self.pending.appendleft(event)
                raise ConnectionError(f"WebSocket closed with {event.code}")
            else:
                raise AssertionError(f"unexpected {event!r}")
        return self.packets.pop(0)

    def close_code(self) -> int:
        """Read until the broker's close frame; its code."""
        while True:
            event = self.next_event()
            if isinstance(event, CloseConnection):
                return event.code

    def closed_by_broker(self) -> bool:
        """Whether the broker then closes the TCP connection."""
        self.sock.settimeout(TIMEOUT)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ws_clients():
    made: list[WsClient] = []

    def make(port: int, **kwargs) -> WsClient:
        client = WsClient(port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def connections_counted(broker, listener: str = "ws:default") -> int:
    """The listener's count of open connections, once the closes under way are done."""
    deadline = time.monotonic() + TIMEOUT
    while (value := sum(on_every_node(broker, lambda node: node.listeners[listener].connection_count))) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def peer_addresses(broker, client_id: str) -> list:
    return gathered(broker, lambda node: [connection.peer.address
                                          for connection in node.core.connections
                                          if connection.client_id == client_id])


# --------------------------------------------------------------------------
# paho-mqtt over WebSocket


@pytest.mark.parametrize("version", [paho.MQTTv311, paho.MQTTv5], ids=["3.1.1", "5.0"])
def test_paho_over_websocket_exchanges_qos_0_1_2_with_a_tcp_client(start_broker, clients,
                                                                   version):
    broker = start_broker(WS)
    web = clients(ws_port(broker), client_id="web", version=version, transport="websockets")
    tcp = clients(broker.port, client_id="tcp", version=version)
    assert web.reason_code == 0
    exchange_qos_0_1_2(web, tcp)


def exchange_qos_0_1_2(web, tcp) -> None:
    """Messages at each QoS both ways between a WebSocket and a tcp client."""
    assert web.subscribe("to-web/#", qos=2) == [2]
    tcp.subscribe("to-tcp/#", qos=2)
    for qos in (0, 1, 2):
        tcp.publish(f"to-web/{qos}", f"from tcp {qos}".encode(), qos=qos)
        message = web.expect()[0]
        assert (message.topic, message.payload, message.qos) == \
            (f"to-web/{qos}", f"from tcp {qos}".encode(), qos)
        web.publish(f"to-tcp/{qos}", f"from ws {qos}".encode() * 1000, qos=qos)
        message = tcp.expect()[0]
        assert (message.topic, message.payload, message.qos) == \
            (f"to-tcp/{qos}", f"from ws {qos}".encode() * 1000, qos)


def test_paho_over_websocket_gets_retained_messages(start_broker, clients):
    broker = start_broker(WS)
    publisher = clients(broker.port, client_id="pub")
    publisher.publish("status/door", b"closed", qos=1, retain=True)
    web = clients(ws_port(broker), client_id="web", transport="websockets")
    web.subscribe("status/#", qos=1)
    message = web.expect()[0]
    assert (message.topic, message.payload, message.retain) == ("status/door", b"closed", True)


def test_the_will_of_a_websocket_client_that_vanishes_is_published(start_broker, clients):
    broker = start_broker(WS)
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("wills/#", qos=1)
    web = clients(ws_port(broker), client_id="web", transport="websockets",
                  will=("wills/web", b"web gone", 1, False))
    web.stop_network()
    message = watcher.expect()[0]
    assert (message.topic, message.payload) == ("wills/web", b"web gone")


def test_paho_with_a_custom_path(start_broker, clients):
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", '
                          'websocket.mqtt_path = "/broker/mqtt" }')
    web = clients(ws_port(broker), client_id="web", transport="websockets",
                  ws_path="/broker/mqtt")
    assert web.reason_code == 0
    assert gathered(broker, lambda node: [c.peer.listener for c in node.core.connections]) == \
        ["ws:default"]


# --------------------------------------------------------------------------
# Frames


def test_a_packet_split_across_messages_and_across_fragments(start_broker, ws_clients, clients):
    broker = start_broker(WS)
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("split/#", qos=1)
    client = ws_clients(ws_port(broker))
    # CONNECT one byte per binary message ...
    for byte in client.encode(Connect("split", MQTT_3_1_1)):
        client.send_message(bytes((byte,)))
    assert isinstance(client.receive(), Connack)
    # ... and a PUBLISH as fragments of one message (continuation frames).
    publish = client.encode(Publish("split/frag", b"x" * 300, qos=0))
    for start in range(0, len(publish), 100):
        client.send_message(publish[start:start + 100], finished=start + 100 >= len(publish))
    message = watcher.expect()[0]
    assert (message.topic, message.payload) == ("split/frag", b"x" * 300)


def test_several_packets_in_one_message(start_broker, ws_clients):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker))
    client.send_packets(Connect("many", MQTT_3_1_1), Subscribe(1, [Subscription("many/t", 1)]),
                        Publish("many/t", b"to myself", qos=0))
    assert isinstance(client.receive(), Connack)
    assert isinstance(client.receive(), Suback)
    publish = client.receive()
    assert (publish.topic, publish.payload) == ("many/t", b"to myself")


@pytest.mark.parametrize(("piggyback", "messages"), [("multiple", 1), ("single", 4)])
def test_mqtt_piggyback_decides_packets_per_message(start_broker, ws_clients, clients,
                                                     piggyback, messages):
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", '
                          f'websocket.mqtt_piggyback = {piggyback} }}')
    publisher = clients(broker.port, client_id="pub")
    for name in ("a", "b", "c"):
        publisher.publish(f"kept/{name}", name.encode(), qos=1, retain=True)
    client = ws_clients(ws_port(broker))
    assert isinstance(client.connect(), Connack)
    client.messages.clear()
    # The SUBACK and the three retained messages leave in one write.
    client.send_packets(Subscribe(1, [Subscription("kept/#", 0)]))
    received = [client.receive() for _ in range(4)]
    assert isinstance(received[0], Suback)
    assert sorted(packet.payload for packet in received[1:]) == [b"a", b"b", b"c"]
    assert len(client.messages) == messages


def test_a_text_frame_is_refused_with_1003(start_broker, ws_clients):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker))
    assert isinstance(client.connect(), Connack)
    client.send_event(TextMessage(data="hello"))
    assert client.close_code() == 1003
    assert client.closed_by_broker()
    assert connections_counted(broker) == 0
    assert broker.run(lambda: len(broker.core.connections)) == 0


def test_max_frame_size_closes_with_1009(start_broker, ws_clients):
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", '
                          "websocket.max_frame_size = 200B }")
    client = ws_clients(ws_port(broker))
    assert isinstance(client.connect(), Connack)
    # At the limit is fine; one byte over is not.
    client.send_packets(Publish("t", b"x" * (200 - 5), qos=0))
    client.send_packets(Publish("t", b"x" * (200 - 4), qos=0))
    assert client.close_code() == 1009
    assert client.closed_by_broker()


def test_ping_is_answered_with_pong(start_broker, ws_clients):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker))
    assert isinstance(client.connect(), Connack)
    client.send_event(Ping(payload=b"are you there"))
    assert client.next_event() == Pong(payload=b"are you there")


def test_the_client_closes_the_websocket(start_broker, ws_clients, clients):
    broker = start_broker(WS)
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("wills/#", qos=0)
    client = ws_clients(ws_port(broker))
    assert isinstance(client.connect("leaving", will=Will("wills/leaving", b"bye")), Connack)
    client.send_event(CloseConnection(code=1000))
    assert client.close_code() == 1000  # echoed
    assert client.closed_by_broker()
    # No DISCONNECT came first: the will is published.
    assert watcher.expect()[0].payload == b"bye"


def test_the_broker_closes_the_websocket_when_it_closes_the_connection(start_broker,
                                                                       ws_clients):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker))
    client.send_packets(Subscribe(1, [Subscription("t", 0)]))  # not CONNECT first
    assert client.close_code() == 1000
    assert client.closed_by_broker()
    # A 5.0 client is told why in a DISCONNECT, which comes before the close frame.
    v5 = ws_clients(ws_port(broker), version=MQTT_5)
    assert v5.connect("twice").reason_code == 0
    v5.send_packets(Connect("twice", MQTT_5))
    disconnect = v5.receive()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x82
    assert v5.close_code() == 1000


def test_permessage_deflate_when_compress_is_on(start_broker, ws_clients):
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", '
                          "websocket.compress = true }")
    client = ws_clients(ws_port(broker), extensions=(PerMessageDeflate(),))
    assert [extension.name for extension in client.response.extensions] == ["permessage-deflate"]
    assert isinstance(client.connect(), Connack)
    client.send_packets(Subscribe(1, [Subscription("zip", 0)]), Publish("zip", b"squeeze " * 1000, qos=0))
    assert isinstance(client.receive(), Suback)
    assert client.receive().payload == b"squeeze " * 1000


def test_no_permessage_deflate_when_compress_is_off(start_broker, ws_clients):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker), extensions=(PerMessageDeflate(),))
    assert client.accepted and client.response.extensions == []
    assert isinstance(client.connect(), Connack)


def test_a_frame_inflating_beyond_the_limit_closes_with_1009(start_broker, ws_clients):
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", '
                          "websocket { compress = true, max_frame_size = 64KB } }")
    client = ws_clients(ws_port(broker), extensions=(PerMessageDeflate(),))
    assert isinstance(client.connect(), Connack)
    bomb = encode(Publish("t", bytes(10 * 1024 * 1024), qos=0), MQTT_3_1_1)
    client.send_message(bomb)  # about 10KB on the wire
    assert client.close_code() == 1009


# --------------------------------------------------------------------------
# The upgrade


def test_a_wrong_path_gets_404(start_broker, ws_clients):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker), path="/ws")
    assert client.status == 404
    assert b"/mqtt" in client.body
    assert counted(broker, lambda node: node.listeners["ws:default"].refused_upgrades) \
        == {404: 1}
    assert client.closed_by_broker()
    assert connections_counted(broker) == 0


def test_a_query_string_does_not_change_the_path(start_broker, ws_clients):
    broker = start_broker(WS)
    assert ws_clients(ws_port(broker), path="/mqtt?token=abc").accepted


def test_a_request_that_is_not_an_upgrade_gets_400(start_broker):
    broker = start_broker(WS)
    with socket.create_connection(("127.0.0.1", ws_port(broker)), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(("asked", "echoed"), [
    (("mqtt",), "mqtt"),
    (("mqttv3.1", "mqtt-v3.1.1"), "mqtt-v3.1.1"),
    (("mqtt-v5", "mqtt"), "mqtt-v5"),
])
def test_the_subprotocol_echoed_is_the_one_the_client_asked_for(start_broker, ws_clients,
                                                                asked, echoed):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker), subprotocols=asked)
    assert client.response.subprotocol == echoed
    assert isinstance(client.connect(), Connack)


def test_no_subprotocol_is_refused_when_fail_if_no_subprotocol(start_broker, ws_clients):
    broker = start_broker(WS + 'listeners.ws.lax { bind = "127.0.0.1:0", '
                               "websocket.fail_if_no_subprotocol = false }")
    assert ws_clients(ws_port(broker), subprotocols=()).status == 400
    lax = ws_clients(ws_port(broker, "lax"), subprotocols=())
    assert lax.accepted and lax.response.subprotocol is None
    assert isinstance(lax.connect(), Connack)


def test_only_unsupported_subprotocols_are_refused(start_broker, ws_clients):
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", websocket { '
                          'fail_if_no_subprotocol = false, supported_subprotocols = "mqtt" } }')
    refused = ws_clients(ws_port(broker), subprotocols=("mqtt-v5", "chat"))
    assert refused.status == 400
    assert b"supported_subprotocols" in refused.body


def test_origin_check(start_broker, ws_clients):
    broker = start_broker(
        'listeners.ws.default { bind = "127.0.0.1:0", websocket { check_origin_enable = true,'
        ' allowed_origins = ["https://app.example.com"] } }\n'
        'listeners.ws.strict { bind = "127.0.0.1:0", websocket { check_origin_enable = true,'
        ' allowed_origins = ["https://app.example.com"], allow_origin_absence = false } }')
    port = ws_port(broker)
    assert ws_clients(port, headers=((b"Origin", b"https://app.example.com"),)).accepted
    assert ws_clients(port, headers=((b"Origin", b"https://evil.example"),)).status == 403
    assert ws_clients(port).accepted  # no Origin: not a browser
    assert ws_clients(ws_port(broker, "strict")).status == 403
    assert ws_clients(ws_port(broker, "strict"),
                      headers=((b"Origin", b"https://app.example.com"),)).accepted


def test_an_anonymous_listener_lets_in_only_pages_of_this_machine_by_default(start_broker,
                                                                            ws_clients):
    # Any web page open in a browser here could otherwise read retained data
    # and publish through an anonymous listener.
    broker = start_broker(WS)
    port = ws_port(broker)
    assert ws_clients(port, headers=((b"Origin", b"https://evil.example"),)).status == 403
    for origin in (b"http://localhost:8080", b"http://127.0.0.1:5173", b"https://[::1]",
                   b"http://LOCALHOST"):
        assert ws_clients(port, headers=((b"Origin", origin),)).accepted, origin
    for origin in (b"http://localhost.evil.example", b"http://127.0.0.1.evil.example",
                   b"null", b"file://"):
        assert ws_clients(port, headers=((b"Origin", origin),)).status == 403, origin
    assert ws_clients(port).accepted  # no Origin: not a browser


def test_origins_are_not_checked_by_default_where_clients_authenticate(
        start_broker, ws_clients, passwd):
    broker = start_broker(config=WS + f"""
allow_anonymous = false
authentication = [ {{ mechanism = password_based, backend = password_file, path = "{passwd}" }} ]
""")
    assert ws_clients(ws_port(broker), headers=((b"Origin", b"https://anywhere.example"),)) \
        .accepted


def test_check_config_warns_of_an_anonymous_listener_without_an_origin_check(tmp_path):
    from click.testing import CliRunner

    from bastionmq.cli import main
    config = tmp_path / "bastionmq.conf"
    config.write_text('listeners.ws.default { bind = "127.0.0.1:0", '
                      'websocket.check_origin_enable = false }\nallow_anonymous = true\n')
    result = CliRunner().invoke(main, ["check-config", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert ("warning: ws:default: anonymous access without an Origin check" in result.stderr)


def test_x_forwarded_for_is_believed_only_from_trusted_proxies(start_broker, ws_clients):
    broker = start_broker(
        WS + 'listeners.ws.proxied { bind = "127.0.0.1:0", '
             'websocket.trusted_proxies = ["127.0.0.0/8"] }')
    forwarded = ((b"X-Forwarded-For", b"203.0.113.7"), (b"X-Forwarded-Port", b"4711"))

    direct = ws_clients(ws_port(broker), headers=forwarded)
    assert isinstance(direct.connect("direct"), Connack)
    [address] = peer_addresses(broker, "direct")
    assert address[0] == "127.0.0.1" and address[1] != 4711

    proxied = ws_clients(ws_port(broker, "proxied"), headers=forwarded)
    assert isinstance(proxied.connect("proxied"), Connack)
    assert peer_addresses(broker, "proxied") == [("203.0.113.7", 4711)]

    # What the client wrote left of the proxies' entries proves nothing: the
    # address is the rightmost one that is not a trusted proxy.
    chained = ws_clients(ws_port(broker, "proxied"), headers=(
        (b"X-Forwarded-For", b"198.51.100.1, 203.0.113.9, 127.0.0.2"),))
    assert isinstance(chained.connect("chained"), Connack)
    assert peer_addresses(broker, "chained")[0][0] == "203.0.113.9"

    garbage = ws_clients(ws_port(broker, "proxied"), headers=(
        (b"X-Forwarded-For", b"not-an-address"),))
    assert isinstance(garbage.connect("garbage"), Connack)
    assert peer_addresses(broker, "garbage")[0][0] == "127.0.0.1"


def test_the_proxy_headers_can_be_renamed(start_broker, ws_clients):
    broker = start_broker(
        'listeners.ws.default { bind = "127.0.0.1:0", websocket { '
        'trusted_proxies = ["127.0.0.1"], proxy_address_header = "X-Real-IP", '
        'proxy_port_header = "" } }')
    client = ws_clients(ws_port(broker), headers=((b"X-Real-IP", b"2001:db8::5"),
                                                  (b"X-Forwarded-For", b"203.0.113.7"),
                                                  (b"X-Forwarded-Port", b"4711")))
    assert isinstance(client.connect("real-ip"), Connack)
    [address] = peer_addresses(broker, "real-ip")
    assert address[0] == "2001:db8::5" and address[1] != 4711


def test_a_connection_without_an_upgrade_is_closed_after_the_idle_timeout(start_broker):
    broker = start_broker(WS + "mqtt.idle_timeout = 200ms")
    with socket.create_connection(("127.0.0.1", ws_port(broker)), timeout=TIMEOUT) as sock:
        assert sock.recv(65536) == b""
    assert counted(broker, lambda node: node.listeners["ws:default"].refused_upgrades) \
        == {None: 1}


def test_mqtt_5_over_raw_websocket(start_broker, ws_clients):
    broker = start_broker(WS)
    client = ws_clients(ws_port(broker), subprotocols=("mqtt",), version=MQTT_5)
    connack = client.connect("v5")
    assert isinstance(connack, Connack) and connack.reason_code == 0


@pytest.mark.one_node("a listener's max_connections is one node's")
def test_max_connections_applies(start_broker, ws_clients):
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", max_connections = 1 }')
    first = ws_clients(ws_port(broker))
    assert isinstance(first.connect("first"), Connack)
    with socket.create_connection(("127.0.0.1", ws_port(broker)), timeout=TIMEOUT) as second:
        second.sendall(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            assert second.recv(65536) == b""
        except ConnectionResetError:
            pass
    assert broker.run(lambda: broker.broker.listeners["ws:default"].refused_over_limit) == 1


def test_deflate_inflates_in_bounded_steps() -> None:
    deflate = BoundedDeflate(limit=1000)
    assert deflate.accept("permessage-deflate") is not None
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = compressor.compress(bytes(100_000)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    server = types.SimpleNamespace(client=False)
    deflate.frame_inbound_header(server, Opcode.BINARY, RsvBits(True, False, False), len(data))
    assert deflate.frame_inbound_payload_data(server, data) == CloseReason.MESSAGE_TOO_BIG


def test_plain_mqtt_on_the_websocket_port_gets_400(start_broker):
    broker = start_broker(WS)
    with socket.create_connection(("127.0.0.1", ws_port(broker)), timeout=TIMEOUT) as sock:
        sock.sendall(encode(Connect("lost", MQTT_3_1_1), MQTT_3_1_1))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert connections_counted(broker) == 0


@pytest.mark.one_node("looks at the sessions of one node")
def test_a_stalled_websocket_subscriber_gets_backpressure(start_broker, ws_clients, clients,
                                                           raw_clients):
    # The stalled subscriber holds the publisher back for 200 ms, then is
    # slow: its QoS 0 messages are dropped.
    broker = start_broker('listeners.ws.default { bind = "127.0.0.1:0", '
                          "tcp_options.high_watermark = 16KB }\n"
                          "mqtt.slow_subscriber_timeout = 200ms")
    # Subscribes, then never reads again.
    stalled = ws_clients(ws_port(broker), receive_buffer=4096)
    assert isinstance(stalled.connect("stalled"), Connack)
    stalled.send_packets(Subscribe(1, [Subscription("flood", 0)]))
    assert isinstance(stalled.receive(), Suback)
    healthy = clients(broker.port, client_id="healthy")
    healthy.subscribe("done", qos=1)
    publisher = raw_clients(broker.port)
    publisher.connect("flooder")
    batch = encode(Publish("flood", b"p" * 1024), MQTT_3_1_1) * 256
    for _ in range(40):  # 10 MB: far beyond every socket buffer on the way
        publisher.send(batch)
    healthy.publish("done", b"still served", qos=1)
    assert healthy.expect(1)[0].payload == b"still served"

    def state():
        layer = broker.core.sessions["stalled"].connection.transport
        return (broker.core.stats.dropped_qos0_backpressure,
                layer.transport.get_write_buffer_size())

    # What TCP buffers held of the flood may still be on its way in.
    deadline = time.monotonic() + 10
    while (dropped_and_buffered := broker.run(state))[0] == 0:
        assert time.monotonic() < deadline, "nothing dropped"
        time.sleep(0.05)
    dropped, buffered = dropped_and_buffered
    assert dropped > 0  # the socket's pause_writing reached the Connection
    assert buffered < 1024 * 1024


def test_frames_small_and_large_arriving_in_pieces(start_broker, ws_clients, clients):
    """Many one-packet frames in one write, and a frame larger than what is
    gathered whole (64 KiB), both cut at arbitrary points on the socket."""
    import time
    broker = start_broker(WS)
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("pieces/#", qos=0)
    client = ws_clients(ws_port(broker))
    client.send_packets(Connect("pieces", MQTT_3_1_1))
    assert isinstance(client.receive(), Connack)
    frames = b"".join(client.ws.send(BytesMessage(client.encode(
        Publish(f"pieces/{n}", str(n).encode(), qos=0)))) for n in range(50))
    big = client.ws.send(BytesMessage(client.encode(Publish("pieces/big", b"b" * 200_000))))
    stream = frames + big + frames
    for start in range(0, len(stream), 7_777):
        client.sock.sendall(stream[start:start + 7_777])
        time.sleep(0.001)
    payloads = [m.payload for m in watcher.expect(101)]
    expected = [str(n).encode() for n in range(50)]
    assert payloads == expected + [b"b" * 200_000] + expected


def pipeline_past_the_receive_maximum(client) -> list[int]:
    """101 QoS 2 PUBLISH past a Receive Maximum of 100, then PUBRELs for the
    PUBRECs; the reason codes of the DISCONNECTs read until the close."""
    client.send_packets(*(Publish("t", b"x", qos=2, packet_id=n) for n in range(1, 102)))
    time.sleep(0.3)
    for n in range(1, 101):
        client.send_packets(Pubrel(n))
    time.sleep(0.3)
    reasons = []
    while True:
        try:
            packet = client.receive()
        except ConnectionError:
            return reasons
        if isinstance(packet, Disconnect):
            reasons.append(packet.reason_code)


def test_the_close_lingers_over_websocket_too(start_broker, ws_clients):
    # As over TCP (test_e2e_protocol_strictness.py): a client still writing
    # when the broker closes reads the reason instead of a reset.
    broker = start_broker(WS + "mqtt.max_awaiting_rel = 100")
    client = ws_clients(ws_port(broker), version=MQTT_5)
    client.connect("eager")
    assert pipeline_past_the_receive_maximum(client) == [0x93]
