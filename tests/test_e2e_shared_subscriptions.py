"""Shared subscriptions ($share/{group}/{filter}, MQTT 5.0 4.8.2; served to 3.1.1 too)."""

from __future__ import annotations

import collections
import queue
import time

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Disconnect, Puback, Publish, Pubrec, Pubrel, Subscribe, Subscription,
    Unsubscribe,
)


def _members(clients, port, count, topic_filter="$share/workers/jobs/#", qos=1,
             versions=(paho.MQTTv5,)):
    members = []
    for index in range(count):
        member = clients(port, client_id=f"worker-{index}",
                         version=versions[index % len(versions)])
        assert member.subscribe(topic_filter, qos) == [qos]
        members.append(member)
    return members


def _received(members, total, timeout=10.0):
    """{member index: [payloads]} once ``total`` messages have arrived in all."""
    got: dict[int, list[bytes]] = collections.defaultdict(list)
    count = 0
    deadline = time.monotonic() + timeout
    while count < total:
        assert time.monotonic() < deadline, f"only {count} of {total} messages arrived"
        arrived = False
        for index, member in enumerate(members):
            try:
                got[index].append(member.messages.get_nowait().payload)
            except queue.Empty:
                continue
            count += 1
            arrived = True
        if not arrived:
            time.sleep(0.005)
    return {index: payloads for index, payloads in got.items() if payloads}


@pytest.mark.one_node(
    "a shared group's strategy picks among the members of one node; NATS picks the node")
@pytest.mark.parametrize("versions", [(paho.MQTTv5,), (paho.MQTTv311,),
                                      (paho.MQTTv5, paho.MQTTv311)],
                         ids=["5.0", "3.1.1", "mixed"])
def test_round_robin_gives_each_message_to_one_member_in_turn(broker, clients, versions):
    members = _members(clients, broker.port, 3, versions=versions)
    plain = clients(broker.port, client_id="everything")
    plain.subscribe("jobs/#", 1)
    publisher = clients(broker.port, client_id="boss")
    for n in range(9):
        publisher.publish("jobs/build", str(n), qos=1)
    got = _received(members, 9)
    assert sorted(len(payloads) for payloads in got.values()) == [3, 3, 3]
    assert sorted(p for payloads in got.values() for p in payloads) == \
        sorted(str(n).encode() for n in range(9))
    # An ordinary subscription on the same topics still gets everything.
    assert [m.payload for m in plain.expect(9)] == [str(n).encode() for n in range(9)]
    for member in members:
        member.expect_nothing_more("jobs/marker-" + member.paho._client_id.decode())


def test_each_group_gets_every_message_once(broker, clients):
    first = _members(clients, broker.port, 2, "$share/a/jobs/+")
    second = [clients(broker.port, client_id=f"b-{n}", version=paho.MQTTv5) for n in range(2)]
    for member in second:
        member.subscribe("$share/b/jobs/+", 1)
    publisher = clients(broker.port, client_id="boss")
    for n in range(6):
        publisher.publish("jobs/x", str(n), qos=1)
    for group in (first, second):
        got = _received(group, 6)
        assert sorted(p for payloads in got.values() for p in payloads) == \
            sorted(str(n).encode() for n in range(6))


@pytest.mark.one_node(
    "a shared group's strategy picks among the members of one node; NATS picks the node")
@pytest.mark.parametrize("strategy", ["random", "hash_clientid", "hash_topic", "sticky"])
def test_strategies(start_broker, clients, strategy):
    broker = start_broker(f"mqtt.shared_subscription_strategy = {strategy}")
    members = _members(clients, broker.port, 3)
    publishers = [clients(broker.port, client_id=f"pub-{n}") for n in range(3)]
    sent = []
    for n in range(30):
        publisher = publishers[n % 3]
        topic = f"jobs/{n % 2}"
        payload = f"{publisher.paho._client_id.decode()} {topic} {n}"
        publisher.publish(topic, payload, qos=1)
        sent.append(payload.encode())
    got = _received(members, 30)
    # Whatever the strategy: every message once, to one member.
    assert sorted(p for payloads in got.values() for p in payloads) == sorted(sent)
    owners = {payload: index for index, payloads in got.items() for payload in payloads}
    if strategy == "hash_clientid":
        for publisher in publishers:
            prefix = publisher.paho._client_id + b" "
            assert len({owners[p] for p in sent if p.startswith(prefix)}) == 1
    elif strategy == "hash_topic":
        for topic in (b"jobs/0", b"jobs/1"):
            assert len({owners[p] for p in sent if p.split()[1] == topic}) == 1
    elif strategy == "sticky":
        assert len(got) == 1
        # The sticky member leaves: the group sticks to another one.
        (index,) = got
        members[index].disconnect()
        rest = [m for n, m in enumerate(members) if n != index]
        for n in range(5):
            publishers[0].publish("jobs/0", f"after {n}", qos=1)
        assert len(_received(rest, 5)) == 1


def _raw_member(raw_clients, port, client_id, topic_filter="$share/g/t", qos=1,
                version=MQTT_5, **connect):
    member = raw_clients(port, version)
    member.connect(client_id, **connect)
    member.send(Subscribe(1, [Subscription(topic_filter, qos)]))
    assert member.receive().reason_codes == [qos]
    return member


@pytest.mark.one_node(
    "a departing member's messages move to members of its own node only (docs/cluster.md, "
    "Not yet)")
@pytest.mark.parametrize("qos", [1, 2])
def test_unacknowledged_message_moves_to_another_member_when_its_member_leaves(
        broker, raw_clients, clients, qos):
    leaver = _raw_member(raw_clients, broker.port, "leaver", qos=qos)
    stayer = _raw_member(raw_clients, broker.port, "stayer", qos=qos)
    publisher = clients(broker.port, client_id="pub")
    publisher.publish("t", b"one", qos=qos)
    publisher.publish("t", b"two", qos=qos)
    # Round robin: one message each. The stayer acknowledges, the leaver does not.
    kept = leaver.receive()
    done = stayer.receive()
    assert {kept.payload, done.payload} == {b"one", b"two"}
    stayer.send(Puback(done.packet_id) if qos == 1 else Pubrec(done.packet_id))
    if qos == 2:
        assert stayer.receive() == Pubrel(done.packet_id)
    leaver.close()
    moved = stayer.receive()
    assert (moved.topic, moved.payload, moved.qos) == ("t", kept.payload, qos)


@pytest.mark.one_node(
    "a departing member's messages move to members of its own node only (docs/cluster.md, "
    "Not yet)")
def test_queued_messages_move_too_and_a_received_qos2_message_does_not(
        broker, raw_clients, clients):
    leaver = _raw_member(raw_clients, broker.port, "leaver", qos=2,
                         properties={"receive_maximum": 1})
    publisher = clients(broker.port, client_id="pub")
    for payload in (b"a", b"b", b"c"):
        publisher.publish("t", payload, qos=2)
    first = leaver.receive()
    assert first.payload == b"a"
    # The leaver has "a" (PUBREC sent): it keeps it. "b" and "c" wait in its queue.
    leaver.send(Pubrec(first.packet_id))
    assert leaver.receive() == Pubrel(first.packet_id)
    stayer = _raw_member(raw_clients, broker.port, "stayer", qos=2)
    leaver.close()
    assert [stayer.receive().payload for _ in range(2)] == [b"b", b"c"]
    stayer.send(Publish("t", b"marker", qos=0))
    assert stayer.receive().payload == b"marker"


@pytest.mark.one_node(
    "a departing member's messages move to members of its own node only (docs/cluster.md, "
    "Not yet)")
def test_messages_wait_for_offline_members_and_move_when_a_session_ends(
        broker, raw_clients, clients):
    persistent = _raw_member(raw_clients, broker.port, "persistent", clean_start=False,
                             properties={"session_expiry_interval": 600})
    persistent.send(Disconnect())
    # Its session waits offline; this member's session ends with its connection.
    passing = _raw_member(raw_clients, broker.port, "passing",
                          properties={"receive_maximum": 1})
    publisher = clients(broker.port, client_id="pub")
    for payload in (b"1", b"2", b"3"):
        publisher.publish("t", payload, qos=1)
    assert passing.receive().payload == b"1"  # connected members come first
    passing.close()
    back = raw_clients(broker.port, MQTT_5)
    assert back.connect("persistent", clean_start=False,
                        properties={"session_expiry_interval": 600}).session_present
    assert sorted(back.receive().payload for _ in range(3)) == [b"1", b"2", b"3"]


def test_no_retained_messages_on_a_new_shared_subscription(broker, raw_clients, clients):
    clients(broker.port, client_id="pub").publish("t", b"kept", qos=1, retain=True)
    member = _raw_member(raw_clients, broker.port, "member")
    member.send(Subscribe(2, [Subscription("t", 1)]))
    assert member.receive().reason_codes == [1]
    # The ordinary subscription gets the retained message; the shared one did not.
    message = member.receive()
    assert (message.payload, message.retain) == (b"kept", True)
    member.send(Publish("t", b"marker", qos=0))
    assert member.receive().payload == b"marker"
    assert member.receive().payload == b"marker"


def test_no_local_on_a_shared_subscription_is_a_protocol_error(broker, raw_clients):
    client = raw_clients(broker.port, MQTT_5)
    client.connect("nl")
    client.send(Subscribe(1, [Subscription("$share/g/t", 1, no_local=True)]))
    assert client.closing_reasons() == [0x82]


@pytest.mark.parametrize("version, code", [(MQTT_5, 0x8F), (MQTT_3_1_1, 0x80)])
def test_malformed_share_filters_are_refused(broker, raw_clients, version, code):
    client = raw_clients(broker.port, version)
    client.connect("bad")
    bad = ["$share/g", "$share//t", "$share/g/"]
    if version == MQTT_5:
        # Malformed as 3.1.1 filters too: a 3.1.1 connection is closed for them.
        bad += ["$share/g+/t", "$share/g#/t", "$share/g/a/#/b"]
    client.send(Subscribe(1, [Subscription(f, 0) for f in bad] + [Subscription("$share/g/a", 0)]))
    assert client.receive().reason_codes == [code] * len(bad) + [0]


def test_subscription_identifier_and_unsubscribe(broker, raw_clients, clients):
    member = raw_clients(broker.port, MQTT_5)
    member.connect("member")
    member.send(Subscribe(1, [Subscription("$share/g/t", 0)],
                          properties={"subscription_identifier": 7}))
    member.receive()
    publisher = clients(broker.port, client_id="pub")
    publisher.publish("t", b"x")
    message = member.receive()
    assert message.properties["subscription_identifier"] == [7]
    member.send(Unsubscribe(2, ["$share/g/t", "$share/other/t"]))
    assert member.receive().reason_codes == [0x00, 0x11]
    assert broker.run(lambda: broker.core.groups) == {}
    publisher.publish("t", b"y")
    member.send(Subscribe(3, [Subscription("marker", 0)]))
    member.receive()
    publisher.publish("marker", b"m")
    assert member.receive().payload == b"m"


@pytest.mark.one_node("$SYS figures are one node's")
def test_sys_subscription_count_includes_shared_members(broker, raw_clients):
    _raw_member(raw_clients, broker.port, "one")
    _raw_member(raw_clients, broker.port, "two")
    assert broker.run(broker.core.subscription_count) == 2


@pytest.mark.one_node(
    "a departing member's messages move to members of its own node only (docs/cluster.md, "
    "Not yet)")
def test_messages_of_an_expiring_offline_member_move_to_another(broker, raw_clients, clients):
    for client_id, expiry in (("brief", 1), ("lasting", 600)):
        member = _raw_member(raw_clients, broker.port, client_id, clean_start=False,
                             properties={"session_expiry_interval": expiry})
        member.send(Disconnect())
    publisher = clients(broker.port, client_id="pub")
    for payload in (b"1", b"2", b"3", b"4"):
        publisher.publish("t", payload, qos=1)   # round robin: two wait in each session
    # "brief" expires after a second; its two messages go to "lasting".
    deadline = time.monotonic() + 10
    while broker.run(lambda: "brief" in broker.core.sessions):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    back = raw_clients(broker.port, MQTT_5)
    assert back.connect("lasting", clean_start=False,
                        properties={"session_expiry_interval": 600}).session_present
    assert sorted(back.receive().payload for _ in range(4)) == [b"1", b"2", b"3", b"4"]
