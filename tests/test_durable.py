"""Durable sessions: what a broker restarted on the same store gives back.

Each test runs a broker on a store in tmp_path, stops it (gracefully: the
crash cases are in test_durable_crash.py), starts a new one on the same store
and checks with real clients what survived. The exact-once cases speak raw
packets, as paho hides resends.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bastionmq.broker.codec import (
    MQTT_5, Puback, Publish, Pubcomp, Pubrec, Pubrel, Subscribe, Subscription,
)
from startup import startup_error


@pytest.fixture
def durable(start_broker, tmp_path):
    """Start a broker on the test's store; ``extra`` HOCON is added."""
    def start(extra: str = ""):
        return start_broker(f'durable_sessions {{ enable = true, data_dir = "{tmp_path}" }}\n'
                            + extra)
    return start


def rows(tmp_path, query: str) -> list[tuple]:
    db = sqlite3.connect(tmp_path / "sessions.sqlite3")
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def edit(tmp_path, statement: str) -> None:
    """Change the store behind the broker's back (it is stopped)."""
    db = sqlite3.connect(tmp_path / "sessions.sqlite3")
    with db:
        db.execute(statement)
    db.close()


@contextlib.contextmanager
def store_locked(tmp_path) -> Iterator[None]:
    """Another writer holds the database: the broker's commits cannot finish."""
    blocker = sqlite3.connect(tmp_path / "sessions.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def resume(clients, port: int, client_id: str, expiry: int = 3600):
    """Connect again to the session ``client_id`` left (MQTT 5)."""
    return clients(port, client_id=client_id, version=paho.MQTTv5, clean=False,
                   session_expiry=expiry)


def offline_subscriber(clients, port: int, client_id: str, topic: str, qos: int,
                       version: int = paho.MQTTv5, expiry: int = 3600):
    client = clients(port, client_id=client_id, version=version, clean=False,
                     session_expiry=expiry if version == paho.MQTTv5 else None)
    assert client.subscribe(topic, qos) == [qos]
    client.disconnect()
    return client


def payloads(messages) -> list[bytes]:
    return [message.payload for message in messages]


def test_offline_queue_subscriptions_and_retained_survive_a_restart(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "v5", "q/#", 2)
    offline_subscriber(clients, broker.port, "v311", "q/#", 1, version=paho.MQTTv311)
    publisher = clients(broker.port, client_id="pub")
    for i in range(10):
        publisher.publish(f"q/{i}", f"m{i}", qos=1 + i % 2)
    publisher.publish("config/a", "kept", qos=1, retain=True)
    publisher.publish("config/b", "cleared", qos=1, retain=True)
    publisher.publish("config/b", "", qos=1, retain=True)
    publisher.disconnect()
    broker.stop()

    broker = durable()
    for client_id, version, qos in (("v5", paho.MQTTv5, 2), ("v311", paho.MQTTv311, 1)):
        client = clients(broker.port, client_id=client_id, version=version, clean=False,
                         session_expiry=3600 if version == paho.MQTTv5 else None)
        assert client.session_present
        # paho hands a QoS 2 message over at PUBREL, so QoS 1 and 2 interleave.
        got = {m.payload: m.qos for m in client.expect(10)}
        assert got == {f"m{i}".encode(): min(qos, 1 + i % 2) for i in range(10)}
        # The subscription itself came back too: a live message arrives.
        clients(broker.port).publish("q/live", "live", qos=1)
        assert payloads(client.expect()) == [b"live"]
    reader = clients(broker.port)
    reader.subscribe("config/#", 1)
    (retained,) = reader.expect()
    assert (retained.topic, retained.payload, retained.retain) == ("config/a", b"kept", True)
    reader.expect_nothing_more("config/marker")


def test_what_was_acknowledged_leaves_the_store(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "t", 1)
    publisher = clients(broker.port, client_id="pub")
    for i in range(5):
        publisher.publish("t", f"m{i}", qos=1)
    broker.stop()
    assert rows(tmp_path, "SELECT count(*) FROM queue") == [(5,)]
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(5,)]

    broker = durable()
    client = resume(clients, broker.port, "s")
    assert len(client.expect(5)) == 5
    client.disconnect()
    broker.stop()
    assert rows(tmp_path, "SELECT count(*) FROM queue") == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM inflight") == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]
    assert rows(tmp_path, "SELECT client_id FROM sessions") == [("s",)]


def test_one_body_is_stored_for_many_sessions(durable, clients, tmp_path):
    broker = durable()
    for n in range(20):
        offline_subscriber(clients, broker.port, f"s{n}", "fan/out", 1)
    clients(broker.port).publish("fan/out", b"x" * 1000, qos=1)
    broker.stop()
    assert rows(tmp_path, "SELECT count(*) FROM queue") == [(20,)]
    assert rows(tmp_path, "SELECT count(*), sum(length(payload)) FROM messages") == [(1, 1000)]


def test_embedded_publish_returns_once_stored(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "e", 1)
    broker.call(broker.broker.publish("e", b"embedded", qos=1))
    broker.call(broker.broker.publish("e/retained", b"r", retain=True))
    # Read while the broker still runs: the commit happened before publish returned.
    assert rows(tmp_path, "SELECT payload FROM messages") == [(b"embedded",)]
    assert rows(tmp_path, "SELECT topic FROM retained") == [("e/retained",)]


def test_sys_topics_are_not_stored(durable, clients, tmp_path):
    broker = durable("sys_topics.sys_interval = 1s")
    watcher = clients(broker.port)
    watcher.subscribe("$SYS/broker/uptime", 0)
    watcher.expect()
    broker.stop()
    assert rows(tmp_path, "SELECT count(*) FROM retained WHERE topic LIKE '$SYS/%'") == [(0,)]


def test_clean_start_and_expiry_zero_remove_the_stored_session(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "a", "t", 1)
    offline_subscriber(clients, broker.port, "b", "t", 1)
    clients(broker.port).publish("t", "queued", qos=1)
    # a comes back with a clean start; b resumes but asks for expiry 0.
    clients(broker.port, client_id="a", version=paho.MQTTv5, clean=True, session_expiry=60)
    b = clients(broker.port, client_id="b", version=paho.MQTTv5, clean=False, session_expiry=0)
    assert b.session_present
    assert payloads(b.expect()) == [b"queued"]
    broker.stop()
    assert rows(tmp_path, "SELECT client_id FROM sessions") == [("a",)]
    assert rows(tmp_path, "SELECT count(*) FROM subscriptions") == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]


def test_unsubscribe_is_stored(durable, clients):
    broker = durable()
    client = resume(clients, broker.port, "u")
    client.subscribe("keep", 1)
    client.subscribe("drop", 1)
    client.unsubscribe("drop")
    client.disconnect()
    broker.stop()

    broker = durable()
    client = resume(clients, broker.port, "u")
    publisher = clients(broker.port)
    publisher.publish("drop", "no", qos=1)
    publisher.publish("keep", "yes", qos=1)
    assert payloads(client.expect()) == [b"yes"]


def test_a_session_that_expired_while_the_broker_was_down_is_gone(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "brief", "t", 1, expiry=1)
    offline_subscriber(clients, broker.port, "long", "t", 1, expiry=3600)
    clients(broker.port).publish("t", "m", qos=1)
    broker.stop()
    # As if the broker had been down for a minute:
    edit(tmp_path, "UPDATE sessions SET disconnected_at = disconnected_at - 60")

    broker = durable()
    broker.call(broker.broker.store.flush())
    assert rows(tmp_path, "SELECT client_id FROM sessions") == [("long",)]
    assert rows(tmp_path, "SELECT count(*) FROM subscriptions") == [(1,)]
    assert rows(tmp_path, "SELECT count(*) FROM queue") == [(1,)]
    brief = resume(clients, broker.port, "brief", expiry=60)
    assert not brief.session_present
    long = resume(clients, broker.port, "long")
    assert long.session_present
    assert payloads(long.expect()) == [b"m"]


def test_session_expiry_removes_the_rows(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "short", "t", 1, expiry=1)
    clients(broker.port).publish("t", "m", qos=1)
    deadline = time.monotonic() + 10
    while broker.run(lambda: "short" in broker.core.sessions):
        assert time.monotonic() < deadline, "the session did not expire"
        time.sleep(0.1)
    broker.call(broker.broker.store.flush())
    assert rows(tmp_path, "SELECT count(*) FROM sessions") == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM queue") == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]


def test_message_expiry_counts_the_time_the_broker_was_down(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "t", 1)
    publisher = clients(broker.port, version=paho.MQTTv5)
    short = Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval = 30
    long = Properties(PacketTypes.PUBLISH)
    long.MessageExpiryInterval = 3600
    publisher.publish("t", "short-lived", qos=1, properties=short)
    publisher.publish("t", "long-lived", qos=1, properties=long)
    broker.stop()
    # As if the broker had been down for a minute:
    edit(tmp_path, "UPDATE messages SET expires_at = expires_at - 60")

    broker = durable()
    client = resume(clients, broker.port, "s")
    (message,) = client.expect()
    assert message.payload == b"long-lived"
    # What is left of the interval: about an hour less the minute down.
    assert 3500 <= message.properties.MessageExpiryInterval <= 3541
    client.expect_nothing_more("t")


def test_unacknowledged_messages_are_sent_again_after_a_restart(durable, raw_clients):
    broker = durable()
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("r", clean_start=False, properties={"session_expiry_interval": 600})
    raw.send(Subscribe(1, [Subscription("t", 2)]))
    raw.receive()
    broker.call(broker.broker.publish("t", b"one", qos=1))
    broker.call(broker.broker.publish("t", b"two", qos=2))
    first, second = raw.receive(), raw.receive()
    assert (first.payload, first.qos, second.payload, second.qos) == (b"one", 1, b"two", 2)
    raw.send(Pubrec(second.packet_id))  # two is received, not yet completed
    assert raw.receive() == Pubrel(second.packet_id)
    raw.close()
    broker.stop()

    broker = durable()
    raw = raw_clients(broker.port, MQTT_5)
    connack = raw.connect("r", clean_start=False, properties={"session_expiry_interval": 600})
    assert connack.session_present
    resent = raw.receive()
    # [MQTT-4.4.0-1]: the unacknowledged PUBLISH again with DUP, the
    # released QoS 2 message only as PUBREL (sending it again would deliver twice).
    packets = [resent, raw.receive()]
    publishes = [p for p in packets if isinstance(p, Publish)]
    assert [(p.payload, p.dup, p.packet_id) for p in publishes] == [(b"one", True, first.packet_id)]
    assert Pubrel(second.packet_id) in packets


def test_inbound_qos2_is_exactly_once_across_a_restart(durable, clients, raw_clients):
    broker = durable()
    offline_subscriber(clients, broker.port, "sub", "x", 2)
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("pub", clean_start=False, properties={"session_expiry_interval": 600})
    raw.send(Publish("x", b"once", qos=2, packet_id=7))
    assert raw.receive() == Pubrec(7)
    raw.close()  # gone before PUBREL
    broker.stop()

    broker = durable()
    raw = raw_clients(broker.port, MQTT_5)
    assert raw.connect("pub", clean_start=False,
                       properties={"session_expiry_interval": 600}).session_present
    # The client resends the PUBLISH it has no PUBREC for in its view: the
    # broker knows the id and does not deliver it again ([MQTT-4.3.3-9]).
    raw.send(Publish("x", b"once", qos=2, packet_id=7, dup=True))
    assert raw.receive() == Pubrec(7)
    raw.send(Pubrel(7))
    assert raw.receive() == Pubcomp(7)
    # The id is free again: a new message with it is a new message.
    raw.send(Publish("x", b"again", qos=2, packet_id=7))
    assert raw.receive() == Pubrec(7)
    raw.send(Pubrel(7))
    assert raw.receive() == Pubcomp(7)
    sub = resume(clients, broker.port, "sub")
    assert payloads(sub.expect(2)) == [b"once", b"again"]
    sub.expect_nothing_more("x")


def will_client(clients, port: int, delay: int, expiry: int):
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dying",
                         protocol=paho.MQTTv5)
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = delay
    client.will_set("wills/dying", b"gone", 1, False, will_props)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.loop_stop()
    client.socket().close()  # vanish: the will is due after its delay


def wait_for_will(tmp_path, client_id: str, held: bool) -> None:
    """Until the store holds ``client_id``'s will: held back by its delay
    (``held``), or kept while its client is connected."""
    query = (f"SELECT count(*) FROM wills WHERE client_id = '{client_id}' "
             f"AND due IS {'NOT ' if held else ''}NULL")
    deadline = time.monotonic() + 10
    while rows(tmp_path, query) != [(1,)]:
        assert time.monotonic() < deadline, f"the will of {client_id} was not stored"
        time.sleep(0.05)


def as_a_crash_leaves_it(broker, tmp_path) -> None:
    """Stop ``broker`` and put back the store as it was before the stop: what
    a crash at this moment would leave (an orderly stop discards the wills
    of connected clients)."""
    snapshot = sqlite3.connect(":memory:")
    source = sqlite3.connect(tmp_path / "sessions.sqlite3")
    source.backup(snapshot)
    source.close()
    broker.stop()
    store = sqlite3.connect(tmp_path / "sessions.sqlite3")
    snapshot.backup(store)
    store.close()
    snapshot.close()


def test_a_held_back_will_is_published_after_a_restart(durable, clients, tmp_path):
    broker = durable()
    watcher = offline_subscriber(clients, broker.port, "watcher", "wills/#", 1)
    will_client(clients, broker.port, delay=2, expiry=3600)
    wait_for_will(tmp_path, "dying", held=True)
    broker.stop()  # before the will's delay is over

    broker = durable()
    watcher = resume(clients, broker.port, "watcher")
    (will,) = watcher.expect(timeout=15)
    assert (will.topic, will.payload) == ("wills/dying", b"gone")
    watcher.disconnect()
    broker.stop()
    assert rows(tmp_path, "SELECT count(*) FROM wills") == [(0,)]


def test_a_will_that_fell_due_while_down_is_published_at_start(durable, clients, tmp_path,
                                                               caplog):
    broker = durable()
    offline_subscriber(clients, broker.port, "watcher", "wills/#", 1)
    will_client(clients, broker.port, delay=600, expiry=3600)
    wait_for_will(tmp_path, "dying", held=True)
    broker.stop()
    edit(tmp_path, "UPDATE wills SET due = due - 601")

    with caplog.at_level("INFO", logger="bastionmq"):
        broker = durable()
    assert "1 wills fell due" in caplog.text
    watcher = resume(clients, broker.port, "watcher")
    (will,) = watcher.expect()
    assert will.payload == b"gone"


def test_a_client_reconnecting_within_the_will_delay_cancels_it(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "watcher", "wills/#", 1)
    will_client(clients, broker.port, delay=600, expiry=3600)
    wait_for_will(tmp_path, "dying", held=True)
    broker.stop()
    broker = durable()
    resume(clients, broker.port, "dying")
    watcher = resume(clients, broker.port, "watcher")
    watcher.subscribe("marker", 1)
    watcher.expect_nothing_more("marker")
    broker.call(broker.broker.store.flush())
    assert rows(tmp_path, "SELECT count(*) FROM wills") == [(0,)]


def test_the_will_of_a_client_cut_off_by_a_crash_is_published_after_it(durable, clients,
                                                                       tmp_path, caplog):
    broker = durable()
    offline_subscriber(clients, broker.port, "watcher", "status/#", 1)
    # A device with a clean session: nothing of it is kept but its will.
    clients(broker.port, client_id="device", will=("status/device", b"offline", 1, True))
    wait_for_will(tmp_path, "device", held=False)
    as_a_crash_leaves_it(broker, tmp_path)

    with caplog.at_level("INFO", logger="bastionmq"):
        broker = durable()
    # What was restored is counted before the will is queued for the watcher.
    assert "1 sessions with 1 subscriptions, 0 queued and 0 in-flight messages" in caplog.text
    assert "1 wills fell due" in caplog.text
    (will,) = resume(clients, broker.port, "watcher").expect()
    assert (will.topic, will.payload) == ("status/device", b"offline")
    reader = clients(broker.port)
    reader.subscribe("status/#", 1)
    assert payloads(reader.expect()) == [b"offline"]  # a retained will is retained


def test_a_crash_starts_the_will_delay_of_a_persistent_client(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "watcher", "wills/#", 1)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="slow",
                         protocol=paho.MQTTv5)
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 600
    client.will_set("wills/slow", b"gone", 1, False, will_props)
    connect_props = Properties(PacketTypes.CONNECT)
    connect_props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", broker.port, clean_start=False, properties=connect_props)
    client.loop_start()
    try:
        wait_for_will(tmp_path, "slow", held=False)
        as_a_crash_leaves_it(broker, tmp_path)  # while it is connected
    finally:
        client.loop_stop()

    broker = durable()
    # Held back by its delay from the restart on: the client comes back in
    # time, and the will is not published.
    assert broker.run(lambda: broker.core.sessions["slow"].pending_will is not None)
    resume(clients, broker.port, "slow")
    watcher = resume(clients, broker.port, "watcher")
    watcher.subscribe("marker", 1)
    watcher.expect_nothing_more("marker")


def test_an_orderly_stop_discards_the_wills_of_connected_clients(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "watcher", "status/#", 1)
    clients(broker.port, client_id="device", will=("status/device", b"offline", 1, False))
    wait_for_will(tmp_path, "device", held=False)
    broker.stop()
    assert rows(tmp_path, "SELECT count(*) FROM wills") == [(0,)]
    broker = durable()
    watcher = resume(clients, broker.port, "watcher")
    watcher.subscribe("status/marker", 1)
    watcher.expect_nothing_more("status/marker")


def test_shared_subscription_queues_survive_a_restart(durable, clients):
    broker = durable()
    for name in ("m1", "m2"):
        offline_subscriber(clients, broker.port, name, "$share/g/jobs/#", 1)
    publisher = clients(broker.port)
    for i in range(6):
        publisher.publish(f"jobs/{i}", f"j{i}", qos=1)
    broker.stop()

    broker = durable()
    got = []
    for name in ("m1", "m2"):
        member = clients(broker.port, client_id=name, version=paho.MQTTv5, clean=False,
                         session_expiry=3600)
        got += payloads(member.expect(3))
    assert sorted(got) == [f"j{i}".encode() for i in range(6)]


def test_the_restore_is_reported_in_one_line(durable, clients, caplog, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "t", 1)
    clients(broker.port).publish("t", "m", qos=1, retain=True)
    broker.stop()
    with caplog.at_level("INFO", logger="bastionmq"):
        durable()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restored")]
    assert line == (f"restored from {tmp_path}/sessions.sqlite3: 1 sessions with 1 "
                    "subscriptions, 1 queued and 0 in-flight messages (1 distinct bodies), "
                    "0 QoS 2 messages awaiting release, 1 retained messages")


# ------------------------------------------------------------------ refusing to start


def test_a_damaged_store_stops_start_up(tmp_path):
    (tmp_path / "sessions.sqlite3").write_bytes(b"this is no database at all" * 200)
    where, message = startup_error(
        f'durable_sessions {{ enable = true, data_dir = "{tmp_path}" }}')
    assert where == "durable_sessions.data_dir"
    assert "not an SQLite database" in message and "sessions.sqlite3" in message


def test_a_store_of_a_newer_layout_stops_start_up(tmp_path):
    db = sqlite3.connect(tmp_path / "sessions.sqlite3")
    db.executescript("CREATE TABLE schema_version (version INTEGER); "
                     "INSERT INTO schema_version VALUES (99);")
    db.close()
    where, message = startup_error(
        f'durable_sessions {{ enable = true, data_dir = "{tmp_path}" }}')
    assert (where, "newer bastionmq" in message) == ("durable_sessions.data_dir", True)


def test_a_store_with_rows_pointing_at_nothing_stops_start_up(durable, clients, tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "t", 1)
    clients(broker.port).publish("t", "m", qos=1)
    broker.stop()
    edit(tmp_path, "DELETE FROM messages")
    where, message = startup_error(
        f'durable_sessions {{ enable = true, data_dir = "{tmp_path}" }}')
    assert "1 queue entries pointing at a missing message" in message
    assert "bastionmq data compact" in message


def test_a_second_broker_on_the_same_store_is_refused(durable, tmp_path):
    durable()
    where, message = startup_error(
        f'listeners.tcp.default.bind = "127.0.0.1:0"\n'
        f'durable_sessions {{ enable = true, data_dir = "{tmp_path}" }}')
    assert where == "durable_sessions.data_dir"
    assert "sessions.sqlite3.lock is held by a running broker" in message


def test_a_store_in_an_unusable_place_stops_start_up(tmp_path):
    (tmp_path / "file").write_text("a file where a folder should be")
    where, message = startup_error(
        f'durable_sessions {{ enable = true, data_dir = "{tmp_path}/file/sub" }}')
    assert where == "durable_sessions.data_dir"
    assert "cannot make the folder" in message


# ------------------------------------------------------------------ acknowledgements


def test_acknowledgements_wait_for_the_store_and_others_do_not(durable, clients, raw_clients,
                                                              tmp_path):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "stored/#", 1)
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("pub")
    with store_locked(tmp_path):
        raw.send(Publish("stored/a", b"must be kept", qos=1, packet_id=1))
        # A message no persistent session takes promises nothing to store,
        # but its PUBACK keeps its place behind the first one ([MQTT-4.6.0-2]).
        raw.send(Publish("elsewhere", b"not kept", qos=1, packet_id=2))
        with pytest.raises(TimeoutError):
            raw.receive(timeout=1.0)
        other = raw_clients(broker.port, MQTT_5)
        other.connect("other")
        other.send(Publish("elsewhere", b"not kept", qos=1, packet_id=9))
        assert other.receive() == Puback(9, 0x10)  # no matching subscribers, at once
    assert [raw.receive(timeout=15), raw.receive()] == [Puback(1), Puback(2, 0x10)]


def test_a_commit_that_fails_is_tried_again_and_its_acknowledgements_wait(
        durable, clients, raw_clients, tmp_path, caplog):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "stored", 1)
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("pub")
    with store_locked(tmp_path):
        with caplog.at_level("ERROR", logger="bastionmq.store"):
            raw.send(Publish("stored", b"kept in the end", qos=1, packet_id=1))
            deadline = time.monotonic() + 15
            while "could not commit" not in caplog.text:
                assert time.monotonic() < deadline, "the failed commit was not reported"
                time.sleep(0.05)
        assert "database is locked" in caplog.text and "trying again in 1.0s" in caplog.text
        with pytest.raises(TimeoutError):
            raw.receive(timeout=0.2)
    assert raw.receive(timeout=15) == Puback(1)
    subscriber = resume(clients, broker.port, "s")
    assert payloads(subscriber.expect()) == [b"kept in the end"]


def test_a_session_taken_over_stays_stored(durable, clients, tmp_path):
    broker = durable()
    first = clients(broker.port, client_id="t", version=paho.MQTTv5, clean=False,
                    session_expiry=3600)
    first.subscribe("take/over", 1)
    second = resume(clients, broker.port, "t")  # the first connection is closed
    assert second.session_present
    second.disconnect()
    clients(broker.port).publish("take/over", "after", qos=1)
    broker.stop()
    broker = durable()
    assert payloads(resume(clients, broker.port, "t").expect()) == [b"after"]


def test_a_retained_message_that_expired_while_down_is_gone(durable, clients, tmp_path):
    broker = durable()
    publisher = clients(broker.port, version=paho.MQTTv5)
    expiring = Properties(PacketTypes.PUBLISH)
    expiring.MessageExpiryInterval = 30
    publisher.publish("r/expiring", "short", qos=1, retain=True, properties=expiring)
    publisher.publish("r/kept", "kept", qos=1, retain=True)
    broker.stop()
    # As if the broker had been down for a minute:
    edit(tmp_path, "UPDATE retained SET expires_at = expires_at - 60")
    broker = durable()
    reader = clients(broker.port)
    reader.subscribe("r/#", 1)
    assert payloads(reader.expect()) == [b"kept"]
    reader.expect_nothing_more("r/marker")
    broker.call(broker.broker.store.flush())
    assert rows(tmp_path, "SELECT topic FROM retained") == [("r/kept",)]


def test_a_stop_does_not_wait_for_a_store_that_cannot_commit(durable, clients, raw_clients,
                                                             tmp_path, caplog):
    broker = durable()
    offline_subscriber(clients, broker.port, "s", "stored", 1)
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("pub")
    with store_locked(tmp_path), caplog.at_level("WARNING", logger="bastionmq.store"):
        raw.send(Publish("stored", b"never acknowledged", qos=1, packet_id=1))
        broker.stop()  # returns: the commit is given up after one more try
        assert "while stopping" in caplog.text
        assert "the 1 acknowledgements they held were not sent" in caplog.text
    assert [p.reason_code for p in raw.receive_until_closed()] == [0x8B]  # no PUBACK
    broker = durable()
    subscriber = resume(clients, broker.port, "s")
    subscriber.subscribe("marker", 1)
    subscriber.expect_nothing_more("marker")


def test_a_data_dir_anyone_may_write_to_stops_start_up(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o777)
    where, message = startup_error(f'durable_sessions {{ enable = true, data_dir = "{store}" }}')
    assert where == "durable_sessions.data_dir"
    assert "writable by every user (mode 777)" in message


@pytest.mark.parametrize("name", ["sessions.sqlite3", "sessions.sqlite3.lock",
                                  "sessions.sqlite3-wal"])
def test_a_store_file_that_is_a_symbolic_link_stops_start_up(tmp_path, name):
    # Another local user could point the broker's writes at any file it may write.
    store = tmp_path / "store"
    store.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (store / name).symlink_to(target)
    where, message = startup_error(f'durable_sessions {{ enable = true, data_dir = "{store}" }}')
    assert where == "durable_sessions.data_dir"
    assert f"{store / name} is a symbolic link" in message
    assert target.read_text() == "precious"


def test_the_lock_file_says_who_holds_it_and_nothing_older(durable, tmp_path):
    (tmp_path / "sessions.sqlite3.lock").write_text("x" * 500)
    durable()
    text = (tmp_path / "sessions.sqlite3.lock").read_text()
    assert text.startswith("a running broker (pid ") and "x" not in text
