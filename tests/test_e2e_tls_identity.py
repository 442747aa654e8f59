"""A client's identity from its verified certificate (peer_cert_as_username,
peer_cert_as_clientid, peer_cert_identity), over real TLS connections."""

from __future__ import annotations

import base64
import hashlib
import ssl
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import MQTT_5, Connect, Decoder, encode
from bastionmq.pki import init_pki, issue_client
from cluster_switch import gathered
from tls_helpers import tls_socket


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    issue_client(directory, "dev-1", extra_subject={"O": "Acme", "OU": "Sensors"})
    issue_client(directory, "rich", san_dns=["a.example", "b.example"],
                 san_uri=["https://x.example/", "spiffe://acme/sensor/7"],
                 san_email=["d@example.com"], san_ip=["10.0.0.7"])
    issue_client(directory, "evil\nCN=admin", output=directory / "evil")
    return directory


def _config(pki: Path, mqtt: str = "", listener: str = "") -> str:
    return f"""
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  {listener}
  ssl_options {{
    cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
    keyfile = "{pki / 'server.key'}", verify = verify_peer
  }}
}}
allow_anonymous = true
mqtt {{ {mqtt} }}
"""


def _connect(broker, pki: Path, cert: str | None, client_id: str = "sent-id",
             username: str | None = "sent-user"):
    """CONNECT over TLS as a 5.0 client presenting ``cert``; returns the CONNACK."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    tls = tls_socket(broker.port_of("ssl:default"), context)
    tls.sendall(encode(Connect(client_id, MQTT_5, username=username), MQTT_5))
    return Decoder(MQTT_5).feed(tls.recv(4096))[0]


def _identities(broker) -> list[tuple[str, str | None]]:
    return sorted(gathered(broker, lambda node: [(c.client_id, c.username)
                                                 for c in node.core.connections if c.client_id]))


def test_a_device_is_held_to_its_certificate_whatever_username_it_claims(start_broker, pki,
                                                                         clients):
    broker = start_broker(config=_config(pki, "peer_cert_as_username = cn"))
    tls = {"ca_certs": str(pki / "ca.pem"), "certfile": str(pki / "dev-1.pem"),
           "keyfile": str(pki / "dev-1.key")}
    clients(broker.port_of("ssl:default"), client_id="device", username="admin",
            password="guess", tls=tls, version=paho.MQTTv5)
    assert _identities(broker) == [("device", "dev-1")]


def _der(pki: Path, name: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert((pki / f"{name}.pem").read_text())


@pytest.mark.parametrize("source, cert, expected", [
    ("cn", "dev-1", lambda pki: "dev-1"),
    ("dn", "dev-1", lambda pki: "CN=dev-1,OU=Sensors,O=Acme"),
    ("crt", "dev-1", lambda pki: ssl.DER_cert_to_PEM_cert(_der(pki, "dev-1"))),
    ("pem", "dev-1", lambda pki: base64.b64encode(_der(pki, "dev-1")).decode()),
    ("md5", "dev-1", lambda pki: hashlib.md5(_der(pki, "dev-1")).hexdigest()),
    ("sha256", "dev-1", lambda pki: hashlib.sha256(_der(pki, "dev-1")).hexdigest()),
    ("san_dns", "rich", lambda pki: "a.example"),
    ("san_dns:1", "rich", lambda pki: "b.example"),
    ("san_uri", "rich", lambda pki: "https://x.example/"),
    ("san_email", "rich", lambda pki: "d@example.com"),
    ("san_ip", "rich", lambda pki: "10.0.0.7"),
    ("spiffe_id", "rich", lambda pki: "spiffe://acme/sensor/7"),
])
def test_every_certificate_source(start_broker, pki, source, cert, expected):
    broker = start_broker(config=_config(
        pki, f'peer_cert_as_username = "{source}", peer_cert_as_clientid = "{source}"'))
    connack = _connect(broker, pki, cert)
    value = expected(pki)
    assert connack.reason_code == 0
    # Assigned Client Identifier is only for clients that sent no identifier.
    assert "assigned_client_identifier" not in connack.properties
    assert _identities(broker) == [(value, value)]


def test_a_client_that_sent_no_identifier_is_told_its_certificate_identity(start_broker, pki):
    broker = start_broker(config=_config(pki, "peer_cert_as_clientid = cn"))
    connack = _connect(broker, pki, "dev-1", client_id="")
    assert connack.properties["assigned_client_identifier"] == "dev-1"


@pytest.mark.parametrize("source, field, reason", [
    ("san_uri:5", "username", 0x86),
    ("san_email", "clientid", 0x85),
])
def test_a_certificate_without_the_value_is_refused(start_broker, pki, source, field, reason):
    broker = start_broker(config=_config(pki, f'peer_cert_as_{field} = "{source}"'))
    assert _connect(broker, pki, "dev-1").reason_code == reason


def test_control_characters_in_a_certificate_are_refused(start_broker, pki):
    broker = start_broker(config=_config(pki, "peer_cert_as_username = cn"))
    assert _connect(broker, pki, "evil").reason_code == 0x86
    assert _identities(broker) == []


def test_enforce_refuses_a_client_that_claims_another_identity(start_broker, pki):
    broker = start_broker(config=_config(
        pki, "peer_cert_as_username = cn, peer_cert_as_clientid = cn, "
             "peer_cert_identity = enforce"))
    assert _connect(broker, pki, "dev-1", client_id="dev-1", username="admin").reason_code == 0x86
    assert _connect(broker, pki, "dev-1", client_id="dev-2", username="dev-1").reason_code == 0x85
    assert _connect(broker, pki, "dev-1", client_id="dev-1", username="dev-1").reason_code == 0
    assert _identities(broker) == [("dev-1", "dev-1")]


def test_a_client_without_a_certificate_keeps_what_it_sent(start_broker, pki):
    broker = start_broker(config=_config(pki, "peer_cert_as_username = cn"))
    assert _connect(broker, pki, None).reason_code == 0
    assert _identities(broker) == [("sent-id", "sent-user")]


def test_a_listener_setting_overrides_the_mqtt_one(start_broker, pki):
    broker = start_broker(config=_config(pki, "peer_cert_as_username = dn",
                                         listener="peer_cert_as_username = cn"))
    _connect(broker, pki, "dev-1")
    assert _identities(broker) == [("sent-id", "dev-1")]
