"""Authorization over real sockets: EMQX acl.conf rules keyed on the client
certificate, enforcement of denials for 5.0 and 3.1.1, deny_action, retained
messages, wills, superusers, reload."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from bastionmq.auth.scram import ScramSha256, ScramUsers
from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Auth, Connect, Decoder, Publish, Pubrel, Subscribe,
    Subscription, Will, encode,
)
from bastionmq.pki import init_pki, issue_client
from cluster_switch import on_every_node
from startup import startup_error
from tls_helpers import ssl_listener, tls_socket

TIMEOUT = 10.0
DEVICE_RULES = """
%% Devices publish under their own certificate's name, whatever they claim.
{allow, all, publish, ["devices/${cert_common_name}/#"]}.
{allow, {username, "observer"}, subscribe, ["devices/#"]}.
{deny, all}.
"""


def _config(acl: Path, extra: str = "") -> str:
    return f"""
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
allow_anonymous = true
authorization {{ sources = [ {{ type = file, path = "{acl}" }} ] }}
{extra}
"""


@pytest.fixture
def acl(tmp_path) -> Path:
    path = tmp_path / "acl.conf"
    path.write_text(DEVICE_RULES)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    for name in ("dev-1", "dev-2"):
        issue_client(directory, name)
    return directory


class TlsDevice:
    def __init__(self, port: int, pki: Path, cert: str, username: str) -> None:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
        self.sock = tls_socket(port, context)
        self.decoder = Decoder(MQTT_5)
        self.pending: list = []
        self.send(Connect(cert, MQTT_5, username=username))
        assert self.receive().reason_code == 0

    def send(self, packet) -> None:
        self.sock.sendall(encode(packet, MQTT_5))

    def receive(self):
        while not self.pending:
            self.pending.extend(self.decoder.feed(self.sock.recv(4096)))
        return self.pending.pop(0)


def _observer(raw_clients, port: int, version: int = MQTT_5):
    observer = raw_clients(port, version)
    observer.connect("observer", username="observer")
    observer.send(Subscribe(1, [Subscription("devices/#", 1)]))
    assert observer.receive().reason_codes == [1]
    return observer


def test_a_device_publishes_only_under_its_certificate_name(start_broker, raw_clients, pki, acl):
    broker = start_broker(config=ssl_listener(pki, _config(acl), verify="verify_peer",
                                              fail_if_no_peer_cert="true"))
    observer = _observer(raw_clients, broker.port)
    device = TlsDevice(broker.port_of("ssl:default"), pki, "dev-1", username="admin")
    device.send(Publish("devices/dev-1/temp", b"21", qos=1, packet_id=1))
    assert device.receive().reason_code == 0
    device.send(Publish("devices/dev-2/temp", b"spoofed", qos=1, packet_id=2))
    refused = device.receive()
    assert (refused.packet_id, refused.reason_code) == (2, 0x87)
    message = observer.receive()
    assert (message.topic, message.payload) == ("devices/dev-1/temp", b"21")
    with pytest.raises(OSError):
        observer.receive(timeout=0.3)  # the spoofed message was dropped
    assert sum(on_every_node(broker, lambda node: node.core.stats.publish_denied)) == 1


@pytest.mark.parametrize("version, code", [(MQTT_5, 0x87), (MQTT_3_1_1, 0x80)])
def test_a_denied_subscription(start_broker, raw_clients, acl, version, code):
    broker = start_broker(config=_config(acl))
    client = raw_clients(broker.port, version)
    client.connect("nobody", username="nobody")
    client.send(Subscribe(1, [Subscription("devices/#", 0), Subscription("$share/g/devices/#", 0)]))
    assert client.receive().reason_codes == [code, code]
    observer = raw_clients(broker.port, version)
    observer.connect("obs", username="observer")
    observer.send(Subscribe(1, [Subscription("devices/#", 0), Subscription("$share/g/devices/+", 0),
                                Subscription("other/#", 0)]))
    assert observer.receive().reason_codes == [0, 0, code]


def test_denied_publishes_for_3_1_1_are_acknowledged_and_dropped(start_broker, raw_clients, acl):
    broker = start_broker(config=_config(acl))
    observer = _observer(raw_clients, broker.port, MQTT_3_1_1)
    client = raw_clients(broker.port, MQTT_3_1_1)
    client.connect("old", username="old")
    client.send(Publish("devices/x", b"1", qos=1, packet_id=1))
    assert client.receive().packet_id == 1                   # PUBACK, as 3.1.1 has no refusal
    client.send(Publish("devices/x", b"2", qos=2, packet_id=2))
    assert client.receive().packet_id == 2                   # PUBREC
    client.send(Pubrel(2))
    assert client.receive().packet_id == 2                   # PUBCOMP
    client.send(Publish("devices/x", b"3", qos=0))
    observer.send(Publish("devices/observer/m", b"m"))       # the observer may not publish
    with pytest.raises(OSError):
        observer.receive(timeout=0.3)                        # nothing was routed


def test_deny_action_disconnect(start_broker, raw_clients, acl):
    broker = start_broker(config=_config(acl, "authorization.deny_action = disconnect"))
    client = raw_clients(broker.port, MQTT_5)
    client.connect("x", username="x")
    client.send(Publish("devices/x", b"1", qos=1, packet_id=1))
    (disconnect,) = client.receive_until_closed()
    assert disconnect.reason_code == 0x87
    assert "not authorized to publish to 'devices/x'" in disconnect.properties["reason_string"]
    subscriber = raw_clients(broker.port, MQTT_5)
    subscriber.connect("y", username="y")
    subscriber.send(Subscribe(1, [Subscription("devices/#", 0)]))
    assert subscriber.closing_reasons() == [0x87]


def test_retained_messages_a_client_may_not_read_are_not_sent(start_broker, raw_clients, tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text("""
{deny, all, subscribe, ["secret/#"]}.
{allow, all}.
""")
    broker = start_broker(config=_config(acl))
    broker.call(broker.broker.publish("public/a", b"open", retain=True))
    broker.call(broker.broker.publish("secret/b", b"hidden", retain=True))
    client = raw_clients(broker.port, MQTT_5)
    client.connect("reader")
    client.send(Subscribe(1, [Subscription("#", 0)]))
    assert client.receive().reason_codes == [0]
    assert client.receive().payload == b"open"
    with pytest.raises(OSError):
        client.receive(timeout=0.3)


def test_a_will_is_checked_when_it_is_published(start_broker, raw_clients, acl):
    broker = start_broker(config=_config(acl, 'authorization.no_match = allow'))
    observer = _observer(raw_clients, broker.port)
    # No rule lets "dying" publish: its will is dropped; "observer" may not publish either.
    dying = raw_clients(broker.port, MQTT_5)
    dying.connect("dying", username="dying", will=Will("devices/dying/status", b"gone", 0))
    dying.close()
    with pytest.raises(OSError):
        observer.receive(timeout=0.5)


@pytest.mark.one_node(
    "0x10 (no matching subscribers) needs every node's subscriptions: across nodes the "
    "answer is 0")
def test_a_superuser_bypasses_the_rules(start_broker, raw_clients, acl):
    users = ScramUsers()
    users.add("root", "toor", iterations=4096, superuser=True)
    broker = start_broker(config=_config(acl), auth_methods=[ScramSha256(users)])
    from test_e2e_enhanced_auth import ScramClient, _auth_props
    client = raw_clients(broker.port, MQTT_5)
    scram = ScramClient("root", "toor")
    challenge = client.connect("root", properties=_auth_props(scram.first()))
    client.send(Auth(0x18, _auth_props(scram.final(challenge.properties["authentication_data"]))))
    assert client.receive().reason_code == 0
    client.send(Subscribe(1, [Subscription("anything/#", 1)]))
    assert client.receive().reason_codes == [1]
    client.send(Publish("elsewhere/at/all", b"root", qos=1, packet_id=2))
    assert client.receive().reason_code == 0x10  # allowed; nobody subscribes there


@pytest.mark.one_node(
    "expects 0x10 (no matching subscribers), which a node answers only for its own subscribers")
def test_reload_takes_new_rules_and_forgets_cached_decisions(start_broker, raw_clients, acl):
    broker = start_broker(config=_config(acl))
    client = raw_clients(broker.port, MQTT_5)
    client.connect("w", username="writer")
    client.send(Publish("news/1", b"1", qos=1, packet_id=1))
    assert client.receive().reason_code == 0x87             # denied, and cached
    acl.write_text('{allow, {username, "writer"}, publish, ["news/#"]}.\n' + DEVICE_RULES)
    assert all(on_every_node(broker, lambda node: node.reload_authorization()))
    client.send(Publish("news/1", b"1", qos=1, packet_id=2))
    assert client.receive().reason_code == 0x10             # allowed; no subscriber


def test_a_broken_acl_file_stops_start_up_and_keeps_the_old_rules_on_reload(
        start_broker, raw_clients, acl, tmp_path):
    broken = tmp_path / "broken.conf"
    broken.write_text('{allow, all, publsh, ["t"]}.\n')
    where, what = startup_error(_config(broken))
    assert where == "authorization.sources.0.path"
    assert f"{broken}:1" in what and "publsh" in what
    broker = start_broker(config=_config(acl))
    acl.write_text("{allow, all, publsh, []}.\n")
    assert not any(on_every_node(broker, lambda node: node.reload_authorization()))
    client = raw_clients(broker.port, MQTT_5)
    client.connect("w", username="writer")
    client.send(Publish("news/1", b"1", qos=1, packet_id=1))
    assert client.receive().reason_code == 0x87             # the previous rules still apply


def test_no_match_deny_without_sources(start_broker, raw_clients):
    broker = start_broker("authorization.no_match = deny")
    client = raw_clients(broker.port, MQTT_5)
    client.connect("x")
    client.send(Subscribe(1, [Subscription("t", 0)]))
    assert client.receive().reason_codes == [0x87]


# the other source types and the built-in database ---------------------------------


def test_a_mosquitto_acl_file_with_a_certificate_placeholder(start_broker, raw_clients, pki,
                                                            tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("user observer\ntopic read devices/#\n\npattern write devices/%C/#\n")
    broker = start_broker(config=ssl_listener(pki, f"""
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
allow_anonymous = true
authorization {{ no_match = deny, sources = [ {{ type = mosquitto_acl, path = "{acl}" }} ] }}
""", verify="verify_peer", fail_if_no_peer_cert="true"))
    observer = _observer(raw_clients, broker.port)
    device = TlsDevice(broker.port_of("ssl:default"), pki, "dev-2", username="admin")
    device.send(Publish("devices/dev-2/temp", b"ok", qos=1, packet_id=1))
    assert device.receive().reason_code == 0
    device.send(Publish("devices/dev-1/temp", b"no", qos=1, packet_id=2))
    assert device.receive().reason_code == 0x87
    assert observer.receive().payload == b"ok"


def _database_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "bastionmq.conf"
    config.write_text(f"""
node.data_dir = "{tmp_path / 'data'}"
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
authentication = [
  {{ mechanism = password_based, backend = built_in_database,
     password_hash_algorithm {{ name = pbkdf2, mac_fun = sha256, iterations = 1000 }} }}
  {{ mechanism = scram, backend = built_in_database }}
]
authorization {{ no_match = deny, sources = [ {{ type = built_in_database }} ] }}
{extra}
""")
    return config


def _cli(config: Path, *args: str) -> None:
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", "from bastionmq.cli import main; main()",
                             *args, "-c", str(config)], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr


@pytest.mark.one_node(
    "0x10 (no matching subscribers) needs every node's subscriptions: across nodes the "
    "answer is 0")
def test_users_and_rules_of_the_built_in_database(start_broker, raw_clients, tmp_path):
    config = _database_config(tmp_path)
    _cli(config, "users", "add", "alice", "--password", "wonderland")
    _cli(config, "users", "add", "root", "--password", "toor", "--superuser")
    _cli(config, "users", "add", "bob", "--password", "builder", "--scram")
    _cli(config, "acl", "add", "allow", "publish", "users/${username}/#", "--all")
    broker = start_broker(config=config)
    alice = raw_clients(broker.port, MQTT_5)
    assert alice.connect("a", username="alice", password=b"wonderland").reason_code == 0
    alice.send(Publish("users/alice/x", b"1", qos=1, packet_id=1))
    assert alice.receive().reason_code == 0x10           # allowed (nobody subscribes)
    alice.send(Publish("users/bob/x", b"1", qos=1, packet_id=2))
    assert alice.receive().reason_code == 0x87
    wrong = raw_clients(broker.port, MQTT_5)
    assert wrong.connect("w", username="alice", password=b"nope").reason_code == 0x86
    root = raw_clients(broker.port, MQTT_5)
    assert root.connect("r", username="root", password=b"toor").reason_code == 0
    root.send(Subscribe(1, [Subscription("#", 0)]))
    assert root.receive().reason_codes == [0]            # a superuser is not checked
    # SCRAM credentials from the same database.
    from test_e2e_enhanced_auth import ScramClient, _auth_props
    bob = raw_clients(broker.port, MQTT_5)
    scram = ScramClient("bob", "builder")
    challenge = bob.connect("b", properties=_auth_props(scram.first()))
    bob.send(Auth(0x18, _auth_props(scram.final(challenge.properties["authentication_data"]))))
    assert bob.receive().reason_code == 0
    # Rules added while the broker runs take effect on reload.
    _cli(config, "acl", "add", "allow", "subscribe", "news/#", "--username", "alice")
    assert all(on_every_node(broker, lambda node: node.reload_authorization()))
    alice.send(Subscribe(3, [Subscription("news/#", 0)]))
    assert alice.receive().reason_codes == [0]


def test_a_corrupt_database_stops_start_up(tmp_path):
    config = _database_config(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "auth.sqlite3").write_bytes(b"not a database" * 100)
    where, what = startup_error(config)
    assert where == "node.data_dir"
    assert "auth.sqlite3" in what


@pytest.mark.one_node("automatic bans count one node's failures (docs/cluster.md, Not yet)")
def test_scram_follows_the_listener_chains_and_the_bans(start_broker, raw_clients, tmp_path):
    from test_e2e_enhanced_auth import ScramClient, _auth_props
    config = _database_config(tmp_path, """
listeners.tcp.plain { bind = "127.0.0.1:0", authentication = [] }
authn_ban { max_failures = 2 }
""")
    _cli(config, "users", "add", "carol", "--password", "secret", "--scram")
    broker = start_broker(config=config)

    def scram(port: int, password: str, client_id: str) -> int:
        client = raw_clients(port, MQTT_5)
        attempt = ScramClient("carol", password)
        answer = client.connect(client_id, username="carol",
                                properties=_auth_props(attempt.first()))
        if not isinstance(answer, Auth):
            return answer.reason_code
        client.send(Auth(0x18, _auth_props(attempt.final(
            answer.properties["authentication_data"]))))
        return client.receive().reason_code

    # A listener whose chain has no scram entry does not offer it.
    assert scram(broker.port_of("tcp:plain"), "secret", "p") == 0x8C
    assert scram(broker.port, "secret", "ok") == 0
    assert scram(broker.port, "wrong", "w1") == 0x86
    assert scram(broker.port, "wrong", "w2") == 0x86
    # Two failures ban the username, for SCRAM too.
    assert scram(broker.port, "secret", "after") == 0x8A


@pytest.mark.parametrize("version, bad_id, bad_user", [(MQTT_5, 0x85, 0x86), (MQTT_3_1_1, 2, 4)])
def test_control_characters_in_client_ids_and_usernames_are_refused(
        start_broker, raw_clients, tmp_path, version, bad_id, bad_user):
    # "dashboard\n" would pass a "^dashboard$" rule (Python's $ matches before
    # a final newline) and get the dashboard's rights without its password.
    acl = tmp_path / "acl.conf"
    acl.write_text('{allow, {username, {re, "^dashboard$"}}, subscribe, ["#"]}.\n{deny, all}.\n')
    broker = start_broker(config=_config(acl))
    impostor = raw_clients(broker.port, version)
    assert impostor.connect("d1", username="dashboard\n").reason_code == bad_user
    for client_id in ("tab\there", "bell\x07", "c1\x85"):
        client = raw_clients(broker.port, version)
        assert client.connect(client_id).reason_code == bad_id


def test_client_ids_are_at_most_256_characters_by_default(start_broker, raw_clients):
    broker = start_broker()
    assert raw_clients(broker.port, MQTT_5).connect("x" * 256).reason_code == 0
    assert raw_clients(broker.port, MQTT_5).connect("x" * 257).reason_code == 0x85


SECRET_RULES = """
{deny, all, subscribe, ["a/secret"]}.
{allow, all}.
"""


def _reader(raw_clients, port: int, client_id: str = "reader", clean: bool = True):
    reader = raw_clients(port, MQTT_5)
    props = {} if clean else {"session_expiry_interval": 3600}
    reader.connect(client_id, clean_start=clean, properties=props)
    reader.send(Subscribe(1, [Subscription("a/#", 1)]))
    assert reader.receive().reason_codes == [1]  # a/# is granted: it names no secret
    return reader


def _publish_each(raw_clients, port: int, topics) -> None:
    publisher = raw_clients(port, MQTT_5)
    publisher.connect("writer")
    for packet_id, topic in enumerate(topics, 1):
        publisher.send(Publish(topic, topic.encode(), qos=1, packet_id=packet_id))
        publisher.receive()


def test_read_access_is_checked_at_delivery(start_broker, raw_clients, tmp_path):
    # A granted a/# does not carry live messages on a/secret to a client
    # denied it (Mosquitto checks read access for each delivery too).
    acl = tmp_path / "acl.conf"
    acl.write_text(SECRET_RULES)
    broker = start_broker(config=_config(acl))
    reader = _reader(raw_clients, broker.port)
    _publish_each(raw_clients, broker.port, ["a/secret", "a/open", "a/secret", "a/open2"])
    assert [reader.receive().payload for _ in range(2)] == [b"a/open", b"a/open2"]
    with pytest.raises(OSError):
        reader.receive(timeout=0.3)


def test_tightened_rules_reach_existing_and_offline_subscriptions(start_broker, raw_clients,
                                                                   tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text("{allow, all}.\n")
    broker = start_broker(config=_config(acl))
    online = _reader(raw_clients, broker.port, "online")
    away = _reader(raw_clients, broker.port, "away", clean=False)
    away.close()
    _publish_each(raw_clients, broker.port, ["a/secret"])
    assert online.receive().payload == b"a/secret"        # allowed, before the change
    acl.write_text(SECRET_RULES)
    assert all(on_every_node(broker, lambda node: node.reload_authorization()))
    _publish_each(raw_clients, broker.port, ["a/secret", "a/open"])
    assert online.receive().payload == b"a/open"
    back = raw_clients(broker.port, MQTT_5)
    assert back.connect("away", clean_start=False).session_present
    # Queued while away: the first a/secret (before the change) and a/open.
    assert [back.receive().payload for _ in range(2)] == [b"a/secret", b"a/open"]
    with pytest.raises(OSError):
        back.receive(timeout=0.3)


def test_rules_tightened_across_a_restart_reach_restored_subscriptions(
        start_broker, raw_clients, tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text("{allow, all}.\n")
    store = tmp_path / "store"
    config = _config(acl, f'durable_sessions {{ enable = true, data_dir = "{store}" }}')
    broker = start_broker(config=config)
    _reader(raw_clients, broker.port, "kept", clean=False).close()
    broker.stop()
    acl.write_text(SECRET_RULES)
    broker = start_broker(config=config)
    _publish_each(raw_clients, broker.port, ["a/secret", "a/open"])
    back = raw_clients(broker.port, MQTT_5)
    assert back.connect("kept", clean_start=False).session_present
    assert back.receive().payload == b"a/open"
    with pytest.raises(OSError):
        back.receive(timeout=0.3)


def test_a_shared_subscription_member_gets_only_what_it_may_read(start_broker, raw_clients,
                                                                 tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text(SECRET_RULES)
    broker = start_broker(config=_config(acl))
    member = raw_clients(broker.port, MQTT_5)
    member.connect("member")
    member.send(Subscribe(1, [Subscription("$share/g/a/#", 1)]))
    assert member.receive().reason_codes == [1]
    _publish_each(raw_clients, broker.port, ["a/secret", "a/open"])
    assert member.receive().payload == b"a/open"
    with pytest.raises(OSError):
        member.receive(timeout=0.3)
