"""The operations listener over real HTTP: Prometheus metrics read after
real MQTT and TLS traffic, and the health checks."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from bastionmq.broker.codec import MQTT_5, Connect, Publish, Subscribe, Subscription, encode
from bastionmq.config import ConfigError
from bastionmq.pki import init_pki, issue_client

# $SYS figures off: they are retained messages too, and would count.
NOW = datetime.datetime.now(datetime.timezone.utc)

OPS = """
http_api { enable = true, bind = "127.0.0.1:0" }
sys_topics.sys_interval = 0s
"""


@pytest.fixture(autouse=True)
def _data_in_tmp(tmp_path, monkeypatch):
    """The operations listener opens the built-in database (API keys, bans)
    in node.data_dir: here, in the test's own directory (not a project
    directory, so the per-user one, which XDG_DATA_HOME places)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    issue_client(directory, "sensor-1")
    issue_client(directory, "expired", not_before=NOW - datetime.timedelta(days=30),
                 not_after=NOW - datetime.timedelta(days=1))
    issue_client(directory, "ten-days", not_after=NOW + datetime.timedelta(days=10))
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


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
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
    assert metrics[("bastionmq_messages_received_total", (("qos", "1"),))] == 4
    assert metrics[("bastionmq_messages_sent_total", (("qos", "1"),))] == 4
    assert metrics[("bastionmq_messages_received_total", (("qos", "0"),))] == 0
    assert metrics[("bastionmq_connections", (("listener", "tcp:default"),))] == 2
    assert metrics[("bastionmq_connack_total", (("reason", "0x00 success"),))] == 2
    assert metrics[("bastionmq_sessions", (("state", "connected"),))] == 2
    assert metrics[("bastionmq_subscriptions", ())] == 1
    assert metrics[("bastionmq_retained_messages", ())] == 1
    assert metrics[("bastionmq_messages_dropped_total", (("reason", "queue_full"),))] == 0
    assert metrics[("bastionmq_bytes_received_total", (("listener", "tcp:default"),))] > 0
    assert ("process_resident_memory_bytes", ()) in metrics


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
def test_a_refused_connection_and_a_protocol_error_are_counted(start_broker, raw_clients):
    broker = start_broker(OPS + "\nallow_anonymous = false\n")
    refused = raw_clients(broker.port, MQTT_5)
    assert refused.connect("nobody").reason_code == 0x87
    metrics = scrape(broker)
    assert metrics[("bastionmq_connections_refused_total", ())] == 1
    assert metrics[("bastionmq_connack_total", (("reason", "0x87 not authorized"),))] == 1
    assert metrics[("bastionmq_authentication_total",
                    (("outcome", "denied"), ("source", "anonymous")))] == 1


def tls_broker(start_broker, pki):
    return start_broker(OPS + f"""
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{
    cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
    keyfile = "{pki / 'server.key'}", verify = verify_peer, fail_if_no_peer_cert = true
  }}
}}
""")


def tls_connect(broker, pki, cert: str | None) -> None:
    """A TLS handshake with the client certificate ``cert`` (None: none),
    then a CONNECT; the broker's refusal, if any, comes out as an error."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    port = broker.port_of("ssl:default")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(encode(Connect(f"c-{cert}", MQTT_5), MQTT_5))
            assert tls.recv(1)  # TLS 1.3 reports a refused certificate here


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
def test_tls_handshakes_are_counted_by_result_reason_and_version(start_broker, pki):
    broker = tls_broker(start_broker, pki)
    tls_connect(broker, pki, "sensor-1")
    for refused in (None, "expired"):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(broker, pki, refused)
    metrics = scrape(broker)

    def handshakes(result, reason):
        return metrics[("bastionmq_tls_handshakes_total",
                        (("listener", "ssl:default"), ("reason", reason), ("result", result)))]
    assert handshakes("ok", "") == 1
    assert handshakes("failed", "no client certificate") == 1
    assert handshakes("failed", "client certificate expired") == 1
    negotiated = {labels: value for (name, labels), value in metrics.items()
                  if name == "bastionmq_tls_negotiated_total"}
    assert list(negotiated.values()) == [1]
    assert dict(next(iter(negotiated)))["version"] == "TLSv1.3"


def test_certificate_expiry_is_the_certificates_not_after(start_broker, pki):
    broker = tls_broker(start_broker, pki)
    metrics = scrape(broker)
    for role, name in (("server", "server.pem"), ("ca", "ca.pem")):
        cert = x509.load_pem_x509_certificate((pki / name).read_bytes())
        key = ("bastionmq_tls_certificate_expiry_timestamp_seconds",
               (("listener", "ssl:default"), ("role", role),
                ("subject", cert.subject.rfc4514_string())))
        assert metrics[key] == cert.not_valid_after_utc.timestamp()


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


def test_the_operations_listener_over_tls_requires_a_client_certificate(start_broker, pki):
    broker = start_broker(f"""
http_api {{
  enable = true
  bind = "127.0.0.1:0"
  ssl_options {{
    cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
    keyfile = "{pki / 'server.key'}", verify = verify_peer, fail_if_no_peer_cert = true
  }}
}}
""")
    url = ops_url(broker, "/healthz").replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.check_hostname = False  # the URL names 127.0.0.1, the certificate localhost
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=10, context=context).read()
    context.load_cert_chain(pki / "sensor-1.pem", pki / "sensor-1.key")
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        assert (response.status, json.loads(response.read())["status"]) == (200, "alive")


def test_bad_ssl_options_stop_start_up_with_their_key_path(start_broker, pki, tmp_path):
    with pytest.raises(ConfigError) as caught:
        start_broker(f"""
http_api {{
  enable = true
  bind = "127.0.0.1:0"
  ssl_options {{ certfile = "{tmp_path / 'missing.pem'}", keyfile = "{pki / 'server.key'}",
                 cacertfile = "{pki / 'ca.pem'}" }}
}}
""")
    assert "http_api.ssl_options.certfile" in str(caught.value)


def samples(metrics: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name``, by their labels."""
    return {labels: value for (sample, labels), value in metrics.items() if sample == name}


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
def test_messages_count_by_qos_and_bytes_by_listener(start_broker, clients):
    broker = start_broker(OPS + 'listeners.tcp.other { bind = "127.0.0.1:0" }')
    before = scrape(broker)
    assert samples(before, "bastionmq_bytes_received_total") == {
        (("listener", "tcp:default"),): 0, (("listener", "tcp:other"),): 0}
    subscriber = clients(broker.port, client_id="sub")
    subscriber.subscribe("q/#", qos=2)
    publisher = clients(broker.port, client_id="pub")
    for _ in range(3):
        publisher.publish("q/one", b"x" * 100, qos=1)
    publisher.publish("q/zero", b"y", qos=0)
    publisher.publish("q/two", b"z", qos=2)
    assert sorted(message.qos for message in subscriber.expect(5)) == [0, 1, 1, 1, 2]
    metrics = scrape(broker)
    for name in ("bastionmq_messages_received_total", "bastionmq_messages_sent_total"):
        assert samples(metrics, name) == {(("qos", "0"),): 1, (("qos", "1"),): 3,
                                          (("qos", "2"),): 1}

    def traffic(metrics, direction, listener):
        return metrics[(f"bastionmq_bytes_{direction}_total", (("listener", listener),))]
    # Five PUBLISH packets with 302 payload bytes went each way, and more.
    assert traffic(metrics, "received", "tcp:default") > 302
    assert traffic(metrics, "sent", "tcp:default") > 302
    assert traffic(metrics, "received", "tcp:other") == traffic(metrics, "sent", "tcp:other") == 0

    other = clients(broker.port_of("tcp:other"), client_id="other")
    other.publish("nobody/listens", b"w" * 1000, qos=1)
    after = scrape(broker)
    assert traffic(after, "received", "tcp:other") > 1000
    assert traffic(after, "sent", "tcp:other") > 0  # CONNACK and PUBACK
    for direction in ("received", "sent"):
        assert traffic(after, direction, "tcp:default") == traffic(metrics, direction,
                                                                   "tcp:default")


def _cli(config: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-c", "from bastionmq.cli import main; main()",
                             *args, "-c", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
def test_authentication_is_counted_by_source_and_outcome(start_broker, clients, raw_clients,
                                                         tmp_path):
    config = tmp_path / "bastionmq.conf"
    config.write_text(OPS + f"""
node.data_dir = "{tmp_path / 'data'}"
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
allow_anonymous = false
authentication = [
  {{ mechanism = password_based, backend = built_in_database,
     password_hash_algorithm {{ name = pbkdf2, mac_fun = sha256, iterations = 1000 }} }}
]
""")
    _cli(config, "users", "add", "alice", "--password", "wonderland")
    broker = start_broker(config=config)
    alice = clients(broker.port, client_id="a", username="alice", password="wonderland")
    assert alice.reason_code == 0
    wrong = raw_clients(broker.port, MQTT_5)
    assert wrong.connect("b", username="alice", password=b"guess").reason_code == 0x86
    nameless = raw_clients(broker.port, MQTT_5)
    assert nameless.connect("c").reason_code == 0x87
    assert samples(scrape(broker), "bastionmq_authentication_total") == {
        (("outcome", "allowed"), ("source", "password_based:built_in_database")): 1,
        (("outcome", "denied"), ("source", "password_based:built_in_database")): 1,
        # No authenticator decided: allow_anonymous = false did.
        (("outcome", "denied"), ("source", "anonymous")): 1,
    }


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
def test_authorization_is_counted_by_action_result_and_source(start_broker, raw_clients,
                                                              tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text('{allow, all, publish, ["open/#"]}.\n{deny, all, publish, ["secret/#"]}.\n')
    broker = start_broker(OPS + f"""
authorization {{ no_match = deny, sources = [ {{ type = file, path = "{acl}" }} ] }}
""")
    client = raw_clients(broker.port, MQTT_5)
    client.connect("writer")
    for packet_id, topic in enumerate(("open/x", "open/x", "secret/x", "other/x"), 1):
        client.send(Publish(topic, b"m", qos=1, packet_id=packet_id))
    assert [client.receive().reason_code for _ in range(4)] == [0x10, 0x10, 0x87, 0x87]
    metrics = scrape(broker)
    counted = {labels: value for labels, value
               in samples(metrics, "bastionmq_authorization_total").items() if value}
    assert counted == {
        (("action", "publish"), ("result", "allow"), ("source", "file")): 1,
        (("action", "publish"), ("result", "allow"), ("source", "cache")): 1,  # the second
        (("action", "publish"), ("result", "deny"), ("source", "file")): 1,
        (("action", "publish"), ("result", "deny"), ("source", "no_match")): 1,
    }
    assert metrics[("bastionmq_authorization_denied_total", (("action", "publish"),))] == 2


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
def test_client_certificate_expiry_is_a_histogram_of_the_days_left(start_broker, pki):
    broker = tls_broker(start_broker, pki)
    tls_connect(broker, pki, "ten-days")
    tls_connect(broker, pki, "sensor-1")  # 825 days
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(broker, pki, "expired")  # refused: not counted
    # Cumulative, by upper bound: ten days is within the 14 days bucket.
    buckets = {float(dict(labels)["le"]): value for labels, value in samples(
        scrape(broker), "bastionmq_tls_client_certificate_expiry_seconds_bucket").items()}
    day = 86400
    assert buckets == {days * day: (0 if days < 14 else 1)
                       for days in (1, 7, 14, 30, 90, 180, 365, 730)} | {float("inf"): 2}
    metrics = scrape(broker)
    count = metrics[("bastionmq_tls_client_certificate_expiry_seconds_count",
                     (("listener", "ssl:default"),))]
    total = metrics[("bastionmq_tls_client_certificate_expiry_seconds_sum",
                     (("listener", "ssl:default"),))]
    assert count == 2 and (10 + 824) * day < total <= (10 + 825) * day


@pytest.mark.one_node(
    "counts in one node's /metrics (the management API and /metrics are worker 1's)")
def test_durable_store_commits_are_histograms(start_broker, clients, tmp_path):
    broker = start_broker(OPS + f"""
durable_sessions {{ enable = true, data_dir = "{tmp_path / 'data'}" }}
""")
    subscriber = clients(broker.port, client_id="durable", version=paho.MQTTv5, clean=False,
                         session_expiry=3600)
    subscriber.subscribe("d/#", qos=1)
    publisher = clients(broker.port, client_id="pub")
    for _ in range(5):
        publisher.publish("d/x", b"stored", qos=1)
    assert len(subscriber.expect(5)) == 5
    metrics = scrape(broker)
    commits = metrics[("bastionmq_store_commit_seconds_count", ())]
    assert commits > 0
    assert metrics[("bastionmq_store_commit_seconds_bucket", (("le", "+Inf"),))] == commits
    assert metrics[("bastionmq_store_commit_seconds_sum", ())] > 0
    assert metrics[("bastionmq_store_commit_batch_size_count", ())] == commits
    # Every batch holds one change at least: the subscription, the queued
    # and in-flight messages and their acknowledgements.
    assert metrics[("bastionmq_store_commit_batch_size_sum", ())] >= commits
