"""Persistent sessions follow their client from node to node (cluster.sessions).

Real nodes on a real nats-server, real clients: paho where a library's view
is enough, the project's raw client where the exact packets matter (DUP).
"""

from __future__ import annotations

import signal
import time

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import (MQTT_3_1_1, MQTT_5, Puback, Publish, Subscribe,
                                    Subscription)
from bastionmq.auth.builtin_db import Ban
from bastionmq.hooks import Hooks
from conftest import RawClient
from nats_peer import poll
import test_cli
import test_cluster_bus
import test_cluster_wills
from test_cluster_bus import bus, synced
from test_cluster_wills import FAST

# The fixtures: a nats-server, and nodes started on it.
nats = test_cluster_bus.nats
nodes = test_cluster_bus.nodes
# ...and a node in a process of its own, to kill (with what it needs).
doomed = test_cluster_wills.doomed
start_process = test_cli.start_process
command = test_cli.command

TIMEOUT = 15.0


def knows(*running) -> None:
    """Every node has heard from every other (a CONNECT asks the nodes it knows)."""
    names = {node.broker.bus.name for node in running}
    for node in running:
        poll(lambda node=node: node.broker.bus.others() >= names - {node.broker.bus.name},
             "the nodes know each other")


@pytest.mark.parametrize("version", [paho.MQTTv311, paho.MQTTv5])
def test_a_persistent_session_follows_its_client_to_another_node(nodes, clients, version):
    a, b = nodes("a"), nodes("b")
    knows(a, b)
    persistent = {"clean": False} if version == paho.MQTTv311 else {
        "clean": False, "session_expiry": 300}
    device = clients(a.port, client_id="device-1", version=version, **persistent)
    device.subscribe("cmd/#", 1)
    device.disconnect()
    sender = clients(a.port, client_id="sender")
    for index in range(3):
        sender.publish("cmd/go", f"queued {index}", 1)  # queued on a, offline
    poll(lambda: len(a.broker.core.sessions["device-1"].queue or ()) == 3, "queued on a")
    again = clients(b.port, client_id="device-1", version=version, **persistent)
    assert again.session_present
    assert [m.payload for m in again.expect(3)] == [b"queued 0", b"queued 1", b"queued 2"]
    assert "device-1" not in a.broker.core.sessions
    assert bus(a).stats.sessions_given == 1 and bus(b).stats.sessions_taken == 1
    # Its subscription came too: what is published on a reaches it on b.
    synced(b)
    sender.publish("cmd/later", b"live", 1)
    [message] = again.expect()
    assert message.payload == b"live"
    again.expect_nothing_more("cmd/marker")


def test_a_connected_client_moves_with_its_messages_in_flight(nodes):
    a, b = nodes("a"), nodes("b")
    knows(a, b)
    first = RawClient(a.port, MQTT_5)
    assert first.connect("device-2", clean_start=False,
                         properties={"session_expiry_interval": 300}).reason_code == 0
    first.send(Subscribe(1, [Subscription("cmd/#", qos=1)]))
    first.receive()  # SUBACK
    a.publish("cmd/x", b"unacknowledged", qos=1)
    sent = first.receive()
    assert isinstance(sent, Publish) and not sent.dup  # and never acknowledged
    second = RawClient(b.port, MQTT_5)
    connack = second.connect("device-2", clean_start=False,
                             properties={"session_expiry_interval": 300})
    assert connack.reason_code == 0 and connack.session_present
    again = second.receive()
    assert isinstance(again, Publish)
    assert (again.payload, again.dup, again.packet_id) == (b"unacknowledged", True,
                                                           sent.packet_id)
    second.send(Puback(again.packet_id))
    assert first.closing_reasons() == [0x8E]  # taken over
    first.close()
    second.close()


def test_a_3_1_1_client_resumes_on_another_node(nodes):
    a, b = nodes("a"), nodes("b")
    knows(a, b)
    first = RawClient(a.port, MQTT_3_1_1)
    first.connect("device-3", clean_start=False)
    first.send(Subscribe(1, [Subscription("t", qos=1)]))
    first.receive()
    first.close()
    poll(lambda: a.broker.core.sessions["device-3"].connection is None, "offline on a")
    second = RawClient(b.port, MQTT_3_1_1)
    assert second.connect("device-3", clean_start=False).session_present
    second.close()


def _alice_on_a(nodes, clients, client_id: str):
    """Nodes a and b (any user whose password is "pw"), and alice's
    persistent session on a, connected, subscribed to "mine"."""
    anyone = Hooks(authenticate=lambda client: client.password == b"pw")
    a, b = nodes("a", hooks=anyone), nodes("b", hooks=anyone)
    knows(a, b)
    owner = clients(a.port, client_id=client_id, version=paho.MQTTv5, clean=False,
                    session_expiry=300, username="alice", password="pw")
    owner.subscribe("mine", 1)
    return a, b, owner


def test_a_session_of_another_identity_stays_where_it_is(nodes, clients):
    a, b, owner = _alice_on_a(nodes, clients, "device-4")
    intruder = RawClient(b.port, MQTT_5)
    connack = intruder.connect("device-4", clean_start=False, username="mallory",
                               password=b"pw", properties={"session_expiry_interval": 300})
    assert connack.reason_code == 0x87
    intruder.close()
    owner.expect_nothing_more("mine")  # still connected, subscription and all
    assert "device-4" in a.broker.core.sessions
    assert "device-4" not in b.broker.core.sessions


@pytest.mark.parametrize("online", [True, False])
def test_another_identity_with_clean_start_on_another_node_is_closed(nodes, clients, online):
    """A Clean Start CONNECT is answered without asking the other nodes
    (the claim is a broadcast): the node that holds the session for another
    identity objects, and the intruder's connection is closed with 0x87
    right after its CONNACK. The session and its connection stay."""
    a, b, owner = _alice_on_a(nodes, clients, "device-6")
    if not online:
        owner.disconnect()
        poll(lambda: a.run(lambda: a.broker.core.sessions["device-6"].connection) is None,
             "alice's session offline on a")
    intruder = RawClient(b.port, MQTT_5)
    assert intruder.connect("device-6", username="mallory", password=b"pw",
                            properties={"session_expiry_interval": 300}).reason_code == 0
    assert intruder.receive().reason_code == 0x87  # DISCONNECT
    intruder.close()
    poll(lambda: b.run(lambda: "device-6" not in b.broker.core.sessions),
         "mallory's session on b ended")
    assert b.run(lambda: b.broker.bus.stats.identity_refused) == 1
    if online:
        owner.expect_nothing_more("mine")  # still connected, subscription and all
    else:
        again = clients(a.port, client_id="device-6", version=paho.MQTTv5, clean=False,
                        session_expiry=300, username="alice", password="pw")
        assert again.session_present
        again.expect_nothing_more("mine")
    assert a.run(lambda: a.broker.core.sessions["device-6"].connection) is not None


def test_clean_start_on_another_node_ends_the_session(nodes, clients):
    a, b = nodes("a"), nodes("b")
    knows(a, b)
    device = clients(a.port, client_id="device-5", version=paho.MQTTv5, clean=False,
                     session_expiry=300)
    device.subscribe("cmd/#", 1)
    device.disconnect()
    fresh = clients(b.port, client_id="device-5", version=paho.MQTTv5, clean=True)
    assert not fresh.session_present
    poll(lambda: "device-5" not in a.broker.core.sessions, "the session on a ended")


def test_a_new_session_when_no_node_has_one(nodes, clients):
    a, b = nodes("a"), nodes("b")
    knows(a, b)
    device = clients(b.port, client_id="device-6", version=paho.MQTTv5, clean=False,
                     session_expiry=300)
    assert not device.session_present
    assert bus(b).stats.sessions_taken == 0


def loaded(node):
    """The snapshot of ``node``'s durable store; None when a commit of the
    running node crossed the reading (a store is loaded at start, not
    beside its own commits: the node's position in the stream commits every
    second)."""
    try:
        return node.call(node.broker.store.load(0.0))
    except KeyError:
        return None


def test_the_session_is_stored_by_the_node_it_moved_to(nodes, clients, tmp_path):
    a = nodes("a", "durable_sessions.enable = true")
    b = nodes("b", "durable_sessions.enable = true")
    knows(a, b)
    device = clients(a.port, client_id="device-7", version=paho.MQTTv5, clean=False,
                     session_expiry=300)
    device.subscribe("cmd/#", 1)
    device.disconnect()
    clients(a.port, client_id="sender").publish("cmd/kept", b"stored", 1)
    moved = clients(b.port, client_id="device-7", version=paho.MQTTv5, clean=False,
                    session_expiry=300)
    assert moved.session_present
    [message] = moved.expect()
    assert message.payload == b"stored"
    moved.disconnect()
    # b's store holds it now, a's no longer.
    snapshot_b = poll(lambda: (lambda snapshot: snapshot if snapshot and snapshot.sessions
                               else None)(loaded(b)), "the session in b's store")
    snapshot_a = a.call(a.broker.store.load(0.0))
    assert [s.client_id for s in snapshot_b.sessions] == ["device-7"]
    assert [s.subscriptions[0][0].filter for s in snapshot_b.sessions] == ["cmd/#"]
    assert snapshot_a.sessions == []


def test_a_node_back_with_a_copy_of_a_session_that_went_on_elsewhere_drops_it(
        doomed, nodes):
    """A node killed while it held a session comes back with the copy in its
    store, after its client resumed the session elsewhere (from the
    cluster's copy, cluster.replica): it gives its copy up, and the next
    resume gets the session as the client left it."""
    durable = f"durable_sessions.enable = true\ncluster.takeover_timeout = 300ms\n{FAST}"
    process, port = doomed("a", durable)
    b, c = nodes("b", durable), nodes("c", durable)
    persistent = {"clean_start": False, "properties": {"session_expiry_interval": 300}}
    first = RawClient(port, MQTT_5)
    assert first.connect("device-8", **persistent).reason_code == 0
    first.send(Subscribe(1, [Subscription("old/#", qos=1)]))
    first.receive()  # SUBACK
    first.close()
    time.sleep(0.3)  # offline, and stored
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    second = RawClient(b.port, MQTT_5)
    connack = second.connect("device-8", **persistent)
    assert connack.reason_code == 0 and connack.session_present  # from the copy a left
    second.send(Subscribe(1, [Subscription("new/#", qos=1)]))
    second.receive()
    second.close()
    poll(lambda: b.run(lambda: b.broker.core.sessions["device-8"].connection is None),
         "offline on b")
    process, port = doomed("a", durable)  # back, with its copy
    assert "its session went on on node b" in process.stderr
    poll(lambda: c.run(lambda: c.broker.bus.others()) >= {"a", "b"}, "c knows a again")
    third = RawClient(c.port, MQTT_5)
    assert third.connect("device-8", **persistent).session_present
    kept = c.run(lambda: set(c.broker.core.sessions["device-8"].subscriptions))
    assert kept == {"old/#", "new/#"}
    third.close()


BUILT_IN = "authentication = [ { mechanism = password_based, backend = built_in_database } ]"


def test_a_ban_made_on_one_node_holds_on_every_node(nodes):
    a, b = nodes("a", BUILT_IN), nodes("b", BUILT_IN)
    knows(a, b)
    rogue = RawClient(b.port, MQTT_5)
    assert rogue.connect("rogue").reason_code == 0
    a.call(a.broker.ban(Ban("clientid", "rogue", "tests")))
    assert rogue.receive().reason_code == 0x98  # DISCONNECT: administrative action
    rogue.close()
    again = RawClient(b.port, MQTT_5)
    assert again.connect("rogue").reason_code == 0x8A  # banned
    again.close()
    a.call(a.broker.unban("clientid", "rogue"))
    poll(lambda: b.run(lambda: list(b.broker.bans)) == [], "the ban lifted on b")
    back = RawClient(b.port, MQTT_5)
    assert back.connect("rogue").reason_code == 0
    back.close()


def test_rules_changed_on_one_node_hold_on_every_node(nodes, tmp_path):
    """Two workers of one machine read one built-in database: a rule the
    management API adds through one applies at once to a client of the
    other, whose earlier decision was cached."""
    shared = tmp_path / "shared"
    shared.mkdir()
    extra = (f'node.data_dir = "{shared}"\n{BUILT_IN}\n'
             "authorization { no_match = allow, sources = [ { type = built_in_database } ] }")
    a, b = nodes("a", extra), nodes("b", extra)
    knows(a, b)
    writer = RawClient(b.port, MQTT_5)
    assert writer.connect("w", username="dev").reason_code == 0
    packet_ids = iter(range(1, 1000))

    def publish() -> int:
        writer.send(Publish("secret/a", b"x", qos=1, packet_id=next(packet_ids)))
        return writer.receive().reason_code

    assert publish() in (0, 0x10)  # allowed (and the decision cached)
    a.call(a.broker.database.add_rule("username", "dev", "deny", "publish", "secret/#"))
    assert a.run(a.broker.rules_changed)
    poll(lambda: publish() == 0x87, "the new rule holds on b")
    writer.close()
