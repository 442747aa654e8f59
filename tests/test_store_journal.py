"""The journal folds a batch's changes so that each row is written once, or
not at all; the store writes what is left. These tests run the journal and
the real store on a file, without a broker."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque

from bastionmq.broker.codec import Subscription
from bastionmq.broker.message import Message
from bastionmq.broker.sessions import Inflight, Session, SubscriptionEntry
from bastionmq.broker.store import SqliteStore
from bastionmq.broker.store.journal import DELETE, Journal
from bastionmq.broker.store.sqlite import SCHEMA_VERSION


def journal() -> tuple[Journal, list[str]]:
    calls: list[str] = []
    made = Journal(lambda: 0.0, 3, lambda: calls.append("first"), lambda: calls.append("full"))
    return made, calls


def durable_session(j: Journal, client_id: str = "c") -> Session:
    session = Session(client_id, expiry_interval=60)
    j.session_saved(session)
    return session


def test_the_first_change_and_a_full_batch_are_announced():
    j, calls = journal()
    session = durable_session(j)
    j.subscription_saved(session, SubscriptionEntry(Subscription("a", 1)))
    j.subscription_saved(session, SubscriptionEntry(Subscription("b", 1)))
    assert calls == ["first", "full"]
    j.take()
    j.subscription_deleted(session, "a")
    assert calls == ["first", "full", "first"]


def test_a_message_queued_and_taken_within_one_batch_writes_nothing():
    j, _ = journal()
    session = durable_session(j)
    j.take()
    message = Message("t", b"body", 1)
    key = j.queued(session, message, 1, False, (), None)
    entry = Inflight(message, 1, False, ())
    j.inflight_saved(session, 5, entry, True)
    j.unqueued(session, key, message)
    j.inflight_deleted(session, 5, entry)
    batch = j.take()
    assert (batch.messages, batch.queue, batch.inflight) == ({}, {}, {})
    assert message.store_id == 0 and message.store_refs == 0


def test_a_row_from_an_earlier_batch_is_deleted():
    j, _ = journal()
    session = durable_session(j)
    message = Message("t", b"body", 1)
    key = j.queued(session, message, 1, False, (), None)
    first = j.take()
    assert list(first.queue) == [(session.store_id, key)]
    assert list(first.messages) == [message.store_id]
    stored_id = message.store_id
    j.unqueued(session, key, message)
    second = j.take()
    assert second.queue == {(session.store_id, key): DELETE}
    assert second.messages == {stored_id: DELETE}


def test_one_body_serves_many_sessions_until_the_last_lets_go():
    j, _ = journal()
    sessions = [durable_session(j, f"s{n}") for n in range(3)]
    message = Message("t", b"shared", 1)
    keys = [j.queued(s, message, 1, False, (), None) for s in sessions]
    batch = j.take()
    assert len(batch.messages) == 1 and len(batch.queue) == 3
    assert message.store_refs == 3
    for session, key in zip(sessions[:2], keys):
        j.unqueued(session, key, message)
    assert j.batch.messages == {}
    j.unqueued(sessions[2], keys[2], message)
    assert list(j.batch.messages.values()) == [DELETE]


def test_a_packet_id_reused_within_a_batch_keeps_its_last_state():
    j, _ = journal()
    session = durable_session(j)
    old = Inflight(Message("t", b"old", 1), 1, False, ())
    j.inflight_saved(session, 1, old, True)
    j.take()
    # The stored entry is acknowledged, and the id goes to a new message.
    j.inflight_deleted(session, 1, old)
    new = Inflight(Message("t", b"new", 1), 1, False, ())
    j.inflight_saved(session, 1, new, True)
    # ...which must not vanish when it is acknowledged in turn: the old row
    # is on disk and needs its DELETE.
    j.inflight_deleted(session, 1, new)
    assert j.batch.inflight == {(session.store_id, 1): DELETE}


def test_an_ended_session_sweeps_its_rows_and_lets_go_of_bodies():
    j, _ = journal()
    session = durable_session(j)
    message = Message("t", b"body", 1)
    key = j.queued(session, message, 1, False, (), None)
    session.queue = deque([(message, 1, False, (), None, key)])
    sid = session.store_id
    j.session_deleted(session)
    batch = j.take()
    assert batch.ended == [sid] and sid not in batch.sessions
    assert batch.messages == {} and message.store_refs == 0
    assert session.store_id == 0


def test_the_store_writes_a_batch_and_reads_it_back(tmp_path):
    async def scenario():
        loop = asyncio.get_running_loop()
        store = await SqliteStore.open(str(tmp_path / "s.sqlite3"), commit_interval=0)
        await store.load(0.0)
        released = []
        j = store.start(loop, released.extend)
        session = Session("c", expiry_interval=60)
        j.session_saved(session)
        j.subscription_saved(session, SubscriptionEntry(Subscription("a/+", 2, True, True, 1), 7))
        message = Message("a/b", b"\x00payload", 2, False,
                          {"user_property": [("k", "v")], "content_type": "text/x"})
        j.queued(session, message, 2, True, (7, 9), "$share/g/a/+")
        j.inflight_saved(session, 3, Inflight(message, 1, False, (), None, True), True)
        j.awaiting_saved(session, 11)
        j.awaiting_saved(session, 12, "node-a:5f3e:7")
        j.position_reached("cluster.BMQ_MSGS", 42)
        j.hold("connection", b"ack")
        await store.committed()
        assert released == [("connection", b"ack")]
        await store.close()

        store = await SqliteStore.open(str(tmp_path / "s.sqlite3"))
        snapshot = await store.load(0.0)
        await store.close()
        (stored,) = snapshot.sessions
        assert (stored.client_id, stored.expiry) == ("c", 60)
        assert stored.subscriptions == [(Subscription("a/+", 2, True, True, 1), 7)]
        (queued,) = stored.queue
        (inflight,) = stored.inflight
        assert queued[1] is inflight[1]  # one body, one object
        assert (queued[1].topic, queued[1].payload, dict(queued[1].properties)) == (
            "a/b", b"\x00payload", {"user_property": [("k", "v")], "content_type": "text/x"})
        assert queued[2:] == (2, True, (7, 9), "$share/g/a/+")
        assert inflight[0] == 3 and inflight[2:] == (1, False, (), None, True)
        assert sorted(stored.awaiting_rel) == [(11, None), (12, "node-a:5f3e:7")]
        assert snapshot.messages == 1
        assert snapshot.positions == {"cluster.BMQ_MSGS": 42}

    asyncio.run(scenario())
    db = sqlite3.connect(tmp_path / "s.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
