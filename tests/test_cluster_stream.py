"""QoS 1 and 2 between nodes through JetStream (cluster.stream): acknowledged
means stored, and a node that was away gets what was stored meanwhile.

Real nodes on a real nats-server with JetStream, real clients; the nodes that
are killed run in processes of their own.
"""

from __future__ import annotations

import random
import signal
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bastionmq.broker.codec import MQTT_5, Puback, Publish, Subscribe, Subscription
from conftest import RawClient
from nats_peer import poll
import test_cli
import test_cluster_bus
import test_cluster_wills
from test_cluster_bus import bus, stream_messages, synced

nats = test_cluster_bus.nats
nodes = test_cluster_bus.nodes
doomed = test_cluster_wills.doomed
start_process = test_cli.start_process
command = test_cli.command

DURABLE = "durable_sessions.enable = true"
PERSISTENT = {"version": paho.MQTTv5, "clean": False, "session_expiry": 3600}


def knows(*running) -> None:
    names = {node.broker.bus.name for node in running}
    for node in running:
        poll(lambda node=node: node.broker.bus.others() >= names - {node.broker.bus.name},
             "the nodes know each other")


def test_an_acknowledgement_waits_for_the_stream(nodes, nats, clients):
    """While NATS is away a QoS 1 message is routed to the node's own
    subscribers but not acknowledged; once NATS is back the node sends it
    again, the stream stores it, the PUBACK goes, and the other node's
    subscriber gets it once."""
    a, b = nodes("a"), nodes("b")
    reader = clients(b.port, client_id="reader")
    reader.subscribe("plant/#", 1)
    local = clients(a.port, client_id="local")
    local.subscribe("plant/#", 1)
    synced(a, b)
    nats.kill()
    poll(lambda: not bus(a).connected, "a lost NATS")
    writer = RawClient(a.port, MQTT_5)
    assert writer.connect("writer").reason_code == 0
    writer.send(Publish("plant/valve", b"closed", qos=1, packet_id=7))
    [message] = local.expect()
    assert message.payload == b"closed"  # routed here at once
    with pytest.raises(TimeoutError):
        writer.receive(timeout=1.0)  # not stored anywhere yet: no PUBACK
    nats.start()
    ack = writer.receive()
    assert isinstance(ack, Puback) and ack.packet_id == 7
    [message] = reader.expect()
    assert (message.topic, message.payload) == ("plant/valve", b"closed")
    reader.expect_nothing_more("plant/marker")
    [marker] = local.expect()  # reader's, from b: nothing came twice before it
    assert marker.topic == "plant/marker"
    assert stream_messages(a, "BMQ_MSGS") >= 1
    writer.close()


def test_qos_0_does_not_go_through_the_stream(nodes, clients):
    a, b = nodes("a"), nodes("b")
    reader = clients(b.port, client_id="reader")
    reader.subscribe("fast/#", 0)
    synced(b)
    clients(a.port, client_id="writer").publish("fast/x", b"0", 0)
    [message] = reader.expect()
    assert message.payload == b"0"
    assert stream_messages(a, "BMQ_MSGS", "bmq.d.fast.>") == 0


def test_the_core_path_keeps_qos_1_off_the_stream(nodes, clients):
    a, b = nodes("a", "cluster.qos1_path = core"), nodes("b", "cluster.qos1_path = core")
    reader = clients(b.port, client_id="reader")
    reader.subscribe("fast/#", 1)
    synced(b)
    clients(a.port, client_id="writer").publish("fast/x", b"1", 1)
    [message] = reader.expect()
    assert (message.payload, message.qos) == (b"1", 1)
    assert a.run(lambda: a.broker.bus.stream) is None


def test_a_node_back_from_sigkill_delivers_what_was_stored_while_it_was_down(
        doomed, nodes, clients):
    process, port = doomed("b", DURABLE)
    a = nodes("a")
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(port, client_id=client_id, **PERSISTENT)
        subscriber.subscribe(f"orders/{qos}/#", qos)
        subscriber.disconnect()
    time.sleep(0.2)  # the subscriptions at NATS, and in b's store
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    writer = clients(a.port, client_id="writer")
    for index in range(20):
        writer.publish(f"orders/1/{index}", str(index), 1)
        writer.publish(f"orders/2/{index}", str(index), 2)
    process, port = doomed("b", DURABLE)  # its store restored, then the stream read
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(port, client_id=client_id, **PERSISTENT)
        assert subscriber.session_present
        got = [int(message.payload) for message in subscriber.expect(20)]
        assert got == list(range(20))
        subscriber.expect_nothing_more(f"orders/{qos}/marker")


def _burst(doomed, nodes, clients, nats, victim: str, seed: int) -> None:
    """QoS 1 and QoS 2 messages published on node a into persistent offline
    sessions on node b, with ``victim`` (b, the nats-server, or both) killed
    with SIGKILL at a seeded random point and started again (or b killed
    for good, "node-gone": its sessions resume on a, from their copies in
    the cluster): every message a acknowledged reaches its session, and no
    QoS 2 message twice."""
    killed = victim in ("node", "both", "node-gone")
    rng = random.Random(seed)
    count = 300
    kill_at = rng.randrange(20, count - 20)
    process, port = doomed("b", DURABLE)
    a = nodes("a", DURABLE)
    knows(a)
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(port, client_id=client_id, **PERSISTENT)
        subscriber.subscribe(f"burst/{qos}/#", qos)
        subscriber.disconnect()
    time.sleep(0.2)
    writer = clients(a.port, client_id="writer", version=paho.MQTTv5)
    sent = {1: [], 2: []}
    for index in range(count):
        for qos in (1, 2):
            sent[qos].append(writer.paho.publish(f"burst/{qos}/{index}", str(index), qos))
        if index == kill_at:
            time.sleep(rng.random() * 0.05)
            if killed:
                process.process.send_signal(signal.SIGKILL)
            if victim in ("nats", "both"):
                nats.kill()
            if killed:
                process.process.wait()
            if victim in ("nats", "both"):
                nats.start()
    deadline = time.monotonic() + 60
    for infos in sent.values():
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    acked = {qos: {index for index, info in enumerate(infos) if info.is_published()}
             for qos, infos in sent.items()}
    assert len(acked[1]) == len(acked[2]) == count  # a's publisher was never cut off
    if victim in ("node", "both"):
        process, port = doomed("b", DURABLE)
    elif victim == "node-gone":
        port = a.port
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(port, client_id=client_id, **PERSISTENT)
        assert subscriber.session_present
        got = _collect(subscriber, f"burst/{qos}/marker", qos)
        missing = acked[qos] - set(got)
        assert not missing, f"QoS {qos}: {len(missing)} acknowledged messages lost: " \
                            f"{sorted(missing)[:20]}"
        if qos == 2:
            twice = sorted({index for index in got if got.count(index) > 1})
            assert not twice, f"QoS 2 messages delivered twice: {twice[:20]}"


def _collect(subscriber, marker: str, qos: int) -> list[int]:
    """The numbers of the messages ``subscriber`` gets before ``marker``."""
    got: list[int] = []
    # At the subscriber's QoS: paho hands a QoS 2 message over at its
    # PUBREL, so a QoS 1 marker could pass the last ones.
    subscriber.publish(marker, b"marker", qos)
    while True:
        message = subscriber.messages.get(timeout=30)
        if message.topic == marker:
            return got
        got.append(int(message.payload))


@pytest.mark.parametrize("victim", ["node", "nats", "both", "node-gone"])
@pytest.mark.parametrize("seed", [1, 2])
def test_nothing_acknowledged_is_lost_when_a_node_or_nats_is_killed(
        doomed, nodes, clients, nats, victim, seed):
    _burst(doomed, nodes, clients, nats, victim, seed)


@pytest.mark.parametrize("seed", [3, 4])
def test_a_publishers_node_killed_mid_burst_duplicates_no_qos_2_message(
        doomed, nodes, clients, seed):
    """The node a persistent publisher is connected to is killed at a seeded
    random point of its burst and started again on its port; the publisher
    reconnects, resumes its session and sends again what was not
    acknowledged. The id each QoS 2 message was stored under is kept with
    its packet id in the session, committed before the message goes to the
    stream: a resent PUBLISH is stored under it again, and the stream drops
    the copy it has. Every message reaches the subscriber's session on
    another node, QoS 2 ones once."""
    rng = random.Random(seed)
    count = 300
    kill_at = rng.randrange(20, count - 20)
    b = nodes("b", DURABLE)
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(b.port, client_id=client_id, **PERSISTENT)
        subscriber.subscribe(f"burst/{qos}/#", qos)
        subscriber.disconnect()
    synced(b)
    # paho (2.2) sends everything it holds at once when it reconnects, past
    # its own in-flight bound: a Receive Maximum above the burst lets it.
    publisher_node = f"{DURABLE}\nmqtt.max_awaiting_rel = 1000"
    process, port = doomed("a", publisher_node)
    writer = clients(port, client_id="writer", **PERSISTENT)
    # Completed exchanges (PUBACK, PUBCOMP), by message id: paho keeps what
    # is published while it is disconnected and sends it once it is back.
    completed: set[int] = set()
    writer.paho.on_publish = lambda client, userdata, mid, *rest: completed.add(mid)
    mids = []
    for index in range(count):
        for qos in (1, 2):
            mids.append(writer.paho.publish(f"burst/{qos}/{index}", str(index), qos).mid)
        if index == kill_at:
            time.sleep(rng.random() * 0.05)
            process.process.send_signal(signal.SIGKILL)
            process.process.wait()
            # paho reconnects once, by hand (its first attempt of its own
            # comes a second after the loss): each of its failed attempts
            # while the node is down would turn a message waiting for its
            # PUBCOMP back into one to PUBLISH again (paho 2.2), a new
            # message for any broker.
            writer.paho.loop_stop()
            writer.paho._reset_sockets()  # loop_start makes a new wake-up pair: no leak
            process, _ = doomed("a", publisher_node, port=port)
            writer.paho.reconnect()
            writer.paho.loop_start()
    poll(lambda: completed >= set(mids), "every exchange completed", timeout=60)
    for client_id, qos in (("q1", 1), ("q2", 2)):
        subscriber = clients(b.port, client_id=client_id, **PERSISTENT)
        got = _collect(subscriber, f"burst/{qos}/marker", qos)
        missing = set(range(count)) - set(got)
        assert not missing, f"QoS {qos}: {len(missing)} lost: {sorted(missing)[:20]}"
        if qos == 2:
            twice = sorted({index for index in got if got.count(index) > 1})
            assert not twice, f"QoS 2 messages delivered twice: {twice[:20]}"


def test_a_subscriber_of_another_node_that_keeps_up_loses_nothing(nodes, clients):
    """Publishers on node a far faster than a subscriber on node b reads:
    b's queue for it passes its high-water mark, b holds the stream back
    (the live copies wait in JetStream) and reads them from its position
    once the subscriber has drained, instead of dropping the oldest past
    max_mqueue_len. Every message arrives, in order."""
    a = nodes("a")
    b = nodes("b", "mqtt.max_mqueue_len = 100")  # high-water mark 50
    reader = RawClient(b.port, MQTT_5)
    assert reader.connect("reader", properties={"receive_maximum": 10}).reason_code == 0
    reader.send(Subscribe(1, [Subscription("flood/#", qos=1)]))
    reader.receive()  # SUBACK
    synced(b)
    count = 2000
    writer = clients(a.port, client_id="writer")
    infos = [writer.paho.publish(f"flood/{index % 7}", str(index), 1) for index in range(count)]
    got = []
    while len(got) < count:
        packet = reader.receive()
        assert isinstance(packet, Publish)
        got.append(int(packet.payload))
        reader.send(Puback(packet.packet_id))
        if len(got) % 20 == 0:
            time.sleep(0.002)  # reads on, slower than the publisher
    assert got == list(range(count))
    assert all(info.is_published() for info in infos)
    stream = b.run(lambda: b.broker.bus.stream.stats)
    assert stream.holds >= 1 and stream.caught_up > 0
    assert b.run(lambda: b.broker.core.stats.dropped_queue_full) == 0
    reader.close()


def test_a_stalled_subscriber_holds_the_stream_back_for_its_timeout_only(nodes, clients):
    """A subscriber of node b that stops reading holds the stream back for
    mqtt.slow_subscriber_timeout, then is taken for slow: the others of b
    get every message (late by at most the timeout), and it loses its own
    oldest past max_mqueue_len, counted."""
    a = nodes("a")
    b = nodes("b", "mqtt.max_mqueue_len = 100\nmqtt.slow_subscriber_timeout = 300ms")
    stalled = RawClient(b.port, MQTT_5)
    assert stalled.connect("stalled", properties={"receive_maximum": 5}).reason_code == 0
    stalled.send(Subscribe(1, [Subscription("flood/#", qos=1)]))
    stalled.receive()  # SUBACK; nothing read after it
    reader = clients(b.port, client_id="reader")
    reader.subscribe("flood/#", 1)
    synced(b)
    count = 1000
    writer = clients(a.port, client_id="writer")
    for index in range(count):
        writer.paho.publish("flood/x", str(index), 1)
    got = [int(message.payload) for message in reader.expect(count, timeout=30)]
    assert sorted(got) == list(range(count))
    assert b.run(lambda: b.broker.bus.stream.stats.holds) >= 1
    assert b.run(lambda: b.broker.core.stats.slow_subscribers) == 1
    assert b.run(lambda: b.broker.core.stats.dropped_queue_full) > 0  # the stalled one's
    stalled.close()


def test_a_message_read_from_the_stream_keeps_the_time_it_had_left(doomed, nodes, clients):
    """At catch-up a message's expiry counts from when the stream stored it:
    one that ran out while its node was down is not delivered, one with
    time left arrives with less of it."""
    process, port = doomed("b", DURABLE)
    a = nodes("a")
    subscriber = clients(port, client_id="keeper", **PERSISTENT)
    subscriber.subscribe("ttl/#", 1)
    subscriber.disconnect()
    time.sleep(0.2)
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    writer = clients(a.port, client_id="writer", version=paho.MQTTv5)
    for topic, seconds in (("ttl/short", 1), ("ttl/long", 600)):
        properties = Properties(PacketTypes.PUBLISH)
        properties.MessageExpiryInterval = seconds
        writer.publish(topic, b"x", 1, properties=properties)
    time.sleep(1.5)  # the short one runs out while b is down
    process, port = doomed("b", DURABLE)
    again = clients(port, client_id="keeper", **PERSISTENT)
    [message] = again.expect()
    assert message.topic == "ttl/long"
    assert 590 <= message.properties.MessageExpiryInterval < 600
    again.expect_nothing_more("ttl/marker")


def test_a_node_that_wants_little_of_the_stream_keeps_its_position_current(nodes, clients):
    """Node b's subscribers want none of what node a publishes: b's marks
    (cluster.stream) still move its position to the stream's end, so that a
    catch-up (here after a hold) neither reads all of it again nor gives a
    subscription made since the messages stored before it."""
    a, b = nodes("a"), nodes("b")
    knows(a, b)
    elsewhere = clients(b.port, client_id="elsewhere")
    elsewhere.subscribe("rare/#", 1)
    writer = clients(a.port, client_id="writer")
    for index in range(300):
        writer.publish("busy/x", str(index), 1)
    last = stream_messages(a, "BMQ_MSGS")  # (and marks: none deleted, the last sequence)
    assert last >= 300
    poll(lambda: b.run(lambda: b.broker.bus.stream.position) >= last, "b's position moves")
    late = clients(b.port, client_id="late")
    late.subscribe("busy/#", 1)
    stream = b.broker.bus.stream
    b.run(stream.hold)
    b.run(stream.release)  # reads the stream from b's position on
    poll(lambda: not b.run(lambda: stream.catching_up), "b caught up")
    late.expect_nothing_more("busy/marker")
    assert b.run(lambda: stream.stats.caught_up) == 0
