"""The operations listener over real HTTP: Prometheus metrics read after
real MQTT and TLS traffic, and the health checks."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastionmq.broker.codec import MQTT_5, Publish, Subscribe, Subscription
from bastionmq.pki import init_pki

# $SYS figures off: they are retained messages too, and would count.
OPS = """
http_api { enable = true, bind = "127.0.0.1:0" }
sys_topics.sys_interval = 0s
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    return directory


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def ops_url(broker, path: str) -> str:
    host, port = broker.run(lambda: broker.broker.ops.address)
    return f"http://{host}:{port}{path}"


def scrape(broker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    status, content_type, text = http_get(ops_url(broker, "/metrics"))
    assert status == 200 and content_type.startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_what_real_clients_did(start_broker, raw_clients):
    broker = start_broker(OPS)
    sub = raw_clients(broker.port, MQTT_5)
    sub.connect("watcher")
    sub.send(Subscribe(1, [Subscription("m/#", 1)]))
    sub.receive()
    pub = raw_clients(broker.port, MQTT_5)
    pub.connect("sender")
    for packet_id in (1, 2, 3):
        pub.send(Publish("m/x", b"payload", qos=1, packet_id=packet_id))
    assert [pub.receive().packet_id for _ in range(3)] == [1, 2, 3]
    assert [sub.receive().payload for _ in range(3)] == [b"payload"] * 3
    pub.send(Publish("m/kept", b"r", qos=1, packet_id=4, retain=True))
    pub.receive()
    sub.receive()

    metrics = scrape(broker)
    assert metrics[("bastionmq_messages_received_total", ())] == 4
    assert metrics[("bastionmq_messages_sent_total", ())] == 4
    assert metrics[("bastionmq_connections", (("listener", "tcp:default"),))] == 2
    assert metrics[("bastionmq_sessions", (("state", "connected"),))] == 2
    assert metrics[("bastionmq_subscriptions", ())] == 1
    assert metrics[("bastionmq_retained_messages", ())] == 1
    assert metrics[("bastionmq_messages_dropped_total", (("reason", "queue_full"),))] == 0
    assert metrics[("bastionmq_bytes_received_total", ())] > 0
    assert ("process_resident_memory_bytes", ()) in metrics


def test_a_refused_connection_and_a_protocol_error_are_counted(start_broker, raw_clients):
    broker = start_broker(OPS + "\nallow_anonymous = false\n")
    refused = raw_clients(broker.port, MQTT_5)
    assert refused.connect("nobody").reason_code == 0x87
    metrics = scrape(broker)
    assert metrics[("bastionmq_connections_refused_total", ())] == 1
    assert metrics[("bastionmq_authentication_total", (("outcome", "denied"),))] == 1


def test_a_failed_tls_handshake_is_counted_with_its_reason(start_broker, pki):
    broker = start_broker(OPS + f"""
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{
    cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
    keyfile = "{pki / 'server.key'}", verify = verify_peer, fail_if_no_peer_cert = true
  }}
}}
""")
    port = broker.port_of("ssl:default")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"\x10\x00")  # TLS 1.3 reports the refusal on first use
                tls.recv(1)
    metrics = scrape(broker)
    key = ("bastionmq_tls_handshake_failures_total",
           (("listener", "ssl:default"), ("reason", "no client certificate")))
    assert metrics[key] == 1


def test_health_and_readiness(start_broker):
    broker = start_broker(OPS)
    status, _, body = http_get(ops_url(broker, "/healthz"))
    assert (status, json.loads(body)["status"]) == (200, "alive")
    status, _, body = http_get(ops_url(broker, "/readyz"))
    assert (status, json.loads(body)["status"]) == (200, "ready")
    broker.run(lambda: broker.broker.listeners["tcp:default"].stop_accepting())
    status, _, body = http_get(ops_url(broker, "/readyz"))
    assert status == 503
    assert json.loads(body)["waiting"] == ["listener tcp:default is not accepting"]


def test_it_is_off_unless_enabled(broker):
    assert broker.run(lambda: broker.broker.ops) is None
