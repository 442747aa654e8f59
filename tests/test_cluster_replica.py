"""Persistent sessions outlive their node (cluster.replica): a client resumes
its session on another node while the node that held it is killed or
stopped, with everything the stream stored for it; a stopped node that
resumes is fenced out of the sessions that went on elsewhere.

Real nodes on a real nats-server with JetStream, real clients; the node
that is killed or stopped runs in a process of its own.
"""

from __future__ import annotations

import queue
import random
import signal
import time

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import MQTT_5
from conftest import RawClient
from nats_peer import poll
import test_cli
import test_cluster_bus
import test_cluster_wills
from test_cluster_bus import synced
from test_cluster_stream import DURABLE, PERSISTENT, knows

nats = test_cluster_bus.nats
nodes = test_cluster_bus.nodes
doomed = test_cluster_wills.doomed
start_process = test_cli.start_process
command = test_cli.command
FAST = test_cluster_wills.FAST

SESSION_TAKEN_OVER = 0x8E


def heard_from(subscriber, via: int, clients, topic: str) -> None:
    """Wait until a message published on the node at port ``via`` reaches
    ``subscriber`` on ``topic`` (its subscription is in place at the NATS
    server, which a SUBACK does not promise); the probes it got are dropped."""
    probe = clients(via, client_id=f"probe-{topic.replace('/', '-')}")
    deadline = time.monotonic() + 10
    while True:
        probe.publish(topic, b"probe", 1)
        try:
            subscriber.messages.get(timeout=0.2)
            break
        except queue.Empty:
            assert time.monotonic() < deadline, f"nothing published on {topic} arrives"
    time.sleep(0.1)
    while not subscriber.messages.empty():
        subscriber.messages.get_nowait()
    probe.disconnect()


def offline_subscribers(port: int, clients, prefix: str, via: int) -> None:
    """Persistent sessions q1 (QoS 1) and q2 (QoS 2) on ``port``, offline,
    their subscriptions known at NATS (``via``: another node's port)."""
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(port, client_id=client_id, **PERSISTENT)
        subscriber.subscribe(f"{prefix}/{qos}/#", qos)
        heard_from(subscriber, via, clients, f"{prefix}/{qos}/probe")
        subscriber.disconnect()


def publish(writer, prefix: str, numbers: range) -> None:
    for index in numbers:
        writer.publish(f"{prefix}/1/{index}", str(index), 1)
        writer.publish(f"{prefix}/2/{index}", str(index), 2)


def numbers(subscriber, count: int) -> list[int]:
    """The next ``count`` numbered messages (markers and probes of other
    subscribers' checks on the same topics left out)."""
    got: list[int] = []
    while len(got) < count:
        got.extend(int(m.payload) for m in subscriber.expect() if m.payload.isdigit())
    return got


def resume_and_count(port: int, clients, prefix: str, count: int) -> None:
    """q1 and q2 resume on ``port`` with Session Present 1 and get messages
    0 .. count-1, in order, once each."""
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(port, client_id=client_id, **PERSISTENT)
        assert subscriber.session_present
        got = numbers(subscriber, count)
        assert got == list(range(count))
        subscriber.expect_nothing_more(f"{prefix}/{qos}/marker")
        subscriber.disconnect()


def test_a_session_resumes_on_another_node_while_its_node_is_dead(doomed, nodes, clients):
    """Node a holds two offline sessions and dies for good (SIGKILL, not
    started again): their clients resume them on node b with everything
    acknowledged before and after the kill, once each, in order."""
    process, port = doomed("a", f"{DURABLE}\n{FAST}")
    b = nodes("b", FAST)
    knows(b)
    offline_subscribers(port, clients, "orders", b.port)
    writer = clients(b.port, client_id="writer", version=paho.MQTTv5)
    publish(writer, "orders", range(10))
    time.sleep(0.3)  # a has them in its queues
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    publish(writer, "orders", range(10, 20))
    resume_and_count(b.port, clients, "orders", 20)
    counters = b.run(lambda: b.broker.bus.status()["sessions"]["counters"])
    assert counters["taken"] == 2 and counters["given_up"] == 0 and counters["written"] >= 2
    # b writes the copies from now on: a second resume finds the session.
    publish(writer, "orders", range(20, 25))
    for client_id in ("q1", "q2"):
        subscriber = clients(b.port, client_id=client_id, **PERSISTENT)
        assert subscriber.session_present
        assert numbers(subscriber, 5) == list(range(20, 25))


def test_a_clean_start_ends_the_copy_a_dead_node_left(doomed, nodes, clients):
    """A client whose session's node died starts clean elsewhere: the copy
    of its former session goes, and a later resume finds nothing."""
    process, port = doomed("a", f"{DURABLE}\n{FAST}")
    b = nodes("b", FAST)
    knows(b)
    offline_subscribers(port, clients, "old", b.port)
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    poll(lambda: b.run(lambda: "a" in b.broker.bus.replica.departed), "b knows a went")
    clean = clients(b.port, client_id="q1", version=paho.MQTTv5)
    assert not clean.session_present
    poll(lambda: b.run(lambda: b.broker.bus.replica.stats.written) >= 1, "the copy ended")
    clean.disconnect()
    again = clients(b.port, client_id="q1", **PERSISTENT)
    assert not again.session_present
    # q2 did not start clean: its session is there.
    assert clients(b.port, client_id="q2", **PERSISTENT).session_present


def test_another_identity_cannot_start_clean_over_the_session_a_dead_node_left(
        doomed, nodes, clients):
    """The node that held alice's session is dead: its copy still speaks
    for her. Another identity that connects with her client id (Clean
    Start, with or without an expiry) is closed with 0x87 right after its
    CONNACK, and the copy stays: alice resumes her session from it."""
    process, port = doomed("a", f"{DURABLE}\n{FAST}")
    b = nodes("b", FAST)
    knows(b)
    alice = clients(port, client_id="device-7", username="alice", **PERSISTENT)
    alice.subscribe("mine/#", 1)
    heard_from(alice, b.port, clients, "mine/probe")
    alice.disconnect()
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    poll(lambda: b.run(lambda: "a" in b.broker.bus.replica.departed), "b knows a went")
    for expiry in (300, 0):
        intruder = RawClient(b.port, MQTT_5)
        connack = intruder.connect("device-7", username="mallory",
                                   properties={"session_expiry_interval": expiry})
        assert connack.reason_code == 0 and not connack.session_present
        assert intruder.receive().reason_code == 0x87  # DISCONNECT
        intruder.close()
    assert b.run(lambda: b.broker.bus.stats.identity_refused) == 2
    again = clients(b.port, client_id="device-7", username="alice", **PERSISTENT)
    assert again.session_present
    again.publish("mine/marker", b"marker", qos=1)
    # Her subscription is there; before the marker, at most late probes of heard_from.
    while (message := again.expect()[0]).topic != "mine/marker":
        assert message.topic == "mine/probe"


def test_a_stopped_node_loses_its_sessions_and_is_fenced_when_it_resumes(
        doomed, nodes, clients):
    """Node a is stopped (SIGSTOP) while it holds an online session and two
    offline ones: their clients resume them on node b with what was
    acknowledged; when a resumes, it gives them up (the connection it still
    had is closed with 0x8E) and writes nothing over b's copies."""
    process, port = doomed("a", f"{DURABLE}\n{FAST}")
    b = nodes("b", FAST)
    knows(b)
    offline_subscribers(port, clients, "plant", b.port)
    online = clients(port, client_id="online", **PERSISTENT)
    online.subscribe("plant/1/#", 1)
    heard_from(online, b.port, clients, "plant/1/probe-online")
    writer = clients(b.port, client_id="writer", version=paho.MQTTv5)
    synced(b)
    publish(writer, "plant", range(10))
    got = numbers(online, 10)
    assert got == list(range(10))
    time.sleep(1.5)  # a checkpoint of the acknowledgements
    process.process.send_signal(signal.SIGSTOP)
    try:
        publish(writer, "plant", range(10, 20))
        resume_and_count(b.port, clients, "plant", 20)
        moved = clients(b.port, client_id="online", **PERSISTENT)
        assert moved.session_present
        assert numbers(moved, 10) == list(range(10, 20))
    finally:
        process.process.send_signal(signal.SIGCONT)
    # a finds it stood still, checks its sessions, and gives them up: its
    # connection of "online" goes with 0x8E.
    assert online.disconnects.get(timeout=10) == SESSION_TAKEN_OVER
    poll(lambda: "the copy here goes" in process.stderr, "a gave its sessions up")
    publish(writer, "plant", range(20, 23))
    assert numbers(moved, 3) == [20, 21, 22]
    moved.expect_nothing_more("plant/1/marker")
    moved.disconnect()
    # b still holds them: resumed on a, they come from b with what b kept.
    publish(writer, "plant", range(23, 25))
    for client_id, qos in (("q1", 1), ("q2", 2), ("online", 1)):
        again = clients(port, client_id=client_id, **PERSISTENT)
        assert again.session_present
        expected = list(range(20, 25)) if client_id != "online" else [23, 24]
        assert numbers(again, len(expected)) == expected
        again.expect_nothing_more(f"plant/{qos}/marker")
    try:
        online.disconnects.get(timeout=0.2)
    except queue.Empty:
        pass


@pytest.mark.parametrize("seed", [5, 6])
def test_an_online_qos_2_subscriber_gets_each_message_once_across_a_failover(
        doomed, nodes, clients, seed):
    """A persistent QoS 2 subscriber connected to node a while QoS 2
    messages published on a and on b stream to it; a is killed (SIGKILL, for
    good) at a seeded random point. The subscriber resumes on b: every
    message acknowledged to its publisher reaches it, none twice (a QoS 2
    PUBLISH and its PUBREL leave only once the session's copy knows them).
    The subscriber is the same client, with what it held, as a client that
    resumes its session must be."""
    rng = random.Random(seed)
    count = 200
    kill_at = rng.randrange(20, count - 20)
    process, port = doomed("a", f"{DURABLE}\n{FAST}")
    b = nodes("b", FAST)
    knows(b)
    got: list[str] = []
    subscriber = clients(port, client_id="watcher", **PERSISTENT)
    subscriber.subscribe("feed/#", 2)
    heard_from(subscriber, b.port, clients, "feed/probe")
    on_a = clients(port, client_id="on-a", version=paho.MQTTv5)
    on_b = clients(b.port, client_id="on-b", version=paho.MQTTv5)
    synced(b)
    sent = []
    for index in range(count):
        sent.append((f"b{index}", on_b.paho.publish("feed/b", f"b{index}", 2)))
        if index < kill_at:
            sent.append((f"a{index}", on_a.paho.publish("feed/a", f"a{index}", 2)))
        if index == kill_at:
            time.sleep(rng.random() * 0.05)
            process.process.send_signal(signal.SIGKILL)
            process.process.wait()
    deadline = time.monotonic() + 30
    for name, info in sent:
        if name.startswith("b"):  # (a's publisher lost its node: what it has, it has)
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    acked = {name for name, info in sent if info.is_published()}
    assert {f"b{index}" for index in range(count)} <= acked
    # The same client reconnects to b, with the QoS 2 messages it holds
    # (received, waiting for their PUBREL): a client resuming a session keeps
    # its side of it. (By hand: see test_cluster_stream on paho's retries.)
    subscriber.paho.loop_stop()
    subscriber.paho._reset_sockets()  # loop_start makes a new wake-up pair: no leak
    subscriber.port = b.port
    flags, _, _ = subscriber.connect()
    assert flags.session_present
    subscriber.publish("feed/marker", b"marker", 2)
    while True:
        message = subscriber.messages.get(timeout=30)
        if message.topic == "feed/marker":
            break
        got.append(message.payload.decode())
    # Messages resent under their packet ids complete at their own pace (a
    # PUBREL each): some may pass the marker.
    while True:
        try:
            got.append(subscriber.messages.get(timeout=1.0).payload.decode())
        except queue.Empty:
            break
    missing = acked - set(got)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:20]}"
    twice = sorted({name for name in got if got.count(name) > 1})
    assert not twice, f"QoS 2 messages delivered twice: {twice[:20]}"


def test_messages_that_reach_the_old_node_too_late_follow_the_session(nodes, clients):
    """A session moves between live nodes while messages for it are on
    their way to the node it leaves (here held there: node a holds its
    stream back, as it does for a slow subscriber): the node it comes to
    reads them from the stream, from the position the session left with."""
    a, b, c = nodes("a", FAST), nodes("b", FAST), nodes("c", FAST)
    knows(a, b, c)
    first = clients(a.port, client_id="mover", **PERSISTENT)
    first.subscribe("moving/#", 1)
    first.disconnect()
    synced(a)
    writer = clients(c.port, client_id="writer", version=paho.MQTTv5)
    writer.publish("moving/x", "0", 1)
    poll(lambda: a.run(lambda: len(a.broker.core.sessions["mover"].queue or ())) == 1,
         "a queued the first")
    stream = a.broker.bus.stream
    a.run(stream.hold)  # what comes now waits in the stream for a
    for index in range(1, 6):
        writer.publish("moving/x", str(index), 1)
    moved = clients(b.port, client_id="mover", **PERSISTENT)
    assert moved.session_present
    assert numbers(moved, 6) == list(range(6))
    a.run(stream.release)
    moved.expect_nothing_more("moving/marker")


def test_a_session_that_ends_with_subscriptions_leaves_its_copy_ended(nodes, clients):
    """Ending a session unsubscribes its filters: that must not write it
    back as a live copy over the copy that says it ended (which another
    node would take for a session to resume)."""
    a = nodes("a", FAST)
    knows(a)
    brief = clients(a.port, client_id="brief", version=paho.MQTTv5, clean=False,
                    session_expiry=1)
    brief.subscribe("x/#", 1)
    brief.subscribe("y/#", 1)
    brief.disconnect()
    poll(lambda: a.run(lambda: "brief" not in a.broker.core.sessions), "the session expired")

    def ended() -> bool:
        found = a.call(a.broker.bus.replica.read("brief"))
        return found is not None and bool(found[0].get("ended"))

    poll(ended, "its copy says it ended")
    assert a.run(lambda: "brief" not in a.broker.bus.replica.known)
