"""Revocation and reload on TLS listeners: CRL files, CRL distribution points,
hot reload of certificates and CRLs, revocation reaching live connections,
and connections ended with their certificate's validity."""

from __future__ import annotations

import datetime
import http.server
import logging
import itertools
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from bastionmq.broker.codec import MQTT_5, Connect, Decoder, encode
from bastionmq.listeners.crl import MAX_CRL_SIZE
from bastionmq.pki import init_pki, issue_client, issue_server, revoke
from cluster_switch import counted
from startup import startup_error
from tls_helpers import ssl_listener, tls_socket

TIMEOUT = 10.0


def _config(pki: Path, cafile: Path | None = None, extra: str = "", **options: str) -> str:
    """Mutual TLS with CRL checks on, and anonymous access for the rest."""
    options = {"verify": "verify_peer", "fail_if_no_peer_cert": "true",
               "enable_crl_check": "true", **options}
    if cafile is not None:
        options["cacertfile"] = f'"{cafile}"'
    return ssl_listener(pki, "allow_anonymous = true\n" + extra, **options)


_CLIENT_IDS = itertools.count(1)


class MqttOverTls:
    def __init__(self, port: int, pki: Path, cert: str, client_id: str | None = None,
                 cert_dir: Path | None = None) -> None:
        """Trust the server's CA in ``pki``; present ``cert`` from ``cert_dir``
        (another CA's directory) or ``pki``. Each client gets a client id of
        its own unless given one (a session belongs to one identity)."""
        client_id = client_id or f"c{next(_CLIENT_IDS)}"
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        cert_dir = cert_dir or pki
        context.load_cert_chain(cert_dir / f"{cert}.pem", cert_dir / f"{cert}.key")
        self.sock = tls_socket(port, context)
        self.decoder = Decoder(MQTT_5)
        self.sock.sendall(encode(Connect(client_id, MQTT_5), MQTT_5))
        self.connack = self.receive()

    def receive(self):
        data = self.sock.recv(4096)
        if not data:
            raise ConnectionError("closed")
        return self.decoder.feed(data)[0]

    def ping(self) -> bool:
        self.sock.sendall(b"\xc0\x00")
        return self.sock.recv(2) == b"\xd0\x00"


def _refused(port: int, pki: Path, cert: str, cert_dir: Path | None = None) -> None:
    """The broker refuses the client (its certificate), not the client the broker."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)) as info:
        MqttOverTls(port, pki, cert, cert_dir=cert_dir)
    assert not isinstance(info.value, ssl.SSLCertVerificationError), info.value


def _failures(broker) -> dict[str, int]:
    return counted(broker, lambda node: node.listeners["ssl:default"].handshake_failures)


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def pki(tmp_path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory)
    for name in ("good", "bad"):
        issue_client(directory, name)
    return directory


# CRL files -----------------------------------------------------------------------


def test_a_revoked_certificate_in_a_crl_file_is_refused(start_broker, pki):
    revoke(pki, pki / "bad.pem")
    broker = start_broker(config=_config(pki, crlfile=f'"{pki / "crl.pem"}"'))
    port = broker.port_of("ssl:default")
    assert MqttOverTls(port, pki, "good").connack.reason_code == 0
    _refused(port, pki, "bad")
    _wait(lambda: "client certificate revoked" in _failures(broker), _failures(broker))


def test_several_crls_in_one_file_for_several_cas(start_broker, pki, tmp_path):
    other = tmp_path / "other"
    init_pki(other)
    issue_client(other, "theirs")
    issue_client(other, "mine")
    revoke(other, other / "theirs.pem")
    cafile = tmp_path / "cas.pem"
    cafile.write_bytes((pki / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    crls = tmp_path / "crls.pem"
    crls.write_bytes((pki / "crl.pem").read_bytes() + (other / "crl.pem").read_bytes())
    broker = start_broker(config=_config(pki, cafile=cafile, crlfile=f'["{crls}"]'))
    port = broker.port_of("ssl:default")
    assert MqttOverTls(port, pki, "good").connack.reason_code == 0
    assert MqttOverTls(port, pki, "mine", cert_dir=other).connack.reason_code == 0
    _refused(port, pki, "theirs", cert_dir=other)


def test_no_crl_for_the_issuer_refuses_unless_soft_fail(start_broker, pki):
    hard = start_broker(config=_config(pki))
    _refused(hard.port_of("ssl:default"), pki, "good")
    _wait(lambda: "no current CRL for the client certificate's issuer" in _failures(hard),
          _failures(hard))
    soft = start_broker(config=_config(pki, extra="crl_cache.soft_fail = true"))
    assert MqttOverTls(soft.port_of("ssl:default"), pki, "good").connack.reason_code == 0


def test_a_bad_crl_file_stops_start_up(pki, tmp_path):
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
    where, what = startup_error(_config(pki, crlfile=f'"{broken}"'))
    assert where == "listeners.ssl.default.ssl_options.crlfile"
    assert str(broken) in what


# CRL distribution points ------------------------------------------------------------


class CrlServer:
    """Serves the PKI's crl.pem over HTTP; ``hold`` makes requests wait;
    ``oversize`` serves more than a CRL may be instead: ``"length"`` says so
    in Content-Length, ``"stream"`` sends it without one (until the close)."""

    def __init__(self, crl: Path) -> None:
        self.crl = crl
        self.hold = threading.Event()
        self.hold.set()
        self.requests = 0
        self.oversize: str | None = None
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests += 1
                served.hold.wait(TIMEOUT)
                if served.oversize is not None:
                    self.send_oversize(served.oversize == "length")
                    return
                body = served.crl.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def send_oversize(self, declared: bool) -> None:
                chunk = b"x" * 65536
                size = MAX_CRL_SIZE + len(chunk)
                self.send_response(200)
                if declared:
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    for _ in range(size // len(chunk)):
                        self.wfile.write(chunk)
                except OSError:
                    pass  # the broker hung up, as it should

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/ca.crl"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def crl_server(pki):
    server = CrlServer(pki / "crl.pem")
    yield server
    server.close()


@pytest.mark.one_node("each node fetches and caches for itself")
def test_the_crl_of_a_distribution_point_is_fetched_and_cached(start_broker, pki, crl_server):
    issue_client(pki, "dp-good", crl_url=crl_server.url)
    issue_client(pki, "dp-bad", crl_url=crl_server.url)
    revoke(pki, pki / "dp-bad.pem")
    broker = start_broker(config=_config(pki))
    port = broker.port_of("ssl:default")
    assert MqttOverTls(port, pki, "dp-good").connack.reason_code == 0
    _refused(port, pki, "dp-bad")
    assert MqttOverTls(port, pki, "dp-good", "again").connack.reason_code == 0
    assert crl_server.requests == 1  # fetched once, then answered from the cache


def test_an_unreachable_distribution_point_fails_hard_or_soft(start_broker, pki):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/ca.crl"
    issue_client(pki, "dp", crl_url=url)
    hard = start_broker(config=_config(pki, extra="crl_cache.http_timeout = 1s"))
    _refused(hard.port_of("ssl:default"), pki, "dp")
    soft = start_broker(config=_config(pki, extra="crl_cache { http_timeout = 1s, soft_fail = true }"))
    assert MqttOverTls(soft.port_of("ssl:default"), pki, "dp").connack.reason_code == 0


def test_a_distribution_point_that_does_not_answer_in_time_fails_the_fetch(
        start_broker, pki, crl_server, caplog):
    issue_client(pki, "dp-slow", crl_url=crl_server.url)
    crl_server.hold.clear()  # the distribution point never answers in time
    broker = start_broker(config=_config(pki, extra="crl_cache.http_timeout = 500ms"))
    with caplog.at_level(logging.WARNING, logger="bastionmq.listener"):
        _refused(broker.port_of("ssl:default"), pki, "dp-slow")
    assert f"cannot fetch the CRL at {crl_server.url}: no complete answer within 0.5s" \
        in caplog.text
    assert _failures(broker) == {"no current CRL for the client certificate's issuer": 1}


@pytest.mark.parametrize("oversize", ["length", "stream"])
def test_a_crl_larger_than_the_bound_is_not_taken(start_broker, pki, crl_server, caplog,
                                                  oversize):
    issue_client(pki, "dp-huge", crl_url=crl_server.url)
    crl_server.oversize = oversize
    broker = start_broker(config=_config(pki))
    with caplog.at_level(logging.WARNING, logger="bastionmq.listener"):
        _refused(broker.port_of("ssl:default"), pki, "dp-huge")
    assert f"cannot fetch the CRL at {crl_server.url}: " in caplog.text
    assert f"the {MAX_CRL_SIZE} " in caplog.text and "allowed for a CRL" in caplog.text


@pytest.mark.one_node("looks at one node's listener")
def test_the_listener_closes_its_http_session_when_the_broker_stops(
        start_broker, pki, crl_server):
    issue_client(pki, "dp-once", crl_url=crl_server.url)
    broker = start_broker(config=_config(pki))
    assert MqttOverTls(broker.port_of("ssl:default"), pki, "dp-once").connack.reason_code == 0
    listener = broker.broker.listeners["ssl:default"]
    session = broker.run(lambda: listener.crl_client._session)
    assert session is not None and not session.closed
    broker.stop()
    assert session.closed


def test_a_fetch_in_progress_does_not_hold_up_a_client_a_cached_crl_answers(
        start_broker, pki, tmp_path, crl_server):
    other = tmp_path / "other"
    init_pki(other)
    issue_client(other, "fetched", crl_url=f"{crl_server.url}")
    crl_server.crl = other / "crl.pem"
    cafile = tmp_path / "cas.pem"
    cafile.write_bytes((pki / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    broker = start_broker(config=_config(pki, cafile=cafile, crlfile=f'"{pki / "crl.pem"}"'))
    port = broker.port_of("ssl:default")
    crl_server.hold.clear()  # the distribution point answers only when told
    waiting: list = []
    worker = threading.Thread(target=lambda: waiting.append(
        MqttOverTls(port, pki, "fetched", "fetched", cert_dir=other)))
    worker.start()
    _wait(lambda: crl_server.requests == 1, "the fetch did not start")
    # Meanwhile a client whose issuer's CRL is held connects at once.
    assert MqttOverTls(port, pki, "good").connack.reason_code == 0
    assert not waiting
    crl_server.hold.set()
    worker.join(TIMEOUT)
    assert waiting[0].connack.reason_code == 0


# reload and live revocation ----------------------------------------------------------


@pytest.mark.one_node("each node reads the CRL again at its own watch_interval")
def test_a_crl_update_disconnects_a_connected_client_it_revokes(start_broker, pki):
    broker = start_broker(config=_config(pki, crlfile=f'"{pki / "crl.pem"}"',
                                         watch_interval="100ms"))
    port = broker.port_of("ssl:default")
    doomed = MqttOverTls(port, pki, "bad", "doomed")
    spared = MqttOverTls(port, pki, "good", "spared")
    revoke(pki, pki / "bad.pem")
    disconnect = doomed.receive()
    assert disconnect.reason_code == 0x98
    assert disconnect.properties["reason_string"] == "client certificate revoked"
    assert spared.ping()
    _refused(port, pki, "bad")


def test_new_certificates_are_used_for_new_handshakes_and_old_connections_stay(
        start_broker, pki, tmp_path):
    broker = start_broker(config=_config(pki, crlfile=f'"{pki / "crl.pem"}"'))
    port = broker.port_of("ssl:default")
    before = MqttOverTls(port, pki, "good", "before")
    first_serial = before.sock.getpeercert()["serialNumber"]
    replacement = issue_server(pki, "replacement", ["127.0.0.1"])
    shutil.copy(replacement.cert, pki / "server.pem")
    shutil.copy(replacement.key, pki / "server.key")
    assert broker.reload_tls() == {"ssl:default": True}
    after = MqttOverTls(port, pki, "good", "after")
    assert after.sock.getpeercert()["serialNumber"] != first_serial
    assert before.ping()


def test_a_broken_new_file_is_refused_and_the_old_material_keeps_serving(
        start_broker, pki, caplog):
    broker = start_broker(config=_config(pki, crlfile=f'"{pki / "crl.pem"}"',
                                         watch_interval="100ms"))
    port = broker.port_of("ssl:default")
    connected = MqttOverTls(port, pki, "good", "connected")
    with caplog.at_level(logging.ERROR, logger="bastionmq.listener"):
        (pki / "server.key").write_text("not a key\n")
        _wait(lambda: "not reloading TLS material" in caplog.text, "no reload error logged")
    assert "ssl_options.certfile" in caplog.text and "server.key" in caplog.text
    assert MqttOverTls(port, pki, "good", "new").connack.reason_code == 0
    assert connected.ping()
    assert broker.reload_tls() == {"ssl:default": False}


# certificate lifetime ----------------------------------------------------------------


def test_a_connection_ends_with_its_certificates_validity(start_broker, pki):
    now = datetime.datetime.now(datetime.timezone.utc)
    issue_client(pki, "brief", not_before=now - datetime.timedelta(minutes=1),
                 not_after=now + datetime.timedelta(seconds=2))
    broker = start_broker(config=_config(pki, crlfile=f'"{pki / "crl.pem"}"',
                                         enforce_cert_lifetime="true"))
    client = MqttOverTls(broker.port_of("ssl:default"), pki, "brief")
    assert client.connack.reason_code == 0
    client.sock.settimeout(TIMEOUT)
    disconnect = client.receive()
    assert disconnect.reason_code == 0x98
    assert disconnect.properties["reason_string"] == "client certificate expired"


def test_a_refreshed_distribution_point_crl_disconnects_whom_it_revokes(
        start_broker, pki, crl_server):
    issue_client(pki, "dp-later", crl_url=crl_server.url)
    broker = start_broker(config=_config(pki, extra="crl_cache.refresh_interval = 200ms"))
    client = MqttOverTls(broker.port_of("ssl:default"), pki, "dp-later", "later")
    assert client.connack.reason_code == 0
    revoke(pki, pki / "dp-later.pem")  # the distribution point serves the new list
    client.sock.settimeout(TIMEOUT)
    disconnect = client.receive()
    assert (disconnect.reason_code, disconnect.properties["reason_string"]) == (
        0x98, "client certificate revoked")
    assert crl_server.requests >= 2


@pytest.mark.one_node("TLS session tickets are one node's: a resumed session reaches another node")
def test_an_expired_certificate_is_refused_on_a_resumed_tls_session(start_broker, pki):
    # OpenSSL checks a certificate's dates in a full handshake only; a client
    # resuming its TLS session after the certificate expired must be refused
    # all the same.
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = now + datetime.timedelta(seconds=2)
    issue_client(pki, "short-lived", not_before=now - datetime.timedelta(minutes=1),
                 not_after=not_after)
    broker = start_broker(config=_config(pki, crlfile=f'"{pki / "crl.pem"}"'))
    port = broker.port_of("ssl:default")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(pki / "short-lived.pem", pki / "short-lived.key")
    first = tls_socket(port, context)
    first.sendall(encode(Connect("short-1", MQTT_5), MQTT_5))
    assert Decoder(MQTT_5).feed(first.recv(4096))[0].reason_code == 0
    session = first.session
    assert session is not None and session.has_ticket
    first.close()
    # The certificate's validity ends (with a margin for the clocks' second).
    time.sleep(max(0.0, (not_after - datetime.datetime.now(datetime.timezone.utc))
                   .total_seconds()) + 1.1)
    resumed = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT),
                                  server_hostname="127.0.0.1", session=session)
    try:
        assert resumed.session_reused
        with pytest.raises((ConnectionError, ssl.SSLError, OSError, IndexError)):
            resumed.sendall(encode(Connect("short-2", MQTT_5), MQTT_5))
            data = resumed.recv(4096)
            if not data:
                raise ConnectionError("closed")
            Decoder(MQTT_5).feed(data)[0]
    finally:
        resumed.close()
    _wait(lambda: _failures(broker).get("client certificate expired") == 1,
          "no failure counted for the expired certificate")
