"""The PROXY protocol (proxy_protocol = true): the parser on its own, the
broker fed headers by hand over real sockets, and Debian's HAProxy (version
2, TLS at the balancer, the client certificate's CN passed on) and nginx
(version 1) in front of the broker as operators run them."""

from __future__ import annotations

import ipaddress
import random
import queue
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from bastionmq.broker.codec import Connack, Suback, Subscribe, Subscription
from bastionmq.listeners.proxy_protocol import (
    PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS, PP2_CLIENT_SSL, PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY, PP2_TYPE_NOOP, PP2_TYPE_UNIQUE_ID, SIGNATURE_V2,
    ProxyHeader, ProxyProtocolError, parse_header, ssl_tlv, v1_header, v2_header,
)
from bastionmq.testkit import Pki, new_pki
from conftest import TIMEOUT, RawClient
from mosquitto_peer import free_port, missing, nginx_config, stop, tool, wait_for_port

MQTT_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"


def _feed_in_pieces(data: bytes, header_length: int) -> ProxyHeader:
    """Every prefix shorter than the header needs more; the whole gives it."""
    for end in range(header_length):
        assert parse_header(data[:end]) is None, end
    header = parse_header(data)
    assert header is not None
    return header


# --------------------------------------------------------------------------
# The parser


@pytest.mark.parametrize("line, family, source, destination", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 1883\r\n", "TCP4",
     ("192.0.2.7", 51234), ("198.51.100.1", 1883)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n", "TCP6",
     ("2001:db8::7", 65535), ("2001:db8::1", 0)),
    (b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n", "TCP6", ("::ffff:c000:207", 1), ("::1", 2)),
])
def test_v1_relayed_connections(line: bytes, family: str, source, destination) -> None:
    header = _feed_in_pieces(line + MQTT_CONNECT, len(line))
    assert (header.version, header.family, header.source, header.destination) == (
        1, family, source, destination)
    assert header.relayed and header.length == len(line)
    assert (line + MQTT_CONNECT)[header.length:] == MQTT_CONNECT


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"])
def test_v1_unknown_leaves_the_socket_address(line: bytes) -> None:
    header = parse_header(line + MQTT_CONNECT)
    assert header is not None
    assert (header.family, header.source, header.length) == ("UNKNOWN", None, len(line))


@pytest.mark.parametrize("data, message", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\n", "is not PROXY"),
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n", "protocol 'UDP4'"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n", "invalid address"),
    (b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n", "invalid address"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 1\r\n", "invalid port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 01 1\r\n", "invalid port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 1\r\n", "invalid port"),
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 1 1\r\n", "is not PROXY"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 1\n", "line end"),
    (b"PROXY " + b"x" * 120, "without CRLF"),
    (b"PROXY TCP4 192.0.2.\xff 198.51.100.1 1 1\r\n", "not ASCII"),
    (MQTT_CONNECT, "no PROXY protocol header"),
    (b"GET /mqtt HTTP/1.1\r\n", "no PROXY protocol header"),
])
def test_v1_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_header(data)


def test_v2_tcp4_with_every_tlv_the_broker_reads() -> None:
    data = v2_header(("192.0.2.7", 51234), ("198.51.100.1", 8883), tlvs=(
        (PP2_TYPE_ALPN, b"mqtt"),
        (PP2_TYPE_AUTHORITY, b"mqtt.example.com"),
        (PP2_TYPE_NOOP, b"\x00\x00"),
        (PP2_TYPE_UNIQUE_ID, b"\x01" * 128),
        ssl_tlv(PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0, version="TLSv1.3", cn="dev-1",
                cipher="TLS_AES_256_GCM_SHA384", sig_alg="ECDSA-SHA256", key_alg="EC256"),
        (0xE0, b"custom"),
    ))
    header = _feed_in_pieces(data + MQTT_CONNECT, len(data))
    assert header.length == len(data)
    assert (header.version, header.family, header.relayed) == (2, "TCP4", True)
    assert (header.source, header.destination) == (("192.0.2.7", 51234), ("198.51.100.1", 8883))
    assert (header.alpn, header.authority, header.unique_id) == (
        b"mqtt", "mqtt.example.com", b"\x01" * 128)
    ssl_info = header.ssl
    assert ssl_info is not None
    assert (ssl_info.version, ssl_info.cn, ssl_info.cipher, ssl_info.sig_alg,
            ssl_info.key_alg) == ("TLSv1.3", "dev-1", "TLS_AES_256_GCM_SHA384",
                                  "ECDSA-SHA256", "EC256")
    assert ssl_info.over_tls and ssl_info.certificate_verified
    assert (0xE0, b"custom") in header.tlvs


@pytest.mark.parametrize("client, verify, verified", [
    (PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0, True),
    (PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS, 0, True),  # a resumed session's certificate
    (PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 20, False),  # failed verification
    (PP2_CLIENT_SSL, 0, False),  # no certificate sent
    (PP2_CLIENT_CERT_CONN, 0, False),  # not over TLS at all
])
def test_v2_ssl_verified_means_a_certificate_sent_and_verified(client, verify, verified) -> None:
    header = parse_header(v2_header(("192.0.2.7", 1), tlvs=(ssl_tlv(client, verify, cn="x"),)))
    assert header is not None and header.ssl is not None
    assert header.ssl.certificate_verified is verified


def test_v2_tcp6() -> None:
    data = v2_header(("2001:db8::7", 40000), ("2001:db8::1", 1883))
    header = _feed_in_pieces(data, len(data))
    assert (header.family, header.source, header.destination) == (
        "TCP6", ("2001:db8::7", 40000), ("2001:db8::1", 1883))


def test_v2_local_is_the_balancer_itself() -> None:
    data = v2_header(None, tlvs=((PP2_TYPE_UNIQUE_ID, b"hc"),))
    header = _feed_in_pieces(data + MQTT_CONNECT, len(data))
    assert (header.relayed, header.source, header.unique_id) == (False, None, b"hc")
    # LOCAL with addresses: they are ignored (2.2).
    local = bytearray(v2_header(("192.0.2.7", 1)))
    local[12] = 0x20
    header = parse_header(bytes(local))
    assert header is not None and (header.relayed, header.source) == (False, None)


def test_v2_unspec_and_unix_keep_the_socket_address() -> None:
    unix = SIGNATURE_V2 + bytes((0x21, 0x31)) + (216).to_bytes(2, "big") + b"\x00" * 216
    header = parse_header(unix)
    assert header is not None and (header.family, header.source) == ("UNIX", None)
    unspec = SIGNATURE_V2 + bytes((0x21, 0x00, 0, 0))
    header = parse_header(unspec)
    assert header is not None and (header.family, header.source) == ("UNSPEC", None)


def _v2(version_command: int = 0x21, family: int = 0x11, body: bytes = b"\x00" * 12) -> bytes:
    return SIGNATURE_V2 + bytes((version_command, family)) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize("data, message", [
    (_v2(version_command=0x11), "version 1"),
    (_v2(version_command=0x31), "version 3"),
    (_v2(version_command=0x22), "unknown command 2"),
    (_v2(family=0x41), "unknown family"),
    (_v2(body=b"\x00" * 11), "shorter than its addresses"),
    (_v2(family=0x21, body=b"\x00" * 20), "shorter than its addresses"),
    (_v2(family=0x12), "datagram"),
    (_v2(body=b"\x00" * 12 + b"\x05\x00"), "truncated TLV"),
    (_v2(body=b"\x00" * 12 + b"\x05\x00\x09abc"), "past the header's end"),
    (_v2(body=b"\x00" * 12 + b"\x05\x00\x81" + b"u" * 129), "unique id of 129"),
    (_v2(body=b"\x00" * 12 + b"\x20\x00\x03abc"), "PP2_TYPE_SSL of 3 bytes"),
    (_v2(body=b"\x00" * 12 + b"\x20\x00\x08\x01\x00\x00\x00\x00\x22\x00\x05"),
     "sub-TLV 0x22 of 5 bytes"),
    (_v2(body=b"\x00" * 12 + b"\x02\x00\x02\xff\xfe"), "AUTHORITY that is not UTF-8"),
    (_v2(body=b"\x00" * 12 + b"\x20\x00\x09\x07\x00\x00\x00\x00\x22\x00\x01\xff"),
     "SSL_CN that is not UTF-8"),
])
def test_v2_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_header(data)


def test_v2_truncated_needs_more() -> None:
    data = v2_header(("192.0.2.7", 1), tlvs=((PP2_TYPE_AUTHORITY, b"example"),))
    assert all(parse_header(data[:end]) is None for end in range(len(data)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_the_parsers_error(data: bytes) -> None:
    try:
        header = parse_header(data)
    except ProxyProtocolError:
        return
    assert header is None or header.length <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300).map(lambda rest: SIGNATURE_V2 + rest))
def test_random_v2_bodies_raise_only_the_parsers_error(data: bytes) -> None:
    try:
        parse_header(data)
    except ProxyProtocolError:
        pass


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_tlvs = st.lists(st.one_of(
    st.tuples(st.just(PP2_TYPE_AUTHORITY), _text.map(str.encode)),
    st.tuples(st.just(PP2_TYPE_UNIQUE_ID), st.binary(max_size=128)),
    st.tuples(st.integers(0xE0, 0xEF), st.binary(max_size=50)),
    st.builds(lambda client, verify, cn, version: ssl_tlv(client, verify, cn=cn, version=version),
              st.integers(0, 7), st.integers(0, 2**32 - 1), st.none() | _text,
              st.none() | _text),
), max_size=5)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.tuples(_ipv4, _ipv4), st.tuples(_ipv6, _ipv6)), _port, _port, _tlvs,
       st.binary(max_size=20))
def test_any_valid_header_parses_back(addresses, sport, dport, tlvs, rest) -> None:
    (source, destination) = addresses
    for data, version in ((v1_header((source, sport), (destination, dport)), 1),
                          (v2_header((source, sport), (destination, dport), tuple(tlvs)), 2)):
        header = parse_header(data + rest)
        assert header is not None
        assert header.length == len(data) and header.version == version
        assert header.source == (str(ipaddress.ip_address(source)), sport)
        assert header.destination == (str(ipaddress.ip_address(destination)), dport)
        if version == 2:
            assert header.tlvs == tuple(tlvs)
            # Split anywhere inside the header: more is needed, never an error.
            assert parse_header(data[:len(data) // 2]) is None


# --------------------------------------------------------------------------
# The broker, headers sent by hand


def _listener(kind: str = "tcp", extra: str = "") -> str:
    return f"""
listeners.{kind}.default {{
  bind = "127.0.0.1:0"
  proxy_protocol = true
  {extra}
}}
allow_anonymous = true
"""


def _peers(broker) -> dict[str, Any]:
    return broker.run(lambda: {c.client_id: c.peer for c in broker.core.connections
                               if c.client_id})


def _raw(broker, listener: str, header: bytes, client_id: str) -> RawClient:
    sock = socket.create_connection(("127.0.0.1", broker.port_of(listener)), timeout=TIMEOUT)
    sock.sendall(header)
    client = RawClient(0, sock=sock)
    assert isinstance(client.connect(client_id), Connack)
    return client


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def _refusals(broker, listener: str) -> dict[str, int]:
    return broker.run(lambda: dict(broker.broker.listeners[listener].proxy_refusals))


def test_the_headers_address_is_the_peer(start_broker) -> None:
    broker = start_broker(config=_listener())
    one = _raw(broker, "tcp:default", v1_header(("192.0.2.7", 51234), ("127.0.0.1", 1883)),
               "v1")
    two = _raw(broker, "tcp:default", v2_header(("2001:db8::7", 40000)), "v2")
    local = _raw(broker, "tcp:default", v2_header(None), "local")
    peers = _peers(broker)
    assert peers["v1"].address == ("192.0.2.7", 51234)
    assert peers["v2"].address == ("2001:db8::7", 40000)
    assert peers["local"].address == local.sock.getsockname()  # LOCAL: the socket's own
    assert not peers["v1"].tls and peers["v1"].certificate is None
    for client in (one, two, local):
        client.close()


def test_a_header_sent_byte_by_byte(start_broker) -> None:
    broker = start_broker(config=_listener())
    sock = socket.create_connection(("127.0.0.1", broker.port_of("tcp:default")), timeout=TIMEOUT)
    header = v2_header(("192.0.2.8", 1))
    for byte in header:
        sock.sendall(bytes([byte]))
    client = RawClient(0, sock=sock)
    assert isinstance(client.connect("slow"), Connack)
    fast = _raw(broker, "tcp:default", v1_header(("192.0.2.9", 2), ("127.0.0.1", 1)), "fast")
    assert _peers(broker)["slow"].address == ("192.0.2.8", 1)
    client.close()
    fast.close()


def test_a_certificate_the_balancer_verified_is_the_clients_identity(start_broker,
                                                                     tmp_path) -> None:
    acl = tmp_path / "acl.conf"
    acl.write_text('{allow, all, all, ["devices/${cert_common_name}/#"]}.\n{deny, all}.\n')
    broker = start_broker(config=_listener() + f"""
mqtt.peer_cert_as_username = cn
authorization {{ no_match = deny, sources = [ {{ type = file, path = "{acl}" }} ] }}
""")
    tlv = ssl_tlv(PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0, version="TLSv1.3", cn="dev-1",
                  cipher="TLS_AES_128_GCM_SHA256")
    client = _raw(broker, "tcp:default", v2_header(
        ("192.0.2.7", 5000), tlvs=(tlv, (PP2_TYPE_AUTHORITY, b"mqtt.example.com"))), "device")
    peer = _peers(broker)["device"]
    assert (peer.tls, peer.tls_version, peer.cipher, peer.sni) == (
        True, "TLSv1.3", "TLS_AES_128_GCM_SHA256", "mqtt.example.com")
    assert (peer.certificate.common_name, peer.certificate.subject,
            peer.certificate.san_dns) == ("dev-1", None, ())
    assert broker.run(lambda: [c.client_info.username for c in broker.core.connections
                               if c.client_id == "device"]) == ["dev-1"]
    client.send(Subscribe(1, [Subscription("devices/dev-1/#", 0),
                              Subscription("devices/dev-2/#", 0)]))
    suback = client.receive()
    assert isinstance(suback, Suback) and suback.reason_codes == [0, 0x80]
    # Not verified (or no certificate): no identity from it.
    unverified = ssl_tlv(PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 21, cn="dev-2")
    other = _raw(broker, "tcp:default", v2_header(("192.0.2.8", 1), tlvs=(unverified,)), "x")
    assert _peers(broker)["x"].certificate is None
    client.close()
    other.close()


@pytest.mark.parametrize("payload, reason", [
    (MQTT_CONNECT, "malformed"),  # no header at all
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 1\r\n" + MQTT_CONNECT, "malformed"),
    (_v2(version_command=0x31), "malformed"),
])
def test_no_valid_header_closes_only_that_connection(start_broker, payload, reason) -> None:
    broker = start_broker(config=_listener())
    good = _raw(broker, "tcp:default", v1_header(("192.0.2.7", 1), ("127.0.0.1", 1)), "good")
    bad = socket.create_connection(("127.0.0.1", broker.port_of("tcp:default")), timeout=TIMEOUT)
    bad.sendall(payload)
    assert _closed(bad)
    assert _refusals(broker, "tcp:default") == {reason: 1}
    good.send(Subscribe(1, [Subscription("t", 0)]))
    assert isinstance(good.receive(), Suback)
    assert broker.run(lambda: broker.broker.listeners["tcp:default"].connection_count) == 1
    good.close()
    bad.close()


def test_random_headers_close_only_their_connections(start_broker) -> None:
    """Fuzz-style, over real sockets: 200 connections each send a random
    header (random bytes after a v1 or v2 signature, or none, cut anywhere,
    then the socket is shut); a client connected before keeps being served."""
    broker = start_broker(config=_listener(extra="proxy_protocol_timeout = 300ms"))
    port = broker.port_of("tcp:default")
    good = _raw(broker, "tcp:default", v1_header(("192.0.2.7", 1), ("127.0.0.1", 1)), "good")
    chance = random.Random(19)
    for _ in range(200):
        start = chance.choice((b"PROXY ", SIGNATURE_V2, b""))
        junk = start + chance.randbytes(chance.randrange(0, 300))
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            assert _closed(sock)
        good.send(Subscribe(1, [Subscription("t", 0)]))
        assert isinstance(good.receive(), Suback)
    assert broker.run(lambda: broker.broker.listeners["tcp:default"].connection_count) == 1
    good.close()


def test_a_header_not_complete_in_time_is_closed(start_broker) -> None:
    broker = start_broker(config=_listener(extra="proxy_protocol_timeout = 300ms"))
    sock = socket.create_connection(("127.0.0.1", broker.port_of("tcp:default")), timeout=TIMEOUT)
    sock.sendall(b"PROXY TCP4 192.0")
    assert _closed(sock)
    assert _refusals(broker, "tcp:default") == {"timeout": 1}
    sock.close()


def test_an_untrusted_source_is_closed_unread(start_broker) -> None:
    broker = start_broker(config=_listener(extra='proxy_protocol_trusted = ["10.0.0.0/8"]') + """
listeners.tcp.lb {
  bind = "127.0.0.1:0"
  proxy_protocol = true
  proxy_protocol_trusted = ["127.0.0.1", "::1"]
}
""")
    good = _raw(broker, "tcp:lb", v1_header(("192.0.2.7", 1), ("127.0.0.1", 1)), "good")
    sock = socket.create_connection(("127.0.0.1", broker.port_of("tcp:default")), timeout=TIMEOUT)
    sock.sendall(v1_header(("192.0.2.7", 1), ("127.0.0.1", 1)) + MQTT_CONNECT)
    assert _closed(sock)
    assert _refusals(broker, "tcp:default") == {"untrusted": 1}
    good.send(Subscribe(1, [Subscription("t", 0)]))
    assert isinstance(good.receive(), Suback)
    good.close()
    sock.close()


def test_ssl_listener_reads_the_header_before_tls(start_broker, tmp_path) -> None:
    pki = new_pki(tmp_path / "pki")
    listener = pki.ssl_listener(verify="verify_none").replace(
        'bind = "127.0.0.1:0"', 'bind = "127.0.0.1:0"\n  proxy_protocol = true')
    broker = start_broker(config=listener + "allow_anonymous = true\n")
    sock = socket.create_connection(("127.0.0.1", broker.port_of("ssl:default")), timeout=TIMEOUT)
    sock.sendall(v2_header(("203.0.113.5", 7000)))
    tls = pki.context().wrap_socket(sock, server_hostname="localhost")
    client = RawClient(0, sock=tls)
    assert isinstance(client.connect("tls"), Connack)
    peer = _peers(broker)["tls"]
    assert peer.address == ("203.0.113.5", 7000) and peer.tls and peer.tls_version
    client.close()


def test_the_keys_and_their_errors(start_broker) -> None:
    from bastionmq.config import ConfigError, load_config
    config = load_config(text=_listener("ws", 'proxy_protocol_timeout = 5s\n'
                                              'proxy_protocol_trusted = ["10.1.0.0/16"]'),
                         env={})
    block = config.listeners.ws["default"]
    assert (block.proxy_protocol, block.proxy_protocol_timeout, block.proxy_protocol_trusted) \
        == (True, 5.0, ("10.1.0.0/16",))
    default = load_config(text='listeners.ssl.default { bind = "127.0.0.1:0" }', env={})
    block = default.listeners.ssl["default"]
    assert (block.proxy_protocol, block.proxy_protocol_timeout, block.proxy_protocol_trusted) \
        == (False, 3.0, ("0.0.0.0/0", "::/0"))
    with pytest.raises(ConfigError) as error:
        load_config(text=_listener("wss", 'proxy_protocol_trusted = ["10.0.0.300"]\n'
                                          "proxy_protocol_timeout = 0s"), env={})
    paths = [where for where, _ in error.value.errors]
    assert "listeners.wss.default.proxy_protocol_trusted" in paths
    assert "listeners.wss.default.proxy_protocol_timeout" in paths
    with pytest.raises(ConfigError, match="at least one address"):
        load_config(text=_listener("tcp", "proxy_protocol_trusted = []"), env={})


# --------------------------------------------------------------------------
# Real balancers: Debian's haproxy and nginx





def _run(command: list[str], log: Path, ports: tuple[int, ...]) -> Iterator[None]:
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        for port in ports:
            wait_for_port(port, process, log)
        yield
    finally:
        stop(process)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return new_pki(tmp_path / "pki")


@pytest.fixture
def haproxy(tmp_path, pki):
    """Start HAProxy with a config of frontends (text) to the broker."""
    binary = tool("haproxy")
    combined = tmp_path / "server-combined.pem"
    server = pki.server()
    combined.write_text(server.cert.read_text() + server.key.read_text())
    runs = []

    def start(frontends: str, port: int) -> None:
        config = tmp_path / "haproxy.cfg"
        config.write_text(f"""
global
    log stderr format short local0 info

defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 60s
    timeout server 60s

{frontends.replace("@CERT@", str(combined)).replace("@CA@", str(pki.ca))}
""")
        run = _run([binary, "-db", "-f", str(config)], tmp_path / "haproxy.log", (port,))
        next(run)
        runs.append(run)

    yield start
    for run in runs:
        next(run, None)


@pytest.fixture
def nginx(tmp_path):
    """Start nginx with a stream block (text) in front of the broker."""
    binary = tool("nginx")
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    if not module.exists():
        missing("nginx's stream module is not installed: apt-get install libnginx-mod-stream")
    runs = []

    def start(servers: str, *ports: int) -> None:
        prefix = tmp_path / "nginx"
        prefix.mkdir(exist_ok=True)
        config = prefix / "nginx.conf"
        config.write_text(nginx_config(prefix, f"stream {{\n{servers}\n}}", (module,)))
        run = _run([binary, "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(config)],
                   prefix / "error.log", ports)
        next(run)
        runs.append(run)

    yield start
    for run in runs:
        next(run, None)


class PahoClient:
    """paho-mqtt from a chosen source address (127.0.0.0/8 is all loopback),
    so that the address the broker sees tells whose it is."""

    def __init__(self, port: int, source: str, client_id: str, *, tls: dict | None = None,
                 transport: str = "tcp") -> None:
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=paho.MQTTv311, transport=transport)
        if transport == "websockets":
            self.paho.ws_set_options(path="/mqtt")
        if tls is not None:
            self.paho.tls_set(**tls)
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.paho.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.paho.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)
        self.paho.connect("127.0.0.1", port, bind_address=source)
        self.paho.loop_start()
        assert self.connacks.get(timeout=TIMEOUT) == 0

    def subscribe(self, topic: str) -> list[int]:
        self.paho.subscribe(topic, 0)
        return [code.value for code in self.subacks.get(timeout=TIMEOUT)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.paho.publish(topic, payload, 0).wait_for_publish(TIMEOUT)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def paho_clients():
    made: list[PahoClient] = []

    def make(*args: Any, **kwargs: Any) -> PahoClient:
        client = PahoClient(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_haproxy_one_way_tls_send_proxy_v2(start_broker, haproxy, pki, paho_clients) -> None:
    broker = start_broker(config=_listener(extra='proxy_protocol_trusted = ["127.0.0.1"]'))
    front = free_port()
    haproxy(f"""
frontend mqtts
    bind 127.0.0.1:{front} ssl crt @CERT@
    default_backend broker
backend broker
    server b1 127.0.0.1:{broker.port_of("tcp:default")} send-proxy-v2
""", front)
    client = paho_clients(front, "127.0.0.5", "through-tls", tls={"ca_certs": str(pki.ca)})
    peer = _peers(broker)["through-tls"]
    assert peer.address == client.paho.socket().getsockname()[:2]
    assert peer.address[0] == "127.0.0.5"  # not HAProxy's 127.0.0.1
    assert peer.certificate is None


def test_haproxy_mutual_tls_passes_the_certificates_cn(start_broker, haproxy, pki,
                                                       paho_clients, tmp_path) -> None:
    acl = tmp_path / "acl.conf"
    acl.write_text('{allow, all, all, ["devices/${cert_common_name}/#"]}.\n{deny, all}.\n')
    broker = start_broker(config=_listener() + f"""
mqtt.peer_cert_as_username = cn
mqtt.peer_cert_as_clientid = cn
authorization {{ no_match = deny, sources = [ {{ type = file, path = "{acl}" }} ] }}
""")
    front = free_port()
    haproxy(f"""
frontend mqtts
    bind 127.0.0.1:{front} ssl crt @CERT@ ca-file @CA@ verify required
    default_backend broker
backend broker
    server b1 127.0.0.1:{broker.port_of("tcp:default")} send-proxy-v2-ssl-cn
""", front)
    device = pki.client("dev-1")
    client = paho_clients(front, "127.0.0.7", "claims-to-be-admin",
                          tls={"ca_certs": str(pki.ca), "certfile": str(device.cert),
                               "keyfile": str(device.key)})
    peers = _peers(broker)
    assert list(peers) == ["dev-1"]  # peer_cert_as_clientid: known as dev-1
    peer = peers["dev-1"]
    assert peer.address[0] == "127.0.0.7"
    assert peer.tls and peer.tls_version and peer.certificate.common_name == "dev-1"
    assert broker.run(lambda: [c.client_info.username for c in broker.core.connections]) \
        == ["dev-1"]
    assert client.subscribe("devices/dev-1/#") == [0]
    assert client.subscribe("devices/dev-2/#") == [0x80]
    client.publish("devices/dev-1/temp", b"21")
    assert client.messages.get(timeout=TIMEOUT).payload == b"21"


def test_nginx_stream_proxy_protocol_v1_for_tcp_and_ws(start_broker, nginx,
                                                       paho_clients) -> None:
    broker = start_broker(config=_listener() + """
listeners.ws.default {
  bind = "127.0.0.1:0"
  proxy_protocol = true
  proxy_protocol_trusted = ["127.0.0.1"]
}
""")
    tcp_front, ws_front = free_port(), free_port()
    nginx(f"""
server {{
    listen 127.0.0.1:{tcp_front};
    proxy_pass 127.0.0.1:{broker.port_of("tcp:default")};
    proxy_protocol on;
}}
server {{
    listen 127.0.0.1:{ws_front};
    proxy_pass 127.0.0.1:{broker.port_of("ws:default")};
    proxy_protocol on;
}}
""", tcp_front, ws_front)
    tcp = paho_clients(tcp_front, "127.0.0.8", "over-tcp")
    ws = paho_clients(ws_front, "127.0.0.9", "over-ws", transport="websockets")
    peers = _peers(broker)
    assert peers["over-tcp"].address == tcp.paho.socket().getsockname()[:2]
    assert peers["over-ws"].address[0] == "127.0.0.9"
    assert peers["over-ws"].listener == "ws:default"
    ws.subscribe("t")
    tcp.publish("t", b"hello")
    assert ws.messages.get(timeout=TIMEOUT).payload == b"hello"


def test_through_a_balancer_a_bad_connection_disturbs_no_one(start_broker, nginx,
                                                             paho_clients) -> None:
    broker = start_broker(config=_listener(extra='proxy_protocol_trusted = ["127.0.0.1"]'))
    front = free_port()
    nginx(f"""
server {{
    listen 127.0.0.1:{front};
    proxy_pass 127.0.0.1:{broker.port_of("tcp:default")};
    proxy_protocol on;
}}
""", front)
    client = paho_clients(front, "127.0.0.10", "steady")
    client.subscribe("t")
    # Straight to the broker, around the balancer: from an address it does
    # not trust, and (bound to 127.0.0.1, trusted) without a header.
    for source in ("127.0.0.11", "127.0.0.1"):
        sock = socket.create_connection(("127.0.0.1", broker.port_of("tcp:default")),
                                        timeout=TIMEOUT, source_address=(source, 0))
        sock.sendall(MQTT_CONNECT)
        assert _closed(sock)
        sock.close()
    assert _refusals(broker, "tcp:default") == {"untrusted": 1, "malformed": 1}
    client.publish("t", b"still here")
    assert client.messages.get(timeout=TIMEOUT).payload == b"still here"
