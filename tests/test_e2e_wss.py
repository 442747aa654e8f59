"""MQTT over WebSocket over TLS (``listeners.wss``): paho-mqtt with
transport="websockets" and a client certificate, and a raw WebSocket client
over a TLS socket for what paho hides (the broker's DISCONNECT, refusals).
TLS is the ssl listener's and WebSocket the ws listener's: these tests check
that both hold when stacked."""

from __future__ import annotations

import datetime
import ssl
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from bastionmq import Broker, tls_policy
from bastionmq.broker.codec import MQTT_5, Connack, Disconnect
from bastionmq.config import load_config
from bastionmq.pki import init_pki, issue_client, revoke
from cluster_switch import counted, gathered, on_every_node
from startup import startup_error
from test_e2e_ws import WsClient, exchange_qos_0_1_2
from tls_helpers import plain_socket, tls_socket

TIMEOUT = 10.0
LISTENER = "wss:default"


@pytest.fixture
def pki(tmp_path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory)
    issue_client(directory, "dev-1")
    issue_client(directory, "dev-2")
    return directory


def _config(pki: Path, listener: str = "", **options: str) -> str:
    """tcp:default and wss:default on ephemeral loopback ports; the wss
    listener demands a certificate from ``pki``'s CA, as the shipped one does."""
    opts = {"cacertfile": f'"{pki / "ca.pem"}"', "certfile": f'"{pki / "server.pem"}"',
            "keyfile": f'"{pki / "server.key"}"', "verify": "verify_peer",
            "fail_if_no_peer_cert": "true", **options}
    body = "\n    ".join(f"{key} = {value}" for key, value in opts.items())
    return f"""
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
listeners.wss.default {{
  bind = "127.0.0.1:0"
  {listener}
  ssl_options {{
    {body}
  }}
}}
allow_anonymous = true
"""


def _paho_tls(pki: Path, cert: str | None = "dev-1") -> dict[str, str]:
    tls = {"ca_certs": str(pki / "ca.pem")}
    if cert:
        tls.update(certfile=str(pki / f"{cert}.pem"), keyfile=str(pki / f"{cert}.key"))
    return tls


def _wss_client(broker, pki: Path, cert: str | None = "dev-1", **kwargs) -> WsClient:
    """A raw WebSocket client over TLS, upgraded (or refused) at /mqtt."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    port = broker.port_of(LISTENER)
    return WsClient(port, sock=tls_socket(port, context), **kwargs)


def _failures(broker) -> dict[str, int]:
    return counted(broker, lambda node: node.listeners[LISTENER].handshake_failures)


def _wait_for_failure(broker, reason: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while reason not in _failures(broker):
        assert time.monotonic() < deadline, _failures(broker)
        time.sleep(0.02)


def _peers(broker) -> list[tuple[str, str, str | None, str | None]]:
    """(client id, listener, certificate CN, username) of each connection."""
    return sorted(gathered(broker, lambda node: [
        (c.client_id, c.peer.listener,
         c.peer.certificate.common_name if c.peer.certificate else None, c.username)
        for c in node.core.connections if c.client_id]))


# --------------------------------------------------------------------------
# paho-mqtt over wss


@pytest.mark.parametrize("version", [paho.MQTTv311, paho.MQTTv5], ids=["3.1.1", "5.0"])
def test_paho_over_wss_exchanges_qos_0_1_2_with_a_tcp_client(start_broker, clients, pki,
                                                             version):
    broker = start_broker(config=_config(pki))
    web = clients(broker.port_of(LISTENER), client_id="web", version=version,
                  transport="websockets", tls=_paho_tls(pki))
    tcp = clients(broker.port, client_id="tcp", version=version)
    assert web.reason_code == 0
    assert ("web", LISTENER, "dev-1", None) in _peers(broker)
    exchange_qos_0_1_2(web, tcp)


def test_paho_over_wss_gets_retained_messages(start_broker, clients, pki):
    broker = start_broker(config=_config(pki))
    clients(broker.port, client_id="pub").publish("status/door", b"closed", qos=1, retain=True)
    web = clients(broker.port_of(LISTENER), client_id="web", transport="websockets",
                  tls=_paho_tls(pki))
    web.subscribe("status/#", qos=1)
    message = web.expect()[0]
    assert (message.topic, message.payload, message.retain) == ("status/door", b"closed", True)


def test_the_will_of_a_wss_client_that_vanishes_is_published(start_broker, clients, pki):
    broker = start_broker(config=_config(pki))
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("wills/#", qos=1)
    web = clients(broker.port_of(LISTENER), client_id="web", transport="websockets",
                  tls=_paho_tls(pki), will=("wills/web", b"web gone", 1, False))
    web.stop_network()
    message = watcher.expect()[0]
    assert (message.topic, message.payload) == ("wills/web", b"web gone")


def test_the_certificate_identity_is_mapped_as_on_ssl(start_broker, clients, pki):
    broker = start_broker(config=_config(pki, "peer_cert_as_username = cn"))
    clients(broker.port_of(LISTENER), client_id="device", username="admin", password="guess",
            transport="websockets", tls=_paho_tls(pki), version=paho.MQTTv5)
    assert _peers(broker) == [("device", LISTENER, "dev-1", "dev-1")]


# --------------------------------------------------------------------------
# TLS refusals and revocation


def test_a_client_without_a_certificate_is_refused(start_broker, pki):
    broker = start_broker(config=_config(pki))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _wss_client(broker, pki, cert=None)
    _wait_for_failure(broker, "no client certificate")
    assert _peers(broker) == []


def test_a_revoked_certificate_in_crlfile_is_refused(start_broker, pki):
    crl = revoke(pki, pki / "dev-2.pem")
    broker = start_broker(config=_config(pki, enable_crl_check="true", crlfile=f'"{crl}"'))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _wss_client(broker, pki, cert="dev-2")
    _wait_for_failure(broker, "client certificate revoked")
    client = _wss_client(broker, pki, version=MQTT_5)
    assert client.connect("good").reason_code == 0


def test_a_crl_reload_disconnects_a_connected_wss_client_it_revokes(start_broker, pki):
    crl = revoke(pki, pki / "dev-2.pem")
    broker = start_broker(config=_config(pki, enable_crl_check="true", crlfile=f'"{crl}"',
                                         watch_interval="0s"))
    client = _wss_client(broker, pki, version=MQTT_5)
    assert client.connect("dev-1").reason_code == 0
    revoke(pki, pki / "dev-1.pem")
    assert broker.reload_tls() == {LISTENER: True}
    disconnect = client.receive()
    assert isinstance(disconnect, Disconnect)
    assert disconnect.reason_code == 0x98
    assert disconnect.properties["reason_string"] == "client certificate revoked"


def test_a_wss_connection_ends_with_its_certificates_validity(start_broker, pki):
    now = datetime.datetime.now(datetime.timezone.utc)
    issue_client(pki, "brief", not_before=now - datetime.timedelta(minutes=1),
                 not_after=now + datetime.timedelta(seconds=2))
    broker = start_broker(config=_config(pki, enforce_cert_lifetime="true"))
    client = _wss_client(broker, pki, cert="brief", version=MQTT_5)
    assert isinstance(connack := client.connect("brief"), Connack)
    assert connack.reason_code == 0
    disconnect = client.receive()
    assert disconnect.reason_code == 0x98
    assert disconnect.properties["reason_string"] == "client certificate expired"


def test_plain_websocket_to_the_wss_port_costs_only_that_connection(start_broker, clients,
                                                                    pki):
    broker = start_broker(config=_config(pki))
    good = clients(broker.port_of(LISTENER), client_id="before", transport="websockets",
                   tls=_paho_tls(pki))
    port = broker.port_of(LISTENER)
    with pytest.raises((ConnectionError, OSError)):
        WsClient(port, sock=plain_socket(port))
    _wait_for_failure(broker, "not TLS (plain MQTT or another protocol sent to a TLS port?)")
    good.subscribe("still/#", qos=1)
    after = clients(port, client_id="after", transport="websockets", tls=_paho_tls(pki))
    after.publish("still/here", b"yes", qos=1)
    assert good.expect()[0].payload == b"yes"
    assert sum(on_every_node(broker, lambda node: node.listeners[LISTENER].connection_count)) == 2


# --------------------------------------------------------------------------
# Configuration


def test_bad_tls_material_names_the_wss_key_path(pki):
    broker = Broker(_config(pki, certfile='"/nonexistent/server.pem"'))
    where, what = startup_error(broker)
    assert where == "listeners.wss.default.ssl_options.certfile"
    assert "no such file" in what


def test_check_config_reports_the_wss_listeners_tls_policy(pki):
    config = load_config(text=_config(pki, "peer_cert_as_username = cn"), env={})
    report = tls_policy.report(config)
    assert report.errors == []
    assert "wss:default 127.0.0.1:0" in report.lines
    assert "  identity (replace): username from the certificate's cn, client id from what " \
           "the client sends" in report.lines


def test_the_close_lingers_over_wss_too(start_broker, pki):
    from test_e2e_ws import pipeline_past_the_receive_maximum
    broker = start_broker(config=_config(pki) + "mqtt.max_awaiting_rel = 100\n")
    client = _wss_client(broker, pki, version=MQTT_5)
    client.connect("eager")
    assert pipeline_past_the_receive_maximum(client) == [0x93]
    client.close()
