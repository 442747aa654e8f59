"""Persistent sessions follow their client from node to node.

A client that connects with Clean Start 0 (3.1.1: Clean Session 0) to a node
that does not hold its session gets it from the node that does: the node
asks every node heard from (one request on ``bmq.session.fetch``, the
answers gathered until each has answered or ``cluster.takeover_timeout``
passes); the holder closes the client's connection there if it has one
(5.0: DISCONNECT 0x8E, its will as for any takeover), takes the session out of its core and store, and answers with it:
subscriptions, messages in flight and queued, inbound QoS 2 packet ids, the
time it has been offline. The asking node rebuilds it as a restore would
(broker.restore.adopt), records it in its own store, waits until the NATS
server has its subscriptions, and the CONNACK says Session Present 1; what
was in flight is sent again with DUP. Should two nodes offer one (a node
killed while it held it came back with the copy in its store), the one its
client used last is kept.

A session of another identity is not handed over (the client is refused
with 0x87, as on one node), unless ``mqtt.session_takeover_by_other_identity
= clean``. A Clean Start 1 CONNECT needs no answer: the claim that every
node hears (cluster.bus) ends their copies.

When the node holding the session does not answer (killed, stopped, cut
off), the session comes from its copy in the cluster (cluster.replica).
Either way the handed-over record carries the position in the stream of
QoS 1/2 messages it was made at, and the new node gives the session what
the stream stored after it that it has not had (SessionReplica.catch_up):
what reached the old node too late goes with the session. QoS 0 messages
in that moment do not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

from bastionmq.broker.codec import Subscription
from bastionmq.broker.logtext import shown
from bastionmq.broker.message import Message
from bastionmq.broker.ownership import client_from_record, client_record
from bastionmq.broker.ports import ClientInfo
from bastionmq.broker.properties import Reason
from bastionmq.broker.restore import adopt
from bastionmq.broker.sessions import Session
from bastionmq.broker.store import StoredSession

from .bus import ClusterUnavailable
from .envelope import EnvelopeError, envelope_head, open_envelope

log = logging.getLogger("bastionmq.cluster")

FETCH_SUBJECT = "bmq.session.fetch"
RECORD_VERSION = 1
_NO_ORIGIN = bytes(8)


def message_record(message: Message, now: float) -> list[str]:
    """A message as a session record carries it: its topic and its
    envelope (cluster.envelope), base64."""
    data = envelope_head(message, _NO_ORIGIN, 0, now) + message.payload
    record = [message.topic, base64.b64encode(data).decode()]
    if message.stream_id is not None:
        record.append(message.stream_id)
    return record


def message_from(record: list[str], now: float) -> Message:
    topic, data = record[:2]
    message = open_envelope(topic, base64.b64decode(data), now)[2]
    if len(record) > 2:
        message.stream_id = str(record[2])
    return message


def share_of(group: Any) -> str | None:
    return group.share_filter if group is not None else None


def session_record(session: Session, now: float) -> dict[str, Any]:
    """Everything of a session another node needs to carry it on (online:
    as if its client had just gone)."""
    client = session.client
    offline_since = now if session.offline_since is None else session.offline_since
    return {
        "v": RECORD_VERSION,
        "client_id": session.client_id,
        "expiry": session.expiry_interval,
        "offline_for": max(0.0, now - offline_since),
        "username": client.username if client is not None else None,
        "client": client_record(client) if client is not None else None,
        "subscriptions": [
            [entry.options.filter, entry.options.qos, entry.options.no_local,
             entry.options.retain_as_published, entry.options.retain_handling,
             entry.identifier] for entry in session.subscriptions.values()],
        "inflight": [
            [packet_id, message_record(entry.message, now), entry.qos, entry.retain,
             list(entry.subscription_ids), share_of(entry.group), entry.released]
            for packet_id, entry in (session.inflight or {}).items()],
        "queue": [
            [message_record(message, now), qos, retain, list(ids), share_of(group)]
            for message, qos, retain, ids, group, _ in (session.queue or ())],
        "awaiting_rel": sorted([packet_id, stream_id] for packet_id, stream_id
                               in (session.awaiting_rel or {}).items()),
        # The stream ids of the messages it holds: the stream's copies of
        # them are not delivered to it again (cluster.replica).
        "ids": [message.stream_id for message in held_messages(session)
                if message.stream_id is not None],
    }


def held_messages(session: Session) -> list[Message]:
    """The messages in flight to ``session`` and queued for it."""
    held = [entry.message for entry in (session.inflight or {}).values()]
    held.extend(item[0] for item in (session.queue or ()))
    return held


def stored_session(record: dict[str, Any], now: float) -> tuple[StoredSession, float]:
    """The session of a record, as the store would give it, and how long
    it has been offline; ValueError (or KeyError, TypeError) for a record
    that is not one."""
    if record.get("v") != RECORD_VERSION:
        raise ValueError(f"a session record of version {record.get('v')!r}")
    stored = StoredSession(
        sid=0, client_id=str(record["client_id"]), expiry=int(record["expiry"]),
        disconnected_at=time.time() - float(record["offline_for"]),
        username=record["username"], client=record["client"])
    stored.subscriptions = [
        (Subscription(topic_filter, qos, bool(no_local), bool(rap), retain_handling), identifier)
        for topic_filter, qos, no_local, rap, retain_handling, identifier
        in record["subscriptions"]]
    stored.inflight = [
        (packet_id, message_from(message, now), qos, bool(retain), tuple(ids), share,
         bool(released))
        for packet_id, message, qos, retain, ids, share, released in record["inflight"]]
    stored.queue = [
        (0, message_from(message, now), qos, bool(retain), tuple(ids), share)
        for message, qos, retain, ids, share in record["queue"]]
    # (A node of the version before sends packet ids alone.)
    stored.awaiting_rel = [
        (int(item), None) if isinstance(item, int) else (int(item[0]), item[1])
        for item in record["awaiting_rel"]]
    return stored, float(record["offline_for"])


class SessionMover:
    """This node's side of sessions moving between nodes."""

    def __init__(self, bus: Any, core: Any, timeout: float) -> None:
        self.bus = bus
        self.core = core
        self.timeout = timeout
        bus.serve(FETCH_SUBJECT, self._asked)

    # ------------------------------------------------------------ asking

    def fetch(self, client: ClientInfo) -> asyncio.Future[int] | None:
        """Ask the other nodes for ``client``'s session, then, if the node
        holding it did not answer, take it from its copy (cluster.replica);
        None when there is nowhere to look, else a future of the reason code
        the client is refused with (ClusterBus.fetch_session). A session
        that arrives is in the core when the future is done."""
        bus = self.bus
        others = bus.others()
        replica = bus.replica
        if not bus.connected or (not others and replica is None):
            return None
        done: asyncio.Future[None] = bus.loop.create_future()
        answered: set[str] = set()
        refused = False
        #: The sessions offered: two when a node that died came back with
        #: the copy in its store while its client had a new one elsewhere.
        offered: list[dict[str, Any]] = []

        def answer(subject: str, payload: bytes, headers: Any, reply: Any) -> None:
            nonlocal refused
            if done.done():
                return
            try:
                found = json.loads(payload)
                answered.add(str(found["node"]))
                refused = refused or bool(found.get("refused"))
                if found.get("session") is not None:
                    offered.append(found["session"])
            except (ValueError, KeyError, TypeError) as exc:
                log.error("an answer about the session of %s from another node is not one "
                          "(%s)", shown(client.client_id), exc)
            if answered >= others:
                done.set_result(None)

        inbox, sid = bus.deliver_to(answer)
        if others:
            request = {"client_id": client.client_id, "node": bus.name,
                       "username": client.username, "client": client_record(client)}
            bus.publish(FETCH_SUBJECT, json.dumps(request).encode(), reply=inbox)
        else:
            done.set_result(None)

        async def gather() -> int:
            try:
                await asyncio.wait_for(asyncio.shield(done), self.timeout)
            except asyncio.TimeoutError:
                log.warning("client %s: %s of %d nodes did not answer within %g s whether "
                            "they hold its session", shown(client.client_id),
                            len(others - answered), len(others), self.timeout)
            finally:
                bus.stop_delivery(sid)
            if offered and not refused:
                # The one its client used last (connected, or offline the
                # shortest time); the others were copies left behind.
                newest = min(offered, key=lambda record: record.get("offline_for", 0.0))
                try:
                    session = self._adopt(newest, self.core.loop.time())
                except (ValueError, KeyError, TypeError, EnvelopeError) as exc:
                    log.error("a session record for %s from another node is not one (%s): "
                              "the client gets a new session", shown(client.client_id), exc)
                else:
                    if session is not None and replica is not None:
                        # What reached the node it left after it was handed over.
                        await replica.catch_up(session, newest)
                    # Its subscriptions are at the NATS server before the
                    # CONNACK: what is published once the client knows it is
                    # back reaches it here (the node it left no longer
                    # takes it in).
                    try:
                        await bus.synced(self.timeout)
                    except (ClusterUnavailable, asyncio.TimeoutError):
                        pass  # the subscriptions go when the connection is back
                if len(offered) > 1:
                    log.warning("client %s: %d nodes held a session; the newest is kept",
                                shown(client.client_id), len(offered))
            elif not refused and replica is not None:
                # The node holding it did not answer: from its copy (cluster.replica).
                return await replica.take_over(client, answered)
            return Reason.NOT_AUTHORIZED if refused else 0
        return asyncio.ensure_future(gather())

    def _adopt(self, record: dict[str, Any], now: float) -> Session | None:
        stored, offline_for = stored_session(record, now)
        if stored.client_id in self.core.sessions:
            return None  # made here meanwhile (another connection): it stays
        session = adopt(self.core, stored, offline_for)
        self.bus.stats.sessions_taken += 1
        log.info("client %s: its session came from another node (%d subscriptions, %d "
                 "in flight, %d queued)", shown(stored.client_id), len(stored.subscriptions),
                 len(stored.inflight), len(stored.queue))
        return session

    # ------------------------------------------------------------ answering

    def _asked(self, subject: str, payload: bytes, headers: Any, reply: str | None) -> None:
        if reply is None:
            return
        try:
            request = json.loads(payload)
            client_id, node = str(request["client_id"]), str(request["node"])
            client, _ = client_from_record(client_id, request["username"], request["client"],
                                           self.core.certificate_parser)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("a session request that is not one: %s", exc)
            return
        answer: dict[str, Any] = {"node": self.bus.name}
        if node != self.bus.name:
            try:
                answer.update(self._hand_over(client))
            except Exception:  # a fault here must not leave the asking node waiting
                log.exception("handing the session of %s over to %s", shown(client_id), node)
        self.bus.publish(reply, json.dumps(answer).encode())
        self.core.outboxes.flush()

    def _hand_over(self, client: ClientInfo) -> dict[str, Any]:
        core = self.core
        if client.client_id not in core.sessions:
            return {}
        if core.session_refused(client):
            return {"refused": True}
        session = core.sessions.get(client.client_id)
        if session is not None and session.connection is not None:
            log.info("client %s connected on another node: its session goes there",
                     shown(client.client_id))
            session.connection.close(Reason.SESSION_TAKEN_OVER, "session taken over")
            session = core.sessions.get(client.client_id)
        if session is None:
            return {}  # it ended with its connection (no expiry)
        replica = self.bus.replica
        # With the node's position: the new node reads from there what
        # reached this one too late for the session.
        record = (replica.record(session, 0) if replica is not None
                  else session_record(session, core.loop.time()))
        core.give_up_session(session)
        self.bus.stats.sessions_given += 1
        return {"session": record}
