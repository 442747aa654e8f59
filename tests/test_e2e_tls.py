"""TLS listeners with real certificates and real TLS clients: paho-mqtt,
Python's ssl, openssl s_client and mosquitto_pub / mosquitto_sub."""

from __future__ import annotations

import datetime
import itertools
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from bastionmq import Broker
from bastionmq.broker.codec import MQTT_3_1_1, Connect, Decoder, encode
from bastionmq.pki import init_pki, issue_client
from cluster_switch import counted, gathered, on_every_node
from startup import startup_error
from tls_helpers import plain_socket, ssl_listener, tls_socket
from mosquitto_peer import tool

TIMEOUT = 10.0
NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A development CA with its server certificate, the client certificates
    the tests present, and a second CA nobody trusts."""
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    issue_client(directory, "dev-1", extra_subject={"O": "Acme", "OU": "Sensors"},
                 san_dns=["dev-1.example"])
    issue_client(directory, "expired", not_before=NOW - datetime.timedelta(days=30),
                 not_after=NOW - datetime.timedelta(days=1))
    issue_client(directory, "future", not_before=NOW + datetime.timedelta(days=1),
                 not_after=NOW + datetime.timedelta(days=30))
    issue_client(directory, "server-only", extended_key_usage=["serverAuth"])
    stranger = directory / "stranger"
    init_pki(stranger)
    issue_client(stranger, "mallory")
    return directory


def _ssl_config(pki: Path, extra: str = "", **options: str) -> str:
    return ssl_listener(pki, "allow_anonymous = true\n" + extra, **options)


def _client_context(pki: Path, cert: str | None = None, directory: Path | None = None,
                    maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        base = (directory or pki) / cert
        context.load_cert_chain(f"{base}.pem", f"{base}.key")
    if maximum is not None:
        context.maximum_version = maximum
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


_CLIENT_IDS = itertools.count(1)


def _tls_connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS socket through the handshake and an MQTT CONNECT/CONNACK, with
    a client id of its own (a session belongs to one identity)."""
    tls = tls_socket(port, context)
    tls.sendall(encode(Connect(f"tls-client-{next(_CLIENT_IDS)}", MQTT_3_1_1), MQTT_3_1_1))
    packets = Decoder(MQTT_3_1_1).feed(tls.recv(1024))
    assert packets and packets[0].reason_code == 0, packets
    return tls


def _refused(port: int, context: ssl.SSLContext) -> None:
    """The handshake, or the first read after it (TLS 1.3 reports a client
    certificate refusal only then), fails."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, AssertionError)):
        _tls_connect(port, context)


def _failures(broker) -> dict[str, int]:
    return counted(broker, lambda node: node.listeners["ssl:default"].handshake_failures)


def _peer_certificates(broker) -> list:
    return gathered(broker, lambda node: [c.peer.certificate for c in node.core.connections])


def _wait_for_failure(broker, reason: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while reason not in _failures(broker):
        assert time.monotonic() < deadline, _failures(broker)
        time.sleep(0.02)


# verify / fail_if_no_peer_cert ---------------------------------------------------


def test_verify_none_asks_for_no_certificate(start_broker, pki, clients):
    broker = start_broker(config=_ssl_config(pki, verify="verify_none"))
    tls = {"ca_certs": str(pki / "ca.pem")}
    subscriber = clients(broker.port_of("ssl:default"), client_id="sub", tls=tls)
    subscriber.subscribe("t", 1)
    publisher = clients(broker.port_of("ssl:default"), client_id="pub", tls=tls,
                        version=paho.MQTTv5)
    publisher.publish("t", b"over tls", qos=1)
    assert subscriber.expect()[0].payload == b"over tls"
    # A client certificate offered anyway is not asked for, so not seen.
    _tls_connect(broker.port_of("ssl:default"), _client_context(pki, "dev-1"))
    assert _peer_certificates(broker) == [None, None, None]


def test_verify_peer_without_fail_if_no_peer_cert(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, verify="verify_peer"))
    port = broker.port_of("ssl:default")
    _tls_connect(port, _client_context(pki))               # no certificate: allowed
    _tls_connect(port, _client_context(pki, "dev-1"))      # a good one: verified
    certificates = [c for c in _peer_certificates(broker) if c is not None]
    assert [c.common_name for c in certificates] == ["dev-1"]
    # One that is sent must verify.
    _refused(port, _client_context(pki, "mallory", directory=pki / "stranger"))
    _wait_for_failure(broker, "client certificate from an unknown CA")


def test_verify_peer_with_fail_if_no_peer_cert(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, verify="verify_peer",
                                             fail_if_no_peer_cert="true"))
    port = broker.port_of("ssl:default")
    _refused(port, _client_context(pki))
    _wait_for_failure(broker, "no client certificate")
    tls = _tls_connect(port, _client_context(pki, "dev-1"))
    (certificate,) = _peer_certificates(broker)
    assert certificate.subject == "CN=dev-1,OU=Sensors,O=Acme"
    assert certificate.san_dns == ("dev-1.example",)
    assert certificate.sha256 == __import__("hashlib").sha256(
        tls.getpeercert(binary_form=False) and ssl.PEM_cert_to_DER_cert(
            (pki / "dev-1.pem").read_text())).hexdigest()
    (peer,) = gathered(broker, lambda node: [c.peer for c in node.core.connections])
    assert peer.tls and peer.tls_version == "TLSv1.3" and peer.cipher


@pytest.mark.parametrize("cert, reason", [
    ("expired", "client certificate expired"),
    ("future", "client certificate not yet valid"),
    ("server-only", "client certificate not for client use (key usage)"),
])
def test_bad_client_certificates_are_refused(start_broker, pki, cert, reason):
    broker = start_broker(config=_ssl_config(pki, verify="verify_peer",
                                             fail_if_no_peer_cert="true"))
    _refused(broker.port_of("ssl:default"), _client_context(pki, cert))
    _wait_for_failure(broker, reason)


# versions and ciphers -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_by_default(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki))
    _refused(broker.port_of("ssl:default"), _client_context(pki, maximum=ssl.TLSVersion.TLSv1_1))
    _wait_for_failure(broker, "TLS version not enabled on this listener")


def test_versions_restrict_the_protocol(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, versions="[tlsv1.2]"))
    port = broker.port_of("ssl:default")
    tls = _tls_connect(port, _client_context(pki))
    assert tls.version() == "TLSv1.2"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_when_the_operator_lists_it(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, versions="[tlsv1.2, tlsv1.1]"))
    tls = _tls_connect(broker.port_of("ssl:default"),
                       _client_context(pki, maximum=ssl.TLSVersion.TLSv1_1))
    assert tls.version() == "TLSv1.1"


@pytest.mark.parametrize("ciphers, versions, expected", [
    ('["TLS_CHACHA20_POLY1305_SHA256"]', "[tlsv1.3]", "TLS_CHACHA20_POLY1305_SHA256"),
    ('"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"', "[tlsv1.2]", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ('"ECDHE-ECDSA-CHACHA20-POLY1305"', "[tlsv1.3, tlsv1.2]", "ECDHE-ECDSA-CHACHA20-POLY1305"),
], ids=["tls1.3 suite", "iana tls1.2 name", "openssl name"])
def test_ciphers(start_broker, pki, ciphers, versions, expected):
    broker = start_broker(config=_ssl_config(pki, ciphers=ciphers, versions=versions))
    tls = _tls_connect(broker.port_of("ssl:default"), _client_context(pki))
    assert tls.cipher()[0] == expected


# what a TLS port does with bad input ----------------------------------------------


def test_plain_mqtt_to_a_tls_port_costs_only_that_connection(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki))
    port = broker.port_of("ssl:default")
    steady = _tls_connect(port, _client_context(pki))
    plain = plain_socket(port)
    plain.sendall(encode(Connect("plain", MQTT_3_1_1), MQTT_3_1_1))
    assert plain.recv(1024)[:1] in (b"\x15", b"")  # a TLS alert, then the close
    _wait_for_failure(broker, "not TLS (plain MQTT or another protocol sent to a TLS port?)")
    steady.sendall(b"\xc0\x00")  # PINGREQ
    assert steady.recv(2) == b"\xd0\x00"


def test_a_stalled_handshake_is_closed_after_handshake_timeout(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, handshake_timeout="300ms"))
    port = broker.port_of("ssl:default")
    stalled = plain_socket(port)
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, no more
    assert stalled.recv(1024) == b""
    _wait_for_failure(broker, "handshake not completed within 0.3s")
    _tls_connect(port, _client_context(pki))


# bad TLS material stops start-up ---------------------------------------------------


@pytest.mark.parametrize("options, key, message", [
    ({"certfile": '"/nonexistent/server.pem"'}, "certfile", "no such file"),
    ({"keyfile": "KEY_OF_OTHER_CA"}, "keyfile", "is not the key of the certificate"),
    ({"cacertfile": "SERVER_KEY", "verify": "verify_peer"}, "cacertfile", "cannot load"),
    ({"ciphers": '"NOT-A-CIPHER"'}, "ciphers", "unknown cipher suite 'NOT-A-CIPHER'"),
    ({"ciphers": '"ECDHE-ECDSA-AES128-GCM-SHA256"', "versions": "[tlsv1.3]"}, "ciphers",
     "no listed cipher suite belongs to a TLS version in versions"),
])
def test_bad_tls_material_stops_start_up_with_the_key_path(pki, options, key, message):
    swaps = {"KEY_OF_OTHER_CA": f'"{pki / "stranger" / "server.key"}"',
             "SERVER_KEY": f'"{pki / "server.key"}"'}
    options = {name: swaps.get(value, value) for name, value in options.items()}
    broker = Broker(_ssl_config(pki, **options) + 'listeners.tcp.default.bind = "127.0.0.1:0"')
    where, what = startup_error(broker)
    assert where == f"listeners.ssl.default.ssl_options.{key}"
    assert message in what
    assert broker.listeners == {}  # not even the tcp listener opened


# real command-line clients ---------------------------------------------------------


def test_openssl_s_client_completes_mutual_tls(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, verify="verify_peer",
                                             fail_if_no_peer_cert="true"))
    result = subprocess.run(
        [tool("openssl"), "s_client", "-connect", f"127.0.0.1:{broker.port_of('ssl:default')}",
         "-CAfile", str(pki / "ca.pem"), "-cert", str(pki / "dev-1.pem"),
         "-key", str(pki / "dev-1.key"), "-verify_return_error", "-brief"],
        input=encode(Connect("s-client", MQTT_3_1_1), MQTT_3_1_1), capture_output=True,
        timeout=TIMEOUT)
    assert b"Verification: OK" in result.stderr, result.stderr
    assert b"Protocol version: TLSv1.3" in result.stderr


def test_mosquitto_clients_over_mutual_tls(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, verify="verify_peer",
                                             fail_if_no_peer_cert="true"))
    port = str(broker.port_of("ssl:default"))
    tls = ["--cafile", str(pki / "ca.pem"), "--cert", str(pki / "dev-1.pem"),
           "--key", str(pki / "dev-1.key")]
    subscriber = subprocess.Popen(
        [tool("mosquitto_sub"), "-h", "127.0.0.1", "-p", port, "-t", "greetings", "-C", "1",
         "-W", "10", "-q", "1", *tls], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(on_every_node(broker, lambda node: len(node.core.trie))):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", port, "-t", "greetings",
                        "-m", "hello over mutual TLS", "-q", "1", "-V", "mqttv5", *tls],
                       check=True, timeout=TIMEOUT)
        out, _ = subscriber.communicate(timeout=TIMEOUT)
    finally:
        subscriber.kill()
    assert out == b"hello over mutual TLS\n"
    # Without a certificate mosquitto_pub is refused by the handshake.
    refused = subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", port, "-t", "x",
                              "-m", "x", "--cafile", str(pki / "ca.pem")],
                             capture_output=True, timeout=TIMEOUT)
    assert refused.returncode != 0


def test_a_verified_certificate_authenticates_where_anonymous_access_is_off(start_broker, pki):
    config = _ssl_config(pki, verify="verify_peer").replace("allow_anonymous = true",
                                                            "allow_anonymous = false")
    broker = start_broker(config=config)
    port = broker.port_of("ssl:default")
    _tls_connect(port, _client_context(pki, "dev-1"))
    # Without a certificate the client is anonymous, and that is off.
    sock = tls_socket(port, _client_context(pki))
    sock.sendall(encode(Connect("anonymous", MQTT_3_1_1), MQTT_3_1_1))
    assert Decoder(MQTT_3_1_1).feed(sock.recv(1024))[0].reason_code == 5


@pytest.mark.one_node("TLS session tickets are one node's: a resumed session reaches another node")
@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_sessions(start_broker, pki, reuse):
    broker = start_broker(config=_ssl_config(pki, reuse_sessions=str(reuse).lower()))
    port = broker.port_of("ssl:default")
    context = _client_context(pki)
    first = _tls_connect(port, context)  # the CONNACK read also takes TLS 1.3's tickets
    session = first.session
    again = context.wrap_socket(plain_socket(port), server_hostname="127.0.0.1",
                                session=session)
    assert again.session_reused is reuse
    again.close()


@pytest.mark.parametrize("honor, expected", [
    ("true", "ECDHE-ECDSA-AES128-GCM-SHA256"), ("false", "ECDHE-ECDSA-AES256-GCM-SHA384")])
def test_honor_cipher_order(start_broker, pki, honor, expected):
    broker = start_broker(config=_ssl_config(
        pki, versions="[tlsv1.2]", honor_cipher_order=honor,
        ciphers='["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"]'))
    context = _client_context(pki)
    context.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256")
    assert _tls_connect(broker.port_of("ssl:default"), context).cipher()[0] == expected


def test_verify_none_reads_no_ca_file(start_broker, pki):
    broker = start_broker(config=_ssl_config(pki, verify="verify_none",
                                             cacertfile='"/nonexistent/ca.pem"'))
    _tls_connect(broker.port_of("ssl:default"), _client_context(pki))


def test_an_encrypted_key_with_its_password(start_broker, pki, tmp_path):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key((pki / "server.key").read_bytes(), None)
    encrypted = tmp_path / "server-encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"open sesame")))
    broker = start_broker(config=_ssl_config(pki, keyfile=f'"{encrypted}"',
                                             password='"open sesame"'))
    _tls_connect(broker.port_of("ssl:default"), _client_context(pki))
    for password, message in (('"guess"', "cannot decrypt"), ("null", "is encrypted")):
        where, what = startup_error(_ssl_config(pki, keyfile=f'"{encrypted}"',
                                                password=password))
        assert where == "listeners.ssl.default.ssl_options.password"
        assert str(encrypted) in what and message in what
