"""The management API and ``bastionmq ctl``, end to end over HTTPS with a
client certificate: real MQTT clients, a real HTTP client, the CLI as an
operator runs it; refusals included (no key, a viewer's key on a change, a
certificate of another CA)."""

from __future__ import annotations

import json
import queue
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from cryptography import x509

from bastionmq.cli import main
from bastionmq.pki import init_pki, issue_client

from conftest import TIMEOUT, Client


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory)
    issue_client(directory, "operator")
    issue_client(directory, "sensor-7")
    other = tmp_path / "other-ca"
    init_pki(other)
    issue_client(other, "operator")
    return directory


def api_config(tmp_path: Path, pki: Path, extra: str = "") -> str:
    return f"""
node.data_dir = "{tmp_path / 'data'}"
allow_anonymous = true
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{
    cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
    keyfile = "{pki / 'server.key'}", verify = verify_peer
  }}
}}
http_api {{
  enable = true
  bind = "127.0.0.1:0"
  ssl_options {{
    cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
    keyfile = "{pki / 'server.key'}", verify = verify_peer, fail_if_no_peer_cert = true
  }}
}}
{extra}
"""


class Api:
    """The running broker's API, reached as an operator's tool reaches it."""

    def __init__(self, running: Any, config_file: Path, pki: Path) -> None:
        self.running = running
        self.config_file = config_file
        self.pki = pki
        host, port = running.run(lambda: running.broker.ops.address)
        self.url = f"https://localhost:{port}"
        self.keys = {role: self.create_key(f"{role}-key", role) for role in ("admin", "viewer")}

    def context(self, cert: str | None = "operator", ca: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        if cert is not None:
            base = ca or self.pki
            context.load_cert_chain(str(base / f"{cert}.pem"), str(base / f"{cert}.key"))
        return context

    def create_key(self, name: str, role: str) -> str:
        result = CliRunner().invoke(main, ["ctl", "-c", str(self.config_file), "api-key",
                                           "create", name, "--role", role])
        assert result.exit_code == 0, result.output
        return result.stdout.strip().splitlines()[0]

    def request(self, method: str, path: str, body: Any = None, key: str | None = "admin",
                context: ssl.SSLContext | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if key is not None:
            request.add_header("Authorization", f"Bearer {self.keys.get(key, key)}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT,
                                        context=context or self.context()) as answer:
                text = answer.read()
                status = answer.status
        except urllib.error.HTTPError as exc:
            with exc:
                text, status = exc.read(), exc.code
        return status, (json.loads(text) if text else None)

    def ctl(self, *args: str, key: str | None = "admin") -> Any:
        base = ["ctl", "-c", str(self.config_file), "--url", self.url, "--cert", str(self.pki / "operator.pem"),
                "--key", str(self.pki / "operator.key")]
        if key is not None:
            base += ["--api-key", self.keys[key]]
        return CliRunner().invoke(main, [*base, *args], env={"BASTIONMQ_API_KEY": None})


@pytest.fixture
def api(start_broker, tmp_path: Path, pki: Path) -> Api:
    config_file = tmp_path / "bastionmq.conf"
    config_file.write_text(api_config(tmp_path, pki, """
authentication = [ { mechanism = password_based, backend = built_in_database } ]
authorization { no_match = allow, sources = [ { type = built_in_database } ] }
"""))
    running = start_broker(config=str(config_file))
    return Api(running, config_file, pki)


def tls_client(api: Api, client_id: str) -> Client:
    pki = api.pki
    return Client(api.running.port_of("ssl:default"), client_id, version=paho.MQTTv5, tls={
        "ca_certs": str(pki / "ca.pem"), "certfile": str(pki / "sensor-7.pem"),
        "keyfile": str(pki / "sensor-7.key")})


def disconnect_reason(client: Client) -> int:
    """The reason code of the DISCONNECT (or lost connection) the client saw."""
    reason = client.disconnects.get(timeout=TIMEOUT)
    return getattr(reason, "value", reason)


def next_payload(client: Client) -> bytes:
    return client.expect()[0].payload


def nothing_arrives(client: Client, wait: float = 0.3) -> bool:
    try:
        message = client.messages.get(timeout=wait)
    except queue.Empty:
        return True
    raise AssertionError(f"unexpected message {message.topic} {message.payload!r}")


def refused_with(port: int, client_id: str) -> int:
    client = Client(port, client_id, version=paho.MQTTv5)
    client.paho.loop_stop()
    return client.reason_code


# ------------------------------------------------------------------ access


def test_every_request_needs_a_valid_key_and_the_right_role(api: Api):
    assert api.request("GET", "/api/v1/clients", key=None)[0] == 401
    status, body = api.request("GET", "/api/v1/clients", key="bmq_not-a-key")
    assert (status, body["code"]) == (401, "BAD_KEY")
    assert api.request("GET", "/api/v1/clients", key="viewer")[0] == 200
    status, body = api.request("POST", "/api/v1/publish", {"topic": "t", "payload": "x"},
                               key="viewer")
    assert (status, body["code"]) == (403, "FORBIDDEN")
    assert api.request("POST", "/api/v1/publish", {"topic": "t", "payload": "x"})[0] == 201
    # Health checks and the API's description need none.
    assert api.request("GET", "/healthz", key=None)[0] == 200
    assert api.request("GET", "/api/v1/openapi.json", key=None)[0] == 200


def test_the_api_refuses_a_certificate_of_another_ca_and_none(api: Api, tmp_path: Path):
    for context in (api.context("operator", ca=tmp_path / "other-ca"), api.context(None)):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            api.request("GET", "/api/v1/stats", context=context)


def test_a_deleted_key_is_refused_at_once(api: Api):
    assert api.request("GET", "/api/v1/stats", key="viewer")[0] == 200
    result = CliRunner().invoke(main, ["ctl", "-c", str(api.config_file), "api-key", "delete",
                                       "viewer-key"])
    assert result.exit_code == 0, result.output
    assert api.request("GET", "/api/v1/stats", key="viewer")[0] == 401
    listed = CliRunner().invoke(main, ["ctl", "-c", str(api.config_file), "api-key", "list"])
    assert "admin-key" in listed.stdout and "viewer-key" not in listed.stdout


def test_keys_are_stored_hashed(api: Api, tmp_path: Path):
    database = (tmp_path / "data" / "auth.sqlite3").read_bytes()
    for key in api.keys.values():
        assert key.encode() not in database


def test_state_changing_calls_are_logged_with_the_key_name(api: Api, caplog):
    with caplog.at_level("INFO", logger="bastionmq.ops"):
        api.request("POST", "/api/v1/publish", {"topic": "t", "payload": "x"})
    assert "POST /api/v1/publish by key admin-key" in caplog.text


def keyless_status(running: Any, path: str, host: str | None = None) -> int:
    """The status of a GET without a key, by plain HTTP."""
    bound, port = running.run(lambda: running.broker.ops.address)
    try:
        with urllib.request.urlopen(f"http://{host or bound}:{port}{path}",
                                    timeout=TIMEOUT) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


def test_without_a_key_on_loopback_only_when_allowed(start_broker, tmp_path: Path):
    running = start_broker(f"""
node.data_dir = "{tmp_path / 'data'}"
http_api {{ enable = true, bind = "127.0.0.1:0", allow_loopback_without_key = true }}
""")
    assert keyless_status(running, "/api/v1/stats") == 200
    everywhere = start_broker(f"""
node.data_dir = "{tmp_path / 'data2'}"
http_api {{ enable = true, bind = "0.0.0.0:0", allow_loopback_without_key = true }}
""")
    assert keyless_status(everywhere, "/api/v1/stats", host="127.0.0.1") == 401


def test_metrics_need_a_key_when_not_public(start_broker, tmp_path: Path):
    running = start_broker(f"""
node.data_dir = "{tmp_path / 'data'}"
http_api {{ enable = true, bind = "127.0.0.1:0", metrics_public = false }}
""")
    assert keyless_status(running, "/metrics") == 401
    assert keyless_status(running, "/healthz") == 200


# ------------------------------------------------------------------ clients


@pytest.mark.one_node(
    "the management API is worker 1's: its clients, its kicks (docs/cluster.md, Not yet)")
def test_clients_are_listed_filtered_and_shown_with_their_tls_facts(api: Api):
    device = tls_client(api, "sensor-7-device")
    device.subscribe("devices/sensor-7/#", qos=1)
    plain = Client(api.running.port, "plain-one")
    status, listed = api.request("GET", "/api/v1/clients", key="viewer")
    assert status == 200
    assert {c["clientid"] for c in listed["data"]} == {"sensor-7-device", "plain-one"}
    assert listed["meta"] == {"page": 1, "limit": 100, "count": 2}
    _, by_subject = api.request("GET", "/api/v1/clients?cert_subject=CN%3Dsensor-7")
    assert [c["clientid"] for c in by_subject["data"]] == ["sensor-7-device"]
    _, by_listener = api.request("GET", "/api/v1/clients?listener=tcp:default")
    assert [c["clientid"] for c in by_listener["data"]] == ["plain-one"]
    _, by_prefix = api.request("GET", "/api/v1/clients?clientid_prefix=plain&limit=1")
    assert [c["clientid"] for c in by_prefix["data"]] == ["plain-one"]
    status, one = api.request("GET", "/api/v1/clients/sensor-7-device")
    assert status == 200
    assert one["tls"]["version"] in ("TLSv1.3", "TLSv1.2") and one["tls"]["cipher"]
    assert one["cert"]["common_name"] == "sensor-7"
    issued = x509.load_pem_x509_certificate((api.pki / "sensor-7.pem").read_bytes())
    assert one["cert"]["not_after"] == issued.not_valid_after_utc.isoformat()
    assert one["subscriptions"][0]["topic"] == "devices/sensor-7/#"
    assert one["connected"] is True and one["listener"] == "ssl:default"
    assert one["connected_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime()))
    _, subscriptions = api.request("GET", "/api/v1/subscriptions?clientid=sensor-7-device")
    assert [s["topic"] for s in subscriptions["data"]] == ["devices/sensor-7/#"]
    assert api.request("GET", "/api/v1/clients/nobody")[0] == 404
    device.disconnect()
    plain.disconnect()


@pytest.mark.one_node(
    "the management API is worker 1's: its clients, its kicks (docs/cluster.md, Not yet)")
def test_a_kicked_client_is_disconnected_with_administrative_action(api: Api):
    kicked = Client(api.running.port, "to-kick", version=paho.MQTTv5, clean=False,
                    session_expiry=3600)
    status, _ = api.request("DELETE", "/api/v1/clients/to-kick", key="viewer")
    assert status == 403
    assert kicked.paho.is_connected()
    status, _ = api.request("DELETE", "/api/v1/clients/to-kick")
    assert status == 204
    assert disconnect_reason(kicked) == 0x98
    # Its session went with it, as EMQX's kick does.
    assert api.request("GET", "/api/v1/clients/to-kick")[0] == 404
    # And the kick shows among the disconnect reasons of /metrics.
    context = api.context()
    with urllib.request.urlopen(api.url + "/metrics", timeout=TIMEOUT,
                                context=context) as answer:
        metrics = answer.read().decode()
    assert 'bastionmq_disconnects_total{reason="0x98 administrative action"} 1.0' in metrics


# ------------------------------------------------------------------ messages


@pytest.mark.one_node("the API's publish counts the subscribers of worker 1")
def test_publish_reaches_subscribers_and_retained_can_be_read_and_deleted(api: Api):
    subscriber = Client(api.running.port, "listener-1")
    subscriber.subscribe("alerts/#", qos=1)
    status, answer = api.request("POST", "/api/v1/publish", {
        "topic": "alerts/fire", "payload": "aGVsbG8=", "payload_encoding": "base64",
        "qos": 1, "retain": True, "properties": {"user_property": {"from": "ops"}}})
    assert (status, answer) == (201, {"matched": 1})
    assert next_payload(subscriber) == b"hello"
    status, listed = api.request("GET", "/api/v1/retained?topic=alerts/%23", key="viewer")
    assert listed["data"] == [{"topic": "alerts/fire", "qos": 1, "payload_size": 5}]
    status, one = api.request("GET", "/api/v1/retained/alerts/fire")
    assert (status, one["payload"]) == (200, "aGVsbG8=")
    assert api.request("DELETE", "/api/v1/retained/alerts/fire")[0] == 204
    assert api.request("GET", "/api/v1/retained/alerts/fire")[0] == 404
    late = Client(api.running.port, "late")
    late.subscribe("alerts/#")
    assert nothing_arrives(late)
    status, bad = api.request("POST", "/api/v1/publish", {"topic": "a/#", "payload": "x"})
    assert status == 400 and "topic" in bad["message"]
    status, bad = api.request("POST", "/api/v1/publish", {"topic": "a", "qos": "1"})
    assert status == 400 and "qos" in bad["message"]
    subscriber.disconnect()
    late.disconnect()


# ------------------------------------------------------------------ bans


@pytest.mark.one_node(
    "the management API is worker 1's: its clients, its kicks (docs/cluster.md, Not yet)")
def test_a_ban_disconnects_refuses_and_survives_a_restart(api: Api, start_broker):
    banned = Client(api.running.port, "rogue")
    status, ban = api.request("POST", "/api/v1/banned",
                              {"as": "clientid", "who": "rogue", "reason": "flooding"})
    assert status == 201 and ban["by"] == "admin-key"
    disconnect_reason(banned)
    assert refused_with(api.running.port, "rogue") == 0x8A
    _, listed = api.request("GET", "/api/v1/banned", key="viewer")
    assert [(b["as"], b["who"], b["reason"]) for b in listed["data"]] == [
        ("clientid", "rogue", "flooding")]
    # A restarted broker keeps it.
    api.running.stop()
    again = start_broker(config=str(api.config_file))
    assert refused_with(again.port, "rogue") == 0x8A
    api.running = again
    api.url = "https://localhost:%d" % again.run(lambda: again.broker.ops.address)[1]
    assert api.request("DELETE", "/api/v1/banned/clientid/rogue")[0] == 204
    Client(again.port, "rogue").disconnect()


# ------------------------------------------------------------------ users, rules


@pytest.mark.one_node(
    "the API answers before the other nodes have the rule change (docs/cluster.md, Not yet; "
    "tests/test_cluster_sessions.py)")
def test_users_and_rules_of_the_built_in_database(api: Api):
    status, user = api.request("POST", "/api/v1/users", {"user_id": "dev", "password": "s3cret"})
    assert status == 201 and user["user_id"] == "dev"
    assert api.request("POST", "/api/v1/users", {"user_id": "dev", "password": "x"})[0] == 409
    client = Client(api.running.port, "dev-1", username="dev", password="s3cret")
    client.subscribe("secret/#")
    publisher = Client(api.running.port, "pub-1", username="dev", password="s3cret")
    publisher.publish("secret/a", b"1", qos=1)
    assert next_payload(client) == b"1"
    # A deny rule applies at once to the connected client.
    status, rule = api.request("POST", "/api/v1/authorization/rules", {
        "who_type": "username", "who": "dev", "permission": "deny", "action": "publish",
        "topic": "secret/#"})
    assert status == 201
    publisher.publish("secret/a", b"2", qos=1)
    assert nothing_arrives(client)
    _, rules = api.request("GET", "/api/v1/authorization/rules", key="viewer")
    assert [r["topic"] for r in rules["data"]] == ["secret/#"]
    assert api.request("DELETE", f"/api/v1/authorization/rules/{rule['id']}")[0] == 204
    publisher.publish("secret/a", b"3", qos=1)
    assert next_payload(client) == b"3"
    _, users = api.request("GET", "/api/v1/users", key="viewer")
    assert [u["user_id"] for u in users["data"]] == ["dev"]
    assert api.request("PUT", "/api/v1/users/dev", {"password": "n3w"})[0] == 200
    Client(api.running.port, "dev-2", username="dev", password="n3w").disconnect()
    assert api.request("DELETE", "/api/v1/users/dev")[0] == 204
    client.disconnect()
    publisher.disconnect()


# ------------------------------------------------------------------ node


@pytest.mark.one_node("the management API's /stats are worker 1's (docs/cluster.md, Not yet)")
def test_listeners_show_their_live_tls_policy_and_stats_count(api: Api):
    _, listeners = api.request("GET", "/api/v1/listeners", key="viewer")
    ssl_listener = next(item for item in listeners if item["id"] == "ssl:default")
    assert ssl_listener["ssl_options"]["verify"] == "verify_peer"
    assert ssl_listener["ssl_options"]["versions"] == ["tlsv1.3", "tlsv1.2"]
    assert {c["role"] for c in ssl_listener["ssl_options"]["certificates"]} == {"server", "ca"}
    Client(api.running.port, "counted").disconnect()
    _, stats = api.request("GET", "/api/v1/stats", key="viewer")
    assert stats["counters"]["connacks"]["0"] >= 1


def test_the_openapi_document_describes_every_route(api: Api):
    _, document = api.request("GET", "/api/v1/openapi.json", key=None)
    assert document["openapi"].startswith("3.")
    served = api.running.run(lambda: {
        (route.method, route.resource.canonical.replace(":.+", ""))
        for route in api.running.broker.ops._runner.app.router.routes()
        if route.method != "HEAD"})
    described = {(method.upper(), path) for path, operations in document["paths"].items()
                 for method in operations}
    assert served == described


def test_docs_api_names_every_endpoint():
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    from bastionmq.ops.api import ENDPOINTS
    for endpoint in ENDPOINTS:
        path = "/api/v1" + endpoint.path.replace(":.+", "")
        assert f"{endpoint.method} {path}" in text, endpoint


# ------------------------------------------------------------------ ctl


@pytest.mark.one_node(
    "the management API is worker 1's: its clients, its kicks (docs/cluster.md, Not yet)")
def test_ctl_lists_shows_and_kicks_as_tables_and_json(api: Api):
    device = tls_client(api, "sensor-7-device")
    listed = api.ctl("clients", "list", key="viewer")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:3] == ["CLIENTID", "USERNAME", "CONNECTED"]
    assert row.split()[0] == "sensor-7-device" and "CN=sensor-7" in row
    as_json = api.ctl("--json", "clients", "show", "sensor-7-device", key="viewer")
    assert json.loads(as_json.stdout)["cert"]["common_name"] == "sensor-7"
    refused = api.ctl("clients", "kick", "sensor-7-device", key="viewer")
    assert refused.exit_code == 1 and "403" in refused.output
    no_key = api.ctl("clients", "list", key=None)
    assert no_key.exit_code == 1 and "401" in no_key.output
    kicked = api.ctl("clients", "kick", "sensor-7-device")
    assert kicked.exit_code == 0, kicked.output
    assert disconnect_reason(device) == 0x98


def test_ctl_takes_its_key_from_the_environment(api: Api):
    """BASTIONMQ_API_KEY is ctl's, not a configuration override."""
    result = CliRunner().invoke(main, [
        "ctl", "-c", str(api.config_file), "--url", api.url,
        "--cert", str(api.pki / "operator.pem"), "--key", str(api.pki / "operator.key"),
        "stats"], env={"BASTIONMQ_API_KEY": api.keys["viewer"]})
    assert result.exit_code == 0, result.output
    assert "connections:" in result.stdout


def test_ctl_publish_retained_banned_and_reload(api: Api):
    published = api.ctl("publish", "news/today", "sunny", "--retain", "--qos", "1")
    assert published.exit_code == 0 and "matched: 0" in published.stdout
    listed = api.ctl("retained", "list", key="viewer")
    assert "news/today" in listed.stdout
    shown = api.ctl("--json", "retained", "show", "news/today", key="viewer")
    assert json.loads(shown.stdout)["payload"] == "c3Vubnk="
    assert api.ctl("retained", "delete", "news/today").exit_code == 0
    assert api.ctl("banned", "add", "peerhost", "192.0.2.1", "--reason", "test").exit_code == 0
    banned = api.ctl("banned", "list", key="viewer")
    assert "192.0.2.1" in banned.stdout and "admin-key" in banned.stdout
    assert api.ctl("banned", "delete", "peerhost", "192.0.2.1").exit_code == 0
    reloaded = api.ctl("reload")
    assert reloaded.exit_code == 0 and "no configuration key changed" in reloaded.stdout
    assert api.ctl("stats", key="viewer").exit_code == 0
    listeners = api.ctl("listeners", key="viewer")
    assert "ssl:default" in listeners.stdout and "verify_peer" in listeners.stdout


@pytest.mark.one_node("a node alone says the cluster is off")
def test_cluster_status_of_a_node_alone(api: Api):
    assert api.request("GET", "/api/v1/cluster", key="viewer") == (200, {"enabled": False})
    result = api.ctl("cluster", "status", key="viewer")
    assert result.exit_code == 0, result.output
    assert "enabled: no" in result.output
