"""Start-up restore: the sessions, retained messages and wills of a durable
store, rebuilt into a core before any listener opens.

What expired while the broker was down goes (and is deleted from the store),
wills that fell due are published, and the timers of what remains start
again. Times on disk are wall-clock; in memory they are the loop's.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from .message import retained_form
from .ownership import client_from_record
from .sessions import NEVER_EXPIRES, Inflight, QueuedMessage, Session
from .shared import SharedGroup, split_shared
from .store import RestoreReport, Snapshot, StoredSession, StoredWill

if TYPE_CHECKING:
    from .core import BrokerCore


def restore(core: BrokerCore, snapshot: Snapshot) -> RestoreReport:
    """Rebuild the sessions and retained messages of ``snapshot`` in ``core``,
    whose journal is in use: what expired while the broker was down goes, and
    wills that fell due are published."""
    report = RestoreReport()
    now = core.loop.time()
    wall_now = time.time()
    restored = [(_rebuild_session(core, stored, now, wall_now, report), stored)
                for stored in snapshot.sessions]
    for message in snapshot.retained:
        if message.expired(now):
            assert core.journal is not None  # restoring is for a core with a journal
            core.journal.retained_deleted(message.topic)
            report.expired_messages += 1
        else:
            core.retained.set(message.topic, retained_form(message))
    report.retained = len(core.retained)
    # What was restored is counted before any will is published into it.
    remaining = []
    for session, stored in restored:
        assert session.offline_since is not None  # set by _rebuild_session
        left = (NEVER_EXPIRES if stored.expiry == NEVER_EXPIRES
                else stored.expiry - (now - session.offline_since))
        remaining.append(left)
        if left > 0:
            report.sessions += 1
            report.subscriptions += len(session.subscriptions)
            report.queued += len(session.queue or ())
            report.inflight += len(session.inflight or ())
            report.awaiting_rel += len(session.awaiting_rel or ())
    # Then wills and timers, now that every subscriber is back.
    for stored_will in snapshot.wills:
        _restore_will(core, stored_will, now, wall_now, report)
    for (session, stored), left in zip(restored, remaining):
        _resume_timers(core, session, left, now, report)
    stats = core.stats
    stats.clients_maximum = max(stats.clients_maximum, len(core.sessions))
    return report


def adopt(core: BrokerCore, stored: StoredSession, offline_for: float) -> Session:
    """A session another node of the cluster handed over (cluster.sessions),
    offline for ``offline_for`` seconds: rebuilt as a restored one, recorded
    in this node's store when it has one, its expiry timer started."""
    report = RestoreReport()
    now = core.loop.time()
    session = _rebuild_session(core, stored, now, time.time(), report)
    journal = core.journal
    if journal is not None and stored.expiry:
        journal.session_saved(session)
        for entry in session.subscriptions.values():
            journal.subscription_saved(session, entry)
        for packet_id, inflight in (session.inflight or {}).items():
            journal.inflight_saved(session, packet_id, inflight, new=True)
        if session.queue:
            session.queue = deque(
                (message, qos, retain, ids, group, journal.queued(
                    session, message, qos, retain, ids,
                    group.share_filter if group is not None else None))
                for message, qos, retain, ids, group, _ in session.queue)
        for packet_id, stream_id in (session.awaiting_rel or {}).items():
            journal.awaiting_saved(session, packet_id, stream_id)
    left = NEVER_EXPIRES if stored.expiry == NEVER_EXPIRES else stored.expiry - offline_for
    _resume_timers(core, session, left, now, report)
    core.stats.clients_maximum = max(core.stats.clients_maximum, len(core.sessions))
    return session


def _restore_will(core: BrokerCore, stored: StoredWill, now: float, wall_now: float,
                  report: RestoreReport) -> None:
    """Hold a stored will back again, or publish it now: the will of a
    client that was connected when the broker stopped is due as if its
    connection had ended then (an orderly stop discards those wills, so
    only a crash leaves them)."""
    session = core.sessions.get(stored.client_id)
    will = stored.will
    if stored.due is not None:
        due = now + (stored.due - wall_now)
    elif session is not None:
        due = now + will.properties.get("will_delay_interval", 0)
    else:
        due = now  # its session ended with its connection
    if session is not None:
        session.pending_will, session.will_due = will, due  # see _resume_timers
        return
    client, _ = client_from_record(stored.client_id, stored.username, stored.client,
                                   core.certificate_parser)
    core.publish_will(will, client)
    assert core.journal is not None  # restoring is for a core with a journal
    core.journal.will_deleted(stored.client_id)
    report.wills_published += 1


def _rebuild_session(core: BrokerCore, stored: StoredSession, now: float, wall_now: float,
                     report: RestoreReport) -> Session:
    session = core.sessions[stored.client_id] = Session(stored.client_id, stored.expiry)
    # A session that was connected when the broker stopped counts as
    # disconnected now: when it stopped exactly is not known.
    since = stored.disconnected_at if stored.disconnected_at is not None else wall_now
    session.offline_since = now - max(0.0, wall_now - since)
    session.client, session.owner = client_from_record(
        stored.client_id, stored.username, stored.client, core.certificate_parser)
    for options, identifier in stored.subscriptions:
        core.subscribe(session, options, identifier)
    session.store_id = stored.sid  # from here on, changes are recorded
    for packet_id, message, qos, retain, ids, share, released in stored.inflight:
        entry = Inflight(message, qos, retain, ids, _group_of(core, share), released)
        if message.expired(now) and not released:
            if session.store_id:
                assert core.journal is not None  # a stored session implies a journal
                core.journal.inflight_deleted(session, packet_id, entry)
            report.expired_messages += 1
            continue
        if session.inflight is None:
            session.inflight = {}
        session.inflight[packet_id] = entry
        session.next_packet_id = packet_id % 65535 + 1
    for key, message, qos, retain, ids, share in stored.queue:
        item: QueuedMessage = (message, qos, retain, ids, _group_of(core, share), key)
        if message.expired(now):
            core.unqueued(session, item)
            report.expired_messages += 1
            continue
        if session.queue is None:
            session.queue = deque()
        session.queue.append(item)
    if stored.awaiting_rel:
        session.awaiting_rel = dict(stored.awaiting_rel)
    return session


def _resume_timers(core: BrokerCore, session: Session, remaining: float, now: float,
                   report: RestoreReport) -> None:
    """Start a restored session's expiry and will timers, or end it and
    publish its will when their time passed while the broker was down."""
    if session.pending_will is not None:
        assert session.will_due is not None  # set with pending_will (see _restore_will)
        if session.will_due <= now or remaining <= 0:
            core.publish_delayed_will(session)
            report.wills_published += 1
        else:
            session.will_handle = core.loop.call_later(
                session.will_due - now, core.publish_delayed_will, session)
    if remaining <= 0:
        core.end_session(session)
        report.expired_sessions += 1
        core.stats.clients_expired += 1
    elif remaining != NEVER_EXPIRES:  # a finite expiry leaves less than "never"
        session.expiry_handle = core.loop.call_later(remaining, core.expire_session, session)


def _group_of(core: BrokerCore, share: str | None) -> SharedGroup | None:
    """The shared subscription group a stored entry came through."""
    if share is None:
        return None
    shared = split_shared(share)
    return core.groups.get(shared) if shared is not None else None
