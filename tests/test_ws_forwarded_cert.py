"""A client certificate forwarded by a TLS-terminating reverse proxy in a
header of the WebSocket upgrade (``websocket.proxy_client_cert``): the XFCC
and escaped-PEM parsers on their own, raw upgrade requests from trusted and
untrusted addresses, and Debian's nginx as the HTTPS reverse proxy in front
of a ws listener."""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import ssl
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bastionmq.broker.codec import MQTT_5, Connack
from bastionmq.config import ConfigError, load_config
from bastionmq.listeners.forwarded_cert import (
    ForwardedCertError, ForwardedCertSettings, escaped_pem_certificate, parse_xfcc,
    xfcc_certificate,
)
from bastionmq.listeners.settings import ProxyClientCertOptions
from bastionmq.testkit import Pki, new_pki
from conftest import TIMEOUT
from mosquitto_peer import free_port, nginx_config, stop, tool, wait_for_port
from test_e2e_ws import WsClient


@pytest.fixture
def pki(tmp_path) -> Pki:
    return new_pki(tmp_path / "pki")


def _escaped(path: Path) -> str:
    """A certificate file as nginx's $ssl_client_escaped_cert writes it."""
    return urllib.parse.quote(path.read_text(), safe="")


def _sha256(path: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


# --------------------------------------------------------------------------
# The parsers


def test_xfcc_elements_pairs_and_quoting() -> None:
    text = ('By=spiffe://cluster.local/ns/a;Hash=abc;Subject="CN=dev-1,O=Acme \\"Corp\\"";'
            'URI=spiffe://x;DNS=a.example;DNS=b.example, '
            'By=spiffe://cluster.local/ns/b;hash=def;Subject=""')
    first, second = parse_xfcc(text)
    assert first == {"by": ["spiffe://cluster.local/ns/a"], "hash": ["abc"],
                     "subject": ['CN=dev-1,O=Acme "Corp"'], "uri": ["spiffe://x"],
                     "dns": ["a.example", "b.example"]}
    assert second == {"by": ["spiffe://cluster.local/ns/b"], "hash": ["def"], "subject": [""]}
    # A comma, semicolon or equals sign inside quotes is part of the value.
    assert parse_xfcc('Subject="a;b,c=d"') == [{"subject": ["a;b,c=d"]}]


@pytest.mark.parametrize("text", [
    "", " ", "Cert", "=x", "Cert=\"abc", "Cert=\"abc\\", "By=a;;Cert=b", "By=a,", "By=a;",
    'By="a"x', 'By=a"b', "B y=a",
])
def test_xfcc_malformed(text: str) -> None:
    with pytest.raises(ForwardedCertError):
        parse_xfcc(text)


def test_xfcc_certificate_is_the_first_elements(pki) -> None:
    device, proxy = pki.client("dev-1", san_dns=["dev-1.example"]), pki.client("edge-proxy")
    text = (f'Hash={_sha256(device.cert)};Cert="{_escaped(device.cert)}";'
            f'Subject="CN=dev-1";DNS=dev-1.example,'
            f'By=spiffe://inner;Hash={_sha256(proxy.cert)};Cert="{_escaped(proxy.cert)}"')
    certificate = xfcc_certificate(text)
    assert certificate.common_name == "dev-1"
    assert certificate.subject is not None and "CN=dev-1" in certificate.subject
    assert certificate.san_dns == ("dev-1.example",)
    assert certificate.sha256 == _sha256(device.cert)
    assert certificate.der == ssl.PEM_cert_to_DER_cert(device.cert.read_text())
    # Unquoted works too (the escaped PEM has no separators in it).
    assert xfcc_certificate(f"Cert={_escaped(device.cert)}").common_name == "dev-1"


def test_xfcc_certificate_refusals(pki) -> None:
    device = pki.client("dev-1")
    cert = _escaped(device.cert)
    for text, words in [
        ("By=spiffe://x;Hash=abc", "no Cert"),
        (f'Cert="{cert}";Cert="{cert}"', "2 Cert"),
        (f'By=x,Cert="{cert}"', "no Cert"),  # the client's is the first element's
        (f'Hash={"0" * 64};Cert="{cert}"', "Hash is not the SHA-256"),
        ('Cert="%ZZnot-pem"', "not one PEM certificate"),
        ('Cert="' + "A" * 5000, "not valid"),
    ]:
        with pytest.raises(ForwardedCertError, match=words) as caught:
            xfcc_certificate(text)
        assert "AAAA" not in str(caught.value) and "BEGIN" not in str(caught.value)


def test_escaped_pem(pki) -> None:
    device = pki.client("dev-1")
    assert escaped_pem_certificate(_escaped(device.cert)).common_name == "dev-1"
    pem = device.cert.read_text()
    two = urllib.parse.quote(pem + pem, safe="")
    broken = urllib.parse.quote(pem.replace("M", "*", 3), safe="")
    not_der = urllib.parse.quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for text in (two, broken, not_der, "%C3%28", "", urllib.parse.quote(pem[:200])):
        with pytest.raises(ForwardedCertError):
            escaped_pem_certificate(text)


def _settings(**options: Any) -> ForwardedCertSettings:
    settings = ForwardedCertSettings.of(ProxyClientCertOptions(
        enable=True, trusted=("127.0.0.1/32",), **options))
    assert settings is not None
    return settings


def test_verify_header(pki) -> None:
    settings = _settings(header="x-ssl-client-cert", format="pem_escaped",
                         verify_header="x-ssl-client-verify")
    cert = _escaped(pki.client("dev-1").cert).encode()
    ok = settings.certificate([(b"x-ssl-client-cert", cert), (b"x-ssl-client-verify", b"SUCCESS")])
    assert ok is not None and ok.common_name == "dev-1"
    assert settings.certificate([(b"x-ssl-client-verify", b"NONE")]) is None
    assert settings.certificate([]) is None
    for verdict in ([(b"x-ssl-client-verify", b"FAILED:certificate has expired")], []):
        with pytest.raises(ForwardedCertError) as caught:
            settings.certificate([(b"x-ssl-client-cert", cert), *verdict])
        assert caught.value.status == 403
    with pytest.raises(ForwardedCertError) as caught:
        settings.certificate([(b"x-ssl-client-verify", b"SUCCESS")])
    assert caught.value.status == 400
    with pytest.raises(ForwardedCertError, match="2 x-ssl-client-cert"):
        _settings(header="x-ssl-client-cert", format="pem_escaped").certificate(
            [(b"x-ssl-client-cert", cert), (b"x-ssl-client-cert", cert)])


def test_trust_is_by_the_sockets_peer() -> None:
    settings = _settings()
    assert settings.trusts(("127.0.0.1", 5000))
    assert settings.trusts(("::ffff:127.0.0.1", 5000, 0, 0))
    assert not settings.trusts(("127.0.0.2", 5000))
    assert not settings.trusts(None) and not settings.trusts("/tmp/socket")
    assert ForwardedCertSettings.of(ProxyClientCertOptions()) is None


def test_config_keys_and_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text='listeners.ws.default { bind = "127.0.0.1:0", '
                         'websocket.proxy_client_cert { enable = true } }')
    assert "listeners.ws.default.websocket.proxy_client_cert" in str(caught.value)
    assert "needs trusted" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(text='listeners.ws.default { bind = "127.0.0.1:0", '
                         'websocket.proxy_client_cert { format = pem, header = "a b", '
                         'trusted = ["nowhere"] } }')
    message = str(caught.value)
    for key in ("format", "header", "trusted"):
        assert f"listeners.ws.default.websocket.proxy_client_cert.{key}" in message
    config = load_config(text='listeners.wss.default { bind = "127.0.0.1:0", '
                              'ssl_options { verify = verify_none }, '
                              'websocket.proxy_client_cert { enable = true, '
                              'trusted = ["10.0.0.5"] } }')
    options = config.listeners.wss["default"].websocket.proxy_client_cert
    assert options.enable and options.trusted == ("10.0.0.5",) and options.format == "xfcc"


# --------------------------------------------------------------------------
# The broker, upgrade requests sent by hand


def _ws_config(acl: Path, block: str) -> str:
    return f"""
listeners.ws.default {{
  bind = "127.0.0.1:0"
  websocket.proxy_client_cert {{ {block} }}
}}
allow_anonymous = true
mqtt.peer_cert_as_username = cn
mqtt.peer_cert_as_clientid = dn
authorization {{ no_match = deny, sources = [ {{ type = file, path = "{acl}" }} ] }}
"""


@pytest.fixture
def acl(tmp_path) -> Path:
    path = tmp_path / "acl.conf"
    path.write_text('{allow, all, all, ["devices/${cert_common_name}/#"]}.\n'
                    '{allow, all, subscribe, ["anyone/#"]}.\n{deny, all}.\n')
    return path


def _peers(broker) -> dict[str, Any]:
    return broker.run(lambda: {c.client_id: c.peer for c in broker.core.connections
                               if c.client_id})


_SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


def _upgrade(broker, source: str, headers: list[tuple[bytes, bytes]]) -> WsClient:
    port = broker.port_of("ws:default")
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                    source_address=(source, 0))
    _SOCKETS.append(sock)
    return WsClient(port, headers=tuple(headers), sock=sock, version=MQTT_5)


def _listener(broker):
    return broker.broker.listeners["ws:default"]


def test_xfcc_from_a_trusted_proxy_is_the_clients_certificate(start_broker, pki, acl) -> None:
    broker = start_broker(config=_ws_config(acl, 'enable = true, trusted = ["127.0.0.1/32"]'))
    device, other = pki.client("dev-1"), pki.client("dev-2")
    header = (f'By=spiffe://edge;Hash={_sha256(device.cert)};Cert="{_escaped(device.cert)}";'
              f'Subject="CN=dev-1",By=spiffe://inner;Cert="{_escaped(other.cert)}"')
    client = _upgrade(broker, "127.0.0.1", [(b"X-Forwarded-Client-Cert", header.encode())])
    assert client.accepted
    assert isinstance(client.connect("claims-to-be-admin"), Connack)
    peers = _peers(broker)
    assert list(peers) == [peers[next(iter(peers))].certificate.subject]  # clientid = dn
    peer = next(iter(peers.values()))
    assert peer.certificate.common_name == "dev-1" and peer.tls
    assert peer.certificate.sha256 == _sha256(device.cert)
    assert broker.run(lambda: [c.client_info.username for c in broker.core.connections]) \
        == ["dev-1"]


def test_a_header_from_an_untrusted_address_is_ignored(start_broker, pki, acl) -> None:
    broker = start_broker(config=_ws_config(
        acl, 'enable = true, trusted = ["127.0.0.1/32"], header = "x-ssl-client-cert", '
             'format = pem_escaped'))
    forged = _escaped(pki.client("dev-1").cert).encode()
    clients = [_upgrade(broker, "127.0.0.2", [(b"x-ssl-client-cert", forged)])
               for _ in range(3)]
    for index, client in enumerate(clients):
        assert client.accepted
        assert isinstance(client.connect(f"direct-{index}"), Connack)
    peers = _peers(broker)
    assert sorted(peers) == ["direct-0", "direct-1", "direct-2"]  # not renamed by dn
    assert all(peer.certificate is None for peer in peers.values())
    assert broker.run(lambda: _listener(broker).forwarded_certificates_ignored) == 3
    metrics = broker.run(lambda: _listener(broker).refused_upgrades)
    assert not metrics


def test_a_malformed_header_from_a_trusted_proxy_refuses_the_upgrade(start_broker, pki, acl,
                                                                     caplog) -> None:
    caplog.set_level(logging.INFO, logger="bastionmq.listener")
    broker = start_broker(config=_ws_config(
        acl, 'enable = true, trusted = ["127.0.0.1/32"], header = "x-ssl-client-cert", '
             'format = pem_escaped, verify_header = "x-ssl-client-verify"'))
    secret = "-----BEGIN%20CERTIFICATE-----%0Anot-base64-SECRET%0A-----END%20CERTIFICATE-----"
    client = _upgrade(broker, "127.0.0.1", [(b"x-ssl-client-cert", secret.encode()),
                                            (b"x-ssl-client-verify", b"SUCCESS")])
    assert client.status == 400
    assert b"x-ssl-client-cert is not one PEM certificate" in client.body
    unverified = _upgrade(broker, "127.0.0.1", [
        (b"x-ssl-client-cert", _escaped(pki.client("dev-1").cert).encode()),
        (b"x-ssl-client-verify", b"FAILED:unable to verify the first certificate")])
    assert unverified.status == 403
    assert broker.run(lambda: dict(_listener(broker).refused_upgrades)) == {400: 1, 403: 1}
    assert "SECRET" not in caplog.text
    assert "not one PEM certificate" in caplog.text


# --------------------------------------------------------------------------
# nginx as the HTTPS reverse proxy




@pytest.fixture
def nginx(tmp_path, pki) -> Iterator[Any]:
    """Start nginx as an HTTPS reverse proxy (mutual TLS) to a ws listener;
    yields start(upstream_port) -> the port it listens on."""
    binary = tool("nginx")
    processes: list[subprocess.Popen] = []

    def start(upstream: int) -> int:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        front = free_port()
        server = pki.server()
        (prefix / "nginx.conf").write_text(nginx_config(prefix, f"""
http {{
    access_log off;
    client_body_temp_path {prefix};
    proxy_temp_path {prefix};
    fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix};
    scgi_temp_path {prefix};
    server {{
        listen 127.0.0.1:{front} ssl;
        ssl_certificate {server.cert};
        ssl_certificate_key {server.key};
        ssl_client_certificate {pki.ca};
        ssl_verify_client on;
        location /mqtt {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
            proxy_set_header X-SSL-Client-Verify $ssl_client_verify;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""))
        log = prefix / "error.log"
        with open(prefix / "stderr.log", "wb") as output:
            process = subprocess.Popen(
                [binary, "-e", str(log), "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                stdout=output, stderr=subprocess.STDOUT)
        processes.append(process)
        wait_for_port(front, process, log)
        return front

    yield start
    for process in processes:
        stop(process)


class WssClient:
    """paho-mqtt over wss, through nginx, with a client certificate."""

    def __init__(self, port: int, client_id: str, pki: Pki, cert: Path, key: Path) -> None:
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=paho.MQTTv311, transport="websockets")
        self.paho.ws_set_options(path="/mqtt")
        self.paho.tls_set(ca_certs=str(pki.ca), certfile=str(cert), keyfile=str(key))
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.paho.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.paho.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)
        self.paho.connect("127.0.0.1", port)
        self.paho.loop_start()
        assert self.connacks.get(timeout=TIMEOUT) == 0

    def subscribe(self, topic: str) -> list[int]:
        self.paho.subscribe(topic, 0)
        return [code.value for code in self.subacks.get(timeout=TIMEOUT)]

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def test_nginx_forwards_the_certificate(start_broker, nginx, pki, acl) -> None:
    broker = start_broker(config=_ws_config(
        acl, 'enable = true, trusted = ["127.0.0.1/32"], header = "x-ssl-client-cert", '
             'format = pem_escaped, verify_header = "x-ssl-client-verify"')
        + 'listeners.ws.default.websocket.trusted_proxies = ["127.0.0.1/32"]\n')
    front = nginx(broker.port_of("ws:default"))
    device = pki.client("dev-1", extra_subject={"O": "Acme"})
    client = WssClient(front, "claims-to-be-admin", pki, device.cert, device.key)
    try:
        peers = _peers(broker)
        assert len(peers) == 1
        (client_id, peer), = peers.items()
        assert peer.certificate.common_name == "dev-1"
        assert client_id == peer.certificate.subject  # peer_cert_as_clientid = dn
        assert "O=Acme" in client_id and "CN=dev-1" in client_id
        assert peer.certificate.sha256 == _sha256(device.cert)
        assert broker.run(lambda: [c.client_info.username for c in broker.core.connections]) \
            == ["dev-1"]
        # ${cert_common_name} in the ACL: its own topics only.
        assert client.subscribe("devices/dev-1/#") == [0]
        assert client.subscribe("devices/dev-2/#") == [0x80]
        assert broker.run(lambda: _listener(broker).forwarded_certificates_ignored) == 0
    finally:
        client.close()
