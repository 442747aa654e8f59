"""TLS-PSK, SNI certificates, partial chains and required key usages on TLS
listeners, with real clients (sslpsk3, Python's ssl, mosquitto_pub)."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sslpsk3 import SSLPSKContext

from bastionmq.broker.codec import MQTT_3_1_1, Connect, Decoder, encode
from bastionmq.pki import init_pki, issue_client, issue_server
from cluster_switch import counted, gathered
from startup import startup_error
from tls_helpers import ssl_listener, tls_socket
from mosquitto_peer import tool

TIMEOUT = 10.0
PSK_KEY = "1a2b3c4d5e6f708192a3b4c5d6e7f801"


def _connack(sock: ssl.SSLSocket, client_id: str = "c") -> int:
    sock.sendall(encode(Connect(client_id, MQTT_3_1_1), MQTT_3_1_1))
    return Decoder(MQTT_3_1_1).feed(sock.recv(1024))[0].reason_code


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    issue_client(directory, "client")
    issue_client(directory, "no-eku", extended_key_usage=[])
    issue_server(directory, "other", ["other.example"])
    return directory


# TLS-PSK -------------------------------------------------------------------------


def psk_listener(pki: Path, keys: Path, lines: str, **options: str) -> str:
    """An ssl listener serving TLS-PSK with the keys ``lines`` written to ``keys``."""
    keys.write_text(lines)
    return ssl_listener(pki, f'psk_authentication {{ enable = true, init_file = "{keys}" }}',
                        **options)


@pytest.fixture
def psk_broker(start_broker, pki, tmp_path):
    return start_broker(config=psk_listener(
        pki, tmp_path / "psk.txt", f"# identities\nsensor-9:{PSK_KEY}\n\nother:00ff\n",
        ciphers='["PSK-AES128-GCM-SHA256", "PSK-AES256-GCM-SHA384"]', psk_hint='"bastionmq"'))


def _psk_context(identity: str, key: str) -> SSLPSKContext:
    context = SSLPSKContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("PSK")
    context.set_psk_client_callback(lambda hint: (identity, bytes.fromhex(key)))
    return context


def test_psk_without_the_extra_stops_start_up_naming_it(pki, tmp_path, monkeypatch):
    """sslpsk3 is the psk extra: without it, a PSK configuration is refused."""
    monkeypatch.setitem(sys.modules, "sslpsk3", None)  # import sslpsk3 fails
    monkeypatch.delitem(sys.modules, "bastionmq.listeners.psk", raising=False)
    where, what = startup_error(psk_listener(
        pki, tmp_path / "psk.txt", f"sensor-9:{PSK_KEY}\n", ciphers='["PSK-AES128-GCM-SHA256"]'))
    assert where == "psk_authentication.enable"
    assert "pip install 'bastionmq[psk]'" in what


def _failures(broker) -> dict[str, int]:
    return counted(broker, lambda node: node.listeners["ssl:default"].handshake_failures)


def test_a_psk_client_connects_and_is_known_by_its_identity(psk_broker):
    sock = tls_socket(psk_broker.port_of("ssl:default"), _psk_context("sensor-9", PSK_KEY))
    assert sock.cipher()[0].startswith("PSK-")
    assert _connack(sock) == 0
    peers = gathered(psk_broker, lambda node: [(c.peer.psk_identity, c.username)
                                               for c in node.core.connections])
    assert peers == [("sensor-9", "sensor-9")]


@pytest.mark.parametrize("identity, key", [("sensor-9", "00" * 16), ("nobody", PSK_KEY)],
                         ids=["wrong key", "unknown identity"])
def test_a_wrong_psk_fails_the_handshake(psk_broker, identity, key):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connack(tls_socket(psk_broker.port_of("ssl:default"), _psk_context(identity, key)))
    reason = ("unknown PSK identity" if identity == "nobody"
              else "wrong key (PSK) or corrupted handshake")
    deadline = time.monotonic() + TIMEOUT
    while _failures(psk_broker) != {reason: 1}:
        assert time.monotonic() < deadline, _failures(psk_broker)
        time.sleep(0.02)


def test_mosquitto_pub_over_psk(psk_broker):
    result = subprocess.run(
        [tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(psk_broker.port_of("ssl:default")),
         "--psk", PSK_KEY, "--psk-identity", "sensor-9", "--ciphers", "PSK-AES128-GCM-SHA256",
         "--tls-version", "tlsv1.2", "-t", "psk/hello", "-m", "hi", "-q", "1"],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr


def test_a_bad_psk_file_line_stops_start_up(pki, tmp_path):
    keys = tmp_path / "psk.txt"
    where, what = startup_error(psk_listener(
        pki, keys, f"good:{PSK_KEY}\nbad-line-without-key\n",
        ciphers='"PSK-AES128-GCM-SHA256"'))
    assert where == "psk_authentication.init_file"
    assert f"{keys}:2" in what


# SNI -------------------------------------------------------------------------------


def test_the_certificate_follows_the_name_the_client_asks_for(start_broker, pki):
    broker = start_broker(config=ssl_listener(pki, "allow_anonymous = true", server_names=(
        f'[ {{ names = ["other.example"], certfile = "{pki / "other.pem"}", '
        f'keyfile = "{pki / "other.key"}" }} ]')))
    port = broker.port_of("ssl:default")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    named = tls_socket(port, context, server_hostname="other.example")
    assert dict(x[0] for x in named.getpeercert()["subject"])["commonName"] == "other.example"
    assert _connack(named, "named") == 0
    default = tls_socket(port, context)  # asks for 127.0.0.1: the default certificate
    assert dict(x[0] for x in default.getpeercert()["subject"])["commonName"] == "localhost"
    snis = sorted(gathered(broker, lambda node: [str(c.peer.sni) for c in node.core.connections]))
    assert snis == ["None", "other.example"]


# partial_chain and verify_peer_ext_key_usage ---------------------------------------


def _intermediate(pki: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An intermediate CA under the development CA, and a client it issued;
    returns (intermediate.pem, client stem)."""
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(subject: str, issuer_name, signer, is_ca: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        if is_ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
        return key, builder.sign(signer, hashes.SHA256())

    inter_key, inter = make("intermediate", ca_cert.subject, ca_key, True)
    client_key, client = make("deep", inter.subject, inter_key, False)
    pem = serialization.Encoding.PEM
    (tmp_path / "intermediate.pem").write_bytes(inter.public_bytes(pem))
    # The client sends its chain: its own certificate, then the intermediate.
    (tmp_path / "deep.pem").write_bytes(client.public_bytes(pem) + inter.public_bytes(pem))
    (tmp_path / "deep.key").write_bytes(client_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "intermediate.pem", tmp_path / "deep"


def _client(pki: Path, stem: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(f"{stem}.pem", f"{stem}.key")
    return context


def test_partial_chain_trusts_an_intermediate_listed_alone(start_broker, pki, tmp_path):
    intermediate, deep = _intermediate(pki, tmp_path)
    options = {"cacertfile": f'"{intermediate}"', "verify": "verify_peer",
               "fail_if_no_peer_cert": "true"}
    strict = start_broker(config=ssl_listener(pki, "allow_anonymous = true", **options))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connack(tls_socket(strict.port_of("ssl:default"), _client(pki, deep)))
    partial = start_broker(config=ssl_listener(pki, "allow_anonymous = true", partial_chain="true",
                                            **options))
    assert _connack(tls_socket(partial.port_of("ssl:default"), _client(pki, deep))) == 0


def test_depth_limits_the_intermediates(start_broker, pki, tmp_path):
    _, deep = _intermediate(pki, tmp_path)
    options = {"verify": "verify_peer", "fail_if_no_peer_cert": "true"}
    one = start_broker(config=ssl_listener(pki, "allow_anonymous = true", depth="1", **options))
    assert _connack(tls_socket(one.port_of("ssl:default"), _client(pki, deep))) == 0
    none = start_broker(config=ssl_listener(pki, "allow_anonymous = true", depth="0", **options))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connack(tls_socket(none.port_of("ssl:default"), _client(pki, deep)))
    assert _failures(none) == {
        "client certificate chain too long (depth)": 1}


def test_a_required_extended_key_usage(start_broker, pki):
    broker = start_broker(config=ssl_listener(
        pki, "allow_anonymous = true", verify="verify_peer", fail_if_no_peer_cert="true",
        verify_peer_ext_key_usage="clientAuth"))
    port = broker.port_of("ssl:default")
    assert _connack(tls_socket(port, _client(pki, pki / "client"))) == 0
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, IndexError)):
        _connack(tls_socket(port, _client(pki, pki / "no-eku")))
    assert _failures(broker) == {
        "client certificate lacks the extended key usage clientAuth": 1}
