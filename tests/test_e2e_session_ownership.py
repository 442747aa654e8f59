"""A session belongs to the identity that made it: another identity that
presents its client id neither resumes it, nor takes over its connection,
nor wipes it (mqtt.session_takeover_by_other_identity)."""

from __future__ import annotations

import sqlite3
import ssl
import time
from pathlib import Path

import pytest

from bastionmq.broker.codec import MQTT_3_1_1, MQTT_5, Publish, Subscribe, Subscription
from bastionmq.broker.ownership import client_from_record, client_record, owner_of
from bastionmq.broker.ports import ClientInfo, PeerInfo
from bastionmq.broker.store.sqlite import SCHEMA, SCHEMA_VERSION
from bastionmq.pki import init_pki, issue_client
from cluster_switch import gathered
from conftest import RawClient
from tls_helpers import ssl_listener, tls_socket


def _config(passwd: Path, extra: str = "") -> str:
    return f"""
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
authentication = [ {{ mechanism = password_based, backend = password_file, path = "{passwd}" }} ]
{extra}
"""


def _alice_leaves_a_message(broker, raw_clients, version: int) -> None:
    alice = raw_clients(broker.port, version)
    props = {"session_expiry_interval": 3600} if version == MQTT_5 else {}
    assert alice.connect("alice-phone", username="alice", password=b"wonderland",
                         clean_start=False, properties=props).reason_code == 0
    alice.send(Subscribe(1, [Subscription("home/alice/#", 1)]))
    alice.receive()
    alice.close()
    sender = raw_clients(broker.port, version)
    sender.connect("sender", username="alice", password=b"wonderland")
    sender.send(Publish("home/alice/door", b"open", qos=1, packet_id=1))
    sender.receive()


@pytest.mark.one_node(
    "across nodes another identity's Clean Start gets DISCONNECT 0x87 right after its "
    "CONNACK (tests/test_cluster_sessions.py)")
@pytest.mark.parametrize("version, refusal", [(MQTT_5, 0x87), (MQTT_3_1_1, 5)])
@pytest.mark.parametrize("clean", [False, True])
def test_another_user_cannot_resume_or_wipe_a_session(start_broker, raw_clients, passwd,
                                                      version, refusal, clean):
    broker = start_broker(config=_config(passwd))
    _alice_leaves_a_message(broker, raw_clients, version)
    bob = raw_clients(broker.port, version)
    props = {"session_expiry_interval": 3600} if version == MQTT_5 and not clean else {}
    assert bob.connect("alice-phone", username="bob", password=b"builder", clean_start=clean,
                       properties=props).reason_code == refusal
    # Alice's session is untouched: she resumes it and gets her message.
    alice = raw_clients(broker.port, version)
    props = {"session_expiry_interval": 3600} if version == MQTT_5 else {}
    connack = alice.connect("alice-phone", username="alice", password=b"wonderland",
                            clean_start=False, properties=props)
    assert connack.reason_code == 0 and connack.session_present
    assert alice.receive().payload == b"open"


@pytest.mark.one_node(
    "across nodes another identity's Clean Start gets DISCONNECT 0x87 right after its "
    "CONNACK (tests/test_cluster_sessions.py)")
def test_another_user_cannot_take_over_a_live_connection(start_broker, raw_clients, passwd):
    broker = start_broker(config=_config(passwd))
    alice = raw_clients(broker.port, MQTT_5)
    alice.connect("alice-phone", username="alice", password=b"wonderland")
    bob = raw_clients(broker.port, MQTT_5)
    assert bob.connect("alice-phone", username="bob", password=b"builder").reason_code == 0x87
    alice.send(Subscribe(1, [Subscription("still/here", 0)]))
    assert alice.receive().reason_codes == [0]  # her connection goes on


def test_the_clean_policy_gives_another_user_a_fresh_session(start_broker, raw_clients, passwd):
    broker = start_broker(config=_config(
        passwd, "mqtt.session_takeover_by_other_identity = clean"))
    _alice_leaves_a_message(broker, raw_clients, MQTT_5)
    bob = raw_clients(broker.port, MQTT_5)
    connack = bob.connect("alice-phone", username="bob", password=b"builder", clean_start=False,
                          properties={"session_expiry_interval": 3600})
    assert connack.reason_code == 0 and not connack.session_present
    bob.send(Subscribe(1, [Subscription("bob/x", 0)]))
    # Nothing of alice's: the SUBACK is the first thing bob gets.
    assert bob.receive().reason_codes == [0]
    # The session is now bob's: alice, the other identity now, gets a new one
    # in turn, not bob's.
    alice = raw_clients(broker.port, MQTT_5)
    connack = alice.connect("alice-phone", username="alice", password=b"wonderland",
                            clean_start=False)
    assert connack.reason_code == 0 and not connack.session_present


def test_the_same_user_with_another_certificate_is_another_identity(start_broker, raw_clients,
                                                                    tmp_path):
    certs = tmp_path / "pki"
    init_pki(certs)
    issue_client(certs, "sensor-7")
    issue_client(certs, "sensor-8")
    broker = start_broker(config=ssl_listener(certs, verify="verify_peer",
                                              fail_if_no_peer_cert="true") + "allow_anonymous = true")

    def tls_raw_client(cert: str) -> RawClient:
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        context.load_cert_chain(certs / f"{cert}.pem", certs / f"{cert}.key")
        return RawClient(0, MQTT_5, sock=tls_socket(broker.port_of("ssl:default"), context))

    first = tls_raw_client("sensor-7")
    assert first.connect("device", clean_start=False,
                         properties={"session_expiry_interval": 60}).reason_code == 0
    first.close()
    other = tls_raw_client("sensor-8")
    assert other.connect("device", clean_start=False).reason_code == 0x87
    again = tls_raw_client("sensor-7")
    connack = again.connect("device", clean_start=False)
    assert connack.reason_code == 0 and connack.session_present


def test_use_username_as_clientid(start_broker, raw_clients, passwd):
    broker = start_broker(config=_config(passwd, "mqtt.use_username_as_clientid = true"))
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("whatever", username="alice", password=b"wonderland").reason_code == 0
    assert gathered(broker, lambda node: list(node.core.sessions)) == ["alice"]


def _only_alice_resumes(broker, raw_clients):
    """bob is refused alice's session; then alice resumes it."""
    bob = raw_clients(broker.port, MQTT_5)
    assert bob.connect("alice-phone", username="bob", password=b"builder",
                       clean_start=False).reason_code == 0x87
    alice = raw_clients(broker.port, MQTT_5)
    connack = alice.connect("alice-phone", username="alice", password=b"wonderland",
                            clean_start=False, properties={"session_expiry_interval": 3600})
    assert connack.reason_code == 0 and connack.session_present
    return alice


def test_a_durable_session_keeps_its_owner_across_a_restart(start_broker, raw_clients, passwd,
                                                           tmp_path):
    config = _config(passwd, f'durable_sessions {{ enable = true, data_dir = "{tmp_path}" }}')
    broker = start_broker(config=config)
    _alice_leaves_a_message(broker, raw_clients, MQTT_5)
    broker.stop()
    broker = start_broker(config=config)
    alice = _only_alice_resumes(broker, raw_clients)
    assert alice.receive().payload == b"open"


@pytest.mark.one_node("starts a broker again on one node's store")
def test_a_store_of_the_first_layout_is_brought_up_to_date(start_broker, raw_clients, passwd,
                                                          tmp_path):
    # A store as the first layout wrote it: no client facts, the username alone.
    first_layout = SCHEMA.replace(", client TEXT);", ");").replace(
        ",\n    client TEXT) WITHOUT ROWID;", ") WITHOUT ROWID;")
    first_layout = first_layout[:first_layout.index("CREATE TABLE positions")].replace(
        " stream_id TEXT,", "")
    assert "client TEXT" not in first_layout and "stream_id" not in first_layout
    db = sqlite3.connect(tmp_path / "sessions.sqlite3")
    db.executescript(first_layout + "INSERT INTO schema_version VALUES (1);")
    with db:
        db.execute("INSERT INTO sessions VALUES (1, 'alice-phone', 3600, ?, 'alice')",
                   (time.time(),))
        # A will held back by its delay: alice's return cancels it.
        db.execute("INSERT INTO wills VALUES ('alice-phone', 'alice', 'status/alice', "
                   "X'676f6e65', 0, 0, NULL, ?)", (time.time() + 1.0,))
    db.close()
    config = _config(passwd, f'durable_sessions {{ enable = true, data_dir = "{tmp_path}" }}')
    broker = start_broker(config=config)
    watcher = raw_clients(broker.port, MQTT_5)
    watcher.connect("watcher", username="bob", password=b"builder")
    watcher.send(Subscribe(1, [Subscription("status/#", 0)]))
    watcher.receive()
    _only_alice_resumes(broker, raw_clients)
    with pytest.raises(OSError):
        watcher.receive(timeout=1.5)  # past the will's due time: nothing
    db = sqlite3.connect(tmp_path / "sessions.sqlite3")
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert db.execute("SELECT * FROM positions").fetchall() == []
    db.close()


def test_a_client_record_round_trips():
    peer = PeerInfo(listener="ssl:default", address=("10.0.0.7", 51000), tls=True,
                    psk_identity="dev-1")
    client = ClientInfo(client_id="c", username="u", peer=peer, superuser=True)
    back, owner = client_from_record("c", "u", client_record(client), None)
    assert back == client
    assert owner == owner_of(client)
    assert owner != owner_of(ClientInfo(client_id="c", username="u",
                                        peer=PeerInfo(listener="tcp:default")))
