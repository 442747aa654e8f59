"""Persistent sessions kept in JetStream, so that one outlives its node.

The node that holds a persistent session keeps a copy of it in the stream
BMQ_SESSIONS, one subject per client id (``bmq.sess.<key>``), of which the
stream keeps the last message: the session as cluster.sessions hands it
over (subscriptions, messages in flight and queued, inbound QoS 2 packet
ids, expiry), with the node's name, the session's epoch on that node (the
time it came there, in ns) and the node's position in BMQ_MSGS at the time
of the copy. The copy is written when the session comes to the node, when
its subscriptions change and when its client goes (at once), and after
acknowledgements (at the next checkpoint, every second); never per message
that reaches an offline session: the stream BMQ_MSGS holds those. A QoS 2
PUBLISH to the session and the PUBREL answering its PUBREC wait for a copy
that has them (``after_copy``), so that a node taking the session over sends
them again under their packet ids and never as new messages.

A client that resumes its session on a node while the node holding it does
not answer (killed, stopped, cut off) gets it from the copy: the node
claims the copy by a compare-and-set on its subject (of two nodes trying,
one wins), rebuilds the session from it, and delivers what BMQ_MSGS stored
after the copy's position that the session's subscriptions match, skipping
the messages it holds already (by their stream id). Its own stream copies
are held back meanwhile (cluster.stream), so that the session gets the
stream's messages in their order.

Fencing: each write expects the subject's last sequence this node knows.
A node whose write finds a newer epoch there (it was stopped, or cut off,
and its session went on elsewhere) gives the session up and closes its
client's connection (5.0: 0x8E). A node that restarts, that gets NATS back,
or that finds its own loop stood still longer than three heartbeats (a
SIGSTOP, say) checks every session it holds against the copies first and
gives up those gone elsewhere or ended.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import time
from typing import Any

import attrs
from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import ClientInfo
from bastionmq.broker.ownership import same_owner
from bastionmq.broker.properties import Reason
from bastionmq.broker.restore import adopt
from bastionmq.broker.sessions import NEVER_EXPIRES, Session

from .bus import STORED_PREFIX, ClusterUnavailable
from .codec import topic_to_key
from .envelope import EnvelopeError, read_stored
from .jetstream import (
    JetStreamError, api, ensure_stream, patient_api, read_last_per_subject, read_range,
)
from .sessions import RECORD_VERSION, session_record, stored_session
from .stream import STREAM as MESSAGES_STREAM
from .stream import header, is_mark

log = logging.getLogger("bastionmq.cluster")

SESSIONS_STREAM = "BMQ_SESSIONS"
SESSION_PREFIX = "bmq.sess"

#: Seconds between the checkpoints of the sessions whose clients acknowledged.
CHECKPOINT_INTERVAL = 1.0

#: err_code of a publish whose expected last subject sequence did not hold.
WRONG_LAST_SEQUENCE = 10071
#: err_code of "no message found".
NO_MESSAGE = 10037

_MSG_ID = b"Nats-Msg-Id: "


@attrs.define(slots=True)
class ReplicaStats:
    #: Copies written; sessions resumed here from another node's copy;
    #: sessions given up because their copy went on elsewhere (fencing).
    written: int = 0
    taken: int = 0
    given_up: int = 0
    #: Copies not written: larger than NATS takes (the last one that fit
    #: stays), or failed (written again at the next checkpoint).
    too_large: int = 0
    failed: int = 0


def stream_config(replicas: int) -> dict[str, Any]:
    return {"name": SESSIONS_STREAM, "subjects": [SESSION_PREFIX + ".>"],
            "retention": "limits", "max_msgs_per_subject": 1, "discard": "old",
            "storage": "file", "num_replicas": replicas}


def subject_of(client_id: str) -> str:
    return f"{SESSION_PREFIX}.{topic_to_key(client_id)}"


def message_id(headers: bytes | None) -> str | None:
    value = header(headers, _MSG_ID)
    return value.decode("utf-8", "replace") if value is not None else None


def offline_for(record: dict[str, Any]) -> float:
    """How long the session of ``record`` has been offline by now (its
    client, if connected when the record was made, went then)."""
    return float(record.get("offline_for", 0.0)) + time.time() - float(
        record.get("at", time.time()))


class SessionReplica:
    """This node's side of BMQ_SESSIONS."""

    def __init__(self, bus: Any, core: Any, replicas: int) -> None:
        self.bus = bus
        self.core = core
        self.loop: asyncio.AbstractEventLoop = core.loop
        self.config = stream_config(replicas)
        #: client id -> [last sequence of its subject known here (None:
        #: unknown), its epoch here], for the sessions this node holds.
        self.known: dict[str, list[Any]] = {}
        #: Sessions to write (None: ended, its copy to go), urgent or not.
        self._dirty: dict[str, Session | None] = {}
        #: Of those, the ones to write at once (after the write under way).
        self._soon: set[str] = set()
        #: What waits for a session's next copy: packets that must not leave
        #: before the copy knows them (after_copy).
        self._after: dict[str, list[Any]] = {}
        self._urgent = False
        self._writing: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._checking: asyncio.Task[None] | None = None
        self.stats = ReplicaStats()
        #: Nodes that went (loop time), not heard since:
        #: copies they left may outlive a clean start elsewhere.
        self.departed: dict[str, float] = {}
        #: How long a departed node's copies are thought of (the longest
        #: session expiry a client may have).
        self.departed_for = float(core.settings.session_expiry_interval)
        self._warned_large: set[str] = set()

    # ------------------------------------------------------------ lifecycle

    async def prepare(self) -> None:
        """Make the stream (or bring it to this node's settings)."""
        await ensure_stream(self.bus, self.config)

    async def start(self) -> None:
        """Check the sessions restored here against their copies, then
        keep those copies up to date."""
        await self.check()
        self._task = self.loop.create_task(self._run(), name="bastionmq cluster sessions")
        self._flush()

    async def stop(self, timeout: float = 2.0) -> None:
        """Write what changed (the sessions of the clients just closed are
        offline now), then stop."""
        if self._task is None:
            return
        self._flush()
        self._task.cancel()
        self._task = None
        writes = [task for task in self._tasks if not task.done()]
        if writes:
            await asyncio.wait(writes, timeout=timeout)
        for task in (self._checking, *self._tasks):
            if task is not None:
                task.cancel()
        self._checking = None

    def reconnected(self) -> None:
        """Back on NATS: sessions may have gone on elsewhere meanwhile."""
        self._check_soon()

    def _check_soon(self) -> None:
        if self._checking is None:
            self._checking = self.loop.create_task(self._check_later(),
                                                   name="bastionmq cluster sessions check")

    async def _check_later(self) -> None:
        try:
            await self.check()
        except (JetStreamError, ClusterUnavailable, asyncio.TimeoutError) as exc:
            log.warning("could not check this node's sessions against the cluster's: %s", exc)
        finally:
            self._checking = None

    async def _run(self) -> None:
        loop = self.loop
        last = loop.time()
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            now = loop.time()
            if now - last > 3 * self.bus.heartbeat + CHECKPOINT_INTERVAL:
                # The loop stood still (the process stopped, say): the other
                # nodes took this one for gone and may have taken its sessions.
                log.warning("this node stood still for %.1f s: checking its sessions "
                            "against the cluster's", now - last - CHECKPOINT_INTERVAL)
                self._check_soon()
            last = now
            self._flush()

    def status(self) -> dict[str, Any]:
        """For the management API's /cluster."""
        return {"name": SESSIONS_STREAM, "sessions": len(self.known),
                "waiting": len(self._dirty) + len(self._writing),
                "counters": attrs.asdict(self.stats)}

    # ------------------------------------------------------------ the core's changes

    def changed(self, session: Session, urgent: bool) -> None:
        client_id = session.client_id
        if not session.expiry_interval:
            if client_id in self.known:
                self._dirty[client_id] = None  # no longer persistent: its copy goes
            elif urgent and session.connection is not None and self._departed_nodes():
                # A session starting clean: a copy a node that went left
                # goes too (a node that is there ends its own at the claim).
                self._spawn(self._discard_stale(client_id))
            return
        if client_id not in self.known and self._task is not None:
            # New here: its epoch on this node starts now, and its first
            # write expects no copy (0): one another node left is looked
            # at first (_conflict). (Before start, the sessions restored
            # get theirs from ``check``.)
            self.known[client_id] = [0, time.time_ns()]
        self._dirty[client_id] = session
        if urgent:
            self._soon.add(client_id)
            self._flush_soon()

    def ended(self, session: Session) -> None:
        if session.client_id in self.known:
            self._dirty[session.client_id] = None
            self._soon.add(session.client_id)
            self._flush_soon()

    def after_copy(self, session: Session, then: Any) -> None:
        """Call ``then`` once a copy written from now on has succeeded."""
        client_id = session.client_id
        if self.known.get(client_id) is None or self._task is None:
            then()  # no copy of it is kept (yet)
            return
        self._after.setdefault(client_id, []).append(then)
        self.changed(session, True)

    def _flush_soon(self) -> None:
        if not self._urgent:
            self._urgent = True
            self.loop.call_soon(self._flush)

    def node_gone(self, name: str) -> None:
        self.departed[name] = self.loop.time()

    def node_heard(self, name: str) -> None:
        self.departed.pop(name, None)

    def _departed_nodes(self) -> bool:
        """Whether a node went and has not come back (within the longest
        session expiry): copies it left may be waiting."""
        if not self.departed:
            return False
        since = self.loop.time() - self.departed_for
        for name in [name for name, at in self.departed.items() if at < since]:
            del self.departed[name]
        return bool(self.departed)

    def moved(self, session: Session) -> None:
        """Handed over to another node, which writes its copy from now on."""
        self._forget(session.client_id)

    # ------------------------------------------------------------ writing

    def _flush(self) -> None:
        self._urgent = False
        if not self._dirty or not self.bus._sending or self._task is None:
            return  # (before start: the sessions restored are checked first)
        dirty, self._dirty = self._dirty, {}
        for client_id, session in dirty.items():
            if client_id in self._writing:
                self._dirty[client_id] = session  # after the write under way
                continue
            self._soon.discard(client_id)
            known = self.known.get(client_id)
            if known is None or (session is not None
                                 and self.core.sessions.get(client_id) is not session):
                continue  # gone from here, or replaced: that change has its own entry
            self._writing.add(client_id)
            self._spawn(self._write(client_id, session, known, self._after.pop(client_id, None)))

    def _spawn(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def record(self, session: Session, epoch: int) -> dict[str, Any]:
        stream = self.bus.stream
        record = session_record(session, self.loop.time())
        record.update(node=self.bus.name, epoch=epoch, at=time.time(),
                      position=stream.position if stream is not None else None)
        if stream is not None:
            # The messages published here so far reached the session here
            # (those it matched) when they were published, whatever their
            # place in the stream: not to be given to it again.
            record["own"] = [stream._id_prefix, stream._count]
        return record

    async def _write(self, client_id: str, session: Session | None, known: list[Any],
                     then: list[Any] | None = None) -> None:
        """Write the copy of ``client_id``'s session (None: ended), then call
        what waited for it (``then``: packets held for it, after_copy)."""
        retry = False
        try:
            if self.known.get(client_id) is not known:
                return  # it left this node before its turn came: what waited goes too
            if session is None:
                payload = self._ended(client_id, known[1])
            else:
                payload = self.record(session, known[1])
            data = json.dumps(payload).encode()
            if len(data) > self.bus.max_payload - 512:
                # Its messages in flight and queued are more than NATS takes
                # in one message: the last copy that fit stays (older: what
                # was acknowledged since may come again after a failover).
                self.stats.too_large += 1
                if client_id not in self._warned_large:
                    self._warned_large.add(client_id)
                    log.warning("client %s: its session's copy (%d bytes) is larger than "
                                "NATS takes (max_payload %d): the last one that fit stays",
                                shown(client_id), len(data), self.bus.max_payload)
                self._release(then)
                return
            sequence = await self._put(client_id, data, known[0])
            if sequence is None:
                retry = True  # written again once the conflict is settled
                await self._conflict(client_id, known)
                return
            self.stats.written += 1
            if session is None:
                if self.known.get(client_id) is known:
                    del self.known[client_id]
            else:
                known[0] = sequence
            self._release(then)
        except (ClusterUnavailable, asyncio.TimeoutError, JetStreamError) as exc:
            log.debug("the copy of session %s waits: %s", shown(client_id), exc)
            self.stats.failed += 1
            if self.known.get(client_id) is known:
                self._dirty.setdefault(client_id, session)  # again at the next checkpoint
                if then:
                    self._after.setdefault(client_id, [])[:0] = then
        finally:
            self._writing.discard(client_id)
            if retry and then and self.known.get(client_id) is known:
                self._after.setdefault(client_id, [])[:0] = then
                self._soon.add(client_id)
            if client_id in self._soon:
                self._flush_soon()

    def _release(self, then: list[Any] | None) -> None:
        if then:
            for action in then:
                action()
            self.core.outboxes.flush()

    def _ended(self, client_id: str, epoch: int) -> dict[str, Any]:
        """The copy of a session that ended (here, or a clean start here)."""
        return {"v": RECORD_VERSION, "client_id": client_id, "ended": True,
                "node": self.bus.name, "epoch": epoch}

    async def _put(self, client_id: str, record: dict[str, Any] | bytes,
                   expected: int | None) -> int | None:
        """Write ``record``; its sequence, or None when the subject's last
        sequence was not ``expected`` (someone else wrote there)."""
        headers = None if expected is None else {
            "Nats-Expected-Last-Subject-Sequence": str(expected)}
        data = record if isinstance(record, bytes) else json.dumps(record).encode()
        answer = json.loads(await self.bus.request(
            subject_of(client_id), data, timeout=5.0, headers=headers))
        error = answer.get("error")
        if error and error.get("err_code") == WRONG_LAST_SEQUENCE:
            return None
        if error:
            raise JetStreamError(error.get("code", 0), error.get("err_code", 0),
                                 error.get("description", "error"))
        return int(answer["seq"])

    async def read(self, client_id: str) -> tuple[dict[str, Any], int] | None:
        """The copy of ``client_id``'s session and its sequence, or None."""
        try:
            answer = await api(self.bus, f"STREAM.MSG.GET.{SESSIONS_STREAM}",
                               {"last_by_subj": subject_of(client_id)})
        except JetStreamError as exc:
            if exc.err_code == NO_MESSAGE or exc.code == 404:
                return None
            raise
        message = answer["message"]
        record = json.loads(base64.b64decode(message.get("data") or b""))
        return record, int(message["seq"])

    async def _conflict(self, client_id: str, known: list[Any]) -> None:
        """A write found another's on the subject: a newer epoch fences
        this node out of the session; an older one is overwritten."""
        found = await self.read(client_id)
        if self.known.get(client_id) is not known:
            return
        if found is not None and found[0].get("node") != self.bus.name \
                and client_id not in self.core.sessions:
            self._forget(client_id)  # ended here: another node's copy is not this one's to end
            return
        if found is not None and self._held_against(client_id, found[0]):
            return
        if found is not None and found[0].get("node") != self.bus.name \
                and int(found[0].get("epoch", 0)) > known[1]:
            self._give_up(client_id, "its session went on on node %s" % found[0].get("node"))
            return
        known[0] = found[1] if found is not None else 0
        session = self.core.sessions.get(client_id)
        if session is not None:
            self.changed(session, True)

    async def _discard_stale(self, client_id: str) -> None:
        """A clean start here: a copy of its former session left by a node
        that could not end it (it was dead) goes too."""
        try:
            found = await self.read(client_id)
            if found is None or found[0].get("ended") or client_id in self.known:
                return
            record, sequence = found
            if self._held_against(client_id, record):
                return
            if await self._put(client_id, self._ended(client_id, time.time_ns()),
                               sequence) is not None:
                self.stats.written += 1
        except (ClusterUnavailable, asyncio.TimeoutError, JetStreamError, ValueError) as exc:
            log.debug("could not end the former session of %s in the cluster: %s",
                      shown(client_id), exc)

    # ------------------------------------------------------------ fencing

    def _forget(self, client_id: str) -> None:
        """Nothing more is written for ``client_id`` from here."""
        self.known.pop(client_id, None)
        self._dirty.pop(client_id, None)
        self._soon.discard(client_id)
        self._after.pop(client_id, None)

    def _give_up(self, client_id: str, why: str) -> None:
        """A session of this node went on elsewhere or ended there: it goes
        from here, with its connection (5.0: DISCONNECT 0x8E)."""
        self._forget(client_id)
        core = self.core
        session = core.sessions.get(client_id)
        if session is None:
            return
        log.warning("client %s: %s; the copy here goes", shown(client_id), why)
        self.stats.given_up += 1
        if session.connection is not None:
            session.connection.close(Reason.SESSION_TAKEN_OVER, "session taken over")
            session = core.sessions.get(client_id)
        if session is not None:
            core.give_up_session(session)
        core.outboxes.flush()

    async def check(self) -> None:
        """Give up the sessions of this node whose copies say they went on
        elsewhere or ended; copy those without one."""
        records: dict[str, dict[str, Any]] = {}

        def take(subject: str, payload: bytes, stored_at: int) -> None:
            try:
                record = json.loads(payload)
                records[str(record["client_id"])] = record
            except (ValueError, KeyError, TypeError) as exc:
                log.error("a session copy in %s that is not one: %s", SESSIONS_STREAM, exc)

        await read_last_per_subject(self.bus, SESSIONS_STREAM, SESSION_PREFIX + ".>", take)
        name = self.bus.name
        for client_id, session in list(self.core.sessions.items()):
            if not session.expiry_interval:
                continue
            record = records.get(client_id)
            known = self.known.get(client_id)
            if record is None:
                if known is None:
                    self.known[client_id] = [0, time.time_ns()]
                self.changed(session, True)
            elif record.get("ended") or record.get("node") != name:
                if known is None or int(record.get("epoch", 0)) > known[1]:
                    self._give_up(client_id, "its session went on on node %s or ended" %
                                  record.get("node"))
            elif known is None:
                self.known[client_id] = [None, int(record.get("epoch", 0))]

    # ------------------------------------------------------------ taking over

    async def take_over(self, client: ClientInfo, answered: set[str]) -> int:
        """Resume ``client``'s session from its copy when the node holding it
        did not answer: the reason code the client is refused with (0: not
        refused, NOT_AUTHORIZED: another identity's session, SERVER_UNAVAILABLE:
        the copy could not be read or claimed). The session is in the core
        when this returns 0, if there was one to take."""
        client_id = client.client_id
        try:
            found = await self.read(client_id)
        except (JetStreamError, ClusterUnavailable, asyncio.TimeoutError, ValueError) as exc:
            log.warning("client %s: could not read its session's copy: %s",
                        shown(client_id), exc)
            return Reason.SERVER_UNAVAILABLE
        if found is None or client_id in self.known:
            return 0  # none, or one of this node's ending
        record, sequence = found
        node = record.get("node")
        if record.get("ended") or node in answered:
            return 0  # ended, or with a node that answered it has none
        if not self._same_identity(record, client):
            if self.core.settings.session_takeover_by_other_identity != "clean":
                log.warning("client id %s: the session node %s held is another identity's",
                            shown(client_id), node)
                return Reason.NOT_AUTHORIZED
            return 0
        expiry = int(record.get("expiry", 0))
        if expiry != NEVER_EXPIRES and offline_for(record) >= expiry:
            return 0
        return await self._take(client_id, record, sequence, node)

    @staticmethod
    def _same_identity(record: dict[str, Any], client: ClientInfo | None) -> bool:
        """Whether the session of copy ``record`` is ``client``'s identity's."""
        try:
            owner = json.loads(record["client"])["owner"] if record.get("client") else None
        except (ValueError, KeyError, TypeError):
            owner = None
        return client is not None and same_owner(owner, record.get("username"), client)

    def _held_against(self, client_id: str, record: dict[str, Any]) -> bool:
        """A copy another node left of a session of ``client_id`` that has not
        ended and is another identity's than the session this node began
        with the id: that session is refused (core.refused_elsewhere) and
        the copy stays, as on one node the CONNECT would have been refused.
        Whether it was."""
        session = self.core.sessions.get(client_id)
        if (record.get("ended") or record.get("node") == self.bus.name or session is None
                or self._same_identity(record, session.client)
                or self.core.settings.session_takeover_by_other_identity == "clean"):
            return False
        log.warning("client id %s: node %s left a session of another identity with it; "
                    "the connection here is refused", shown(client_id), record.get("node"))
        self._forget(client_id)
        if self.core.refused_elsewhere(client_id, str(record.get("node"))):
            self.bus.stats.identity_refused += 1
        return True

    async def _take(self, client_id: str, record: dict[str, Any], sequence: int,
                    node: Any) -> int:
        core = self.core
        epoch = time.time_ns()
        claimed = dict(record, node=self.bus.name, epoch=epoch, at=time.time())
        try:
            taken = await self._put(client_id, claimed, sequence)
        except (JetStreamError, ClusterUnavailable, asyncio.TimeoutError) as exc:
            log.warning("client %s: could not take its session from node %s: %s",
                        shown(client_id), node, exc)
            return Reason.SERVER_UNAVAILABLE
        if taken is None:
            # Another node took it first (this client connected twice at
            # once): refused here, it finds its session there when it retries.
            log.info("client %s: another node took its session from node %s first",
                     shown(client_id), node)
            return Reason.SERVER_UNAVAILABLE
        if client_id in core.sessions:
            return 0  # made here meanwhile (another connection): it stays
        now = self.loop.time()
        session_stored, _ = stored_session(record, now)
        session = adopt(core, session_stored, offline_for(record))
        self.known[client_id] = [taken, epoch]
        self.stats.taken += 1
        self.bus.stats.sessions_taken += 1
        delivered = await self.catch_up(session, record)
        log.info("client %s: its session came from the copy node %s left (%d "
                 "subscriptions, %d in flight, %d queued, %d stored since)", shown(client_id),
                 node, len(session_stored.subscriptions), len(session_stored.inflight),
                 len(session_stored.queue), delivered)
        core.outboxes.flush()
        return 0

    async def catch_up(self, session: Session, record: dict[str, Any]) -> int:
        """Give ``session``, just adopted from ``record`` (a copy, or the
        record a live node handed it over with), what the stream stored
        after the record's position that it has not had: what reached the
        node it left after the record was made, or while that node was out
        of reach. How many. The stream is held back meanwhile: its copies
        wait, and the session gets the stream's order."""
        stream = self.bus.stream
        position = record.get("position")
        if stream is None or not isinstance(position, int) or stream.position is None:
            return 0
        stream.hold()
        try:
            return await self._catch_up(session, position, set(record.get("ids") or ()),
                                        record.get("own"))
        finally:
            stream.release()

    async def _catch_up(self, session: Session, position: int, held: set[str],
                        own_then: Any = None) -> int:
        """Give ``session`` (just taken, its client waiting for CONNACK) the
        stream's messages stored after ``position`` (the copy's) that it
        has not had, before the messages that reached it here meanwhile;
        how many. What the stream stored after this node's own position is
        delivered to this node's other sessions in the same pass, the node's
        position moved past it: one order for all, and the session is not
        given twice what it had on the node it came from."""
        stream = self.bus.stream
        bus = self.bus
        # The stream is held back: this node's position stays where it is
        # until this pass moves it.
        here = stream.position or 0
        own = stream._id_prefix
        published = stream._count
        before = len(session.queue or ())
        stored: list[tuple[int, str | None, str, bytes, int]] = []
        # Published on the node the copy came from before the copy was made:
        # the session had them there.
        then_prefix, then_count = ("", 0)
        if isinstance(own_then, list) and len(own_then) == 2:
            then_prefix, then_count = str(own_then[0]), int(own_then[1])

        def take(subject: str, payload: bytes, headers: bytes | None, seq: int,
                 stored_at: int) -> None:
            stored.append((seq, message_id(headers), subject, payload, stored_at))

        try:
            info = await patient_api(bus, f"STREAM.INFO.{MESSAGES_STREAM}")
            last = max(info.get("state", {}).get("last_seq", 0), here)
            await read_range(bus, MESSAGES_STREAM, STORED_PREFIX + ".>",
                             min(position, here) + 1, last, take)
        except (JetStreamError, ClusterUnavailable, asyncio.TimeoutError) as exc:
            log.error("client %s: the messages stored for its session after its copy (from "
                      "%d) could not be read, and are missing from it: %s",
                      shown(session.client_id), position + 1, exc)
        if self.core.sessions.get(session.client_id) is not session:
            stored = [item for item in stored if item[0] > here]  # the others' share only
        queue = session.queue
        arrived = [queue.pop() for _ in range(max(0, len(queue) - before))][::-1] if queue else []
        now = self.loop.time()
        delivered = 0
        core = self.core
        for seq, msg_id, subject, payload, stored_at in stored:
            mine = msg_id is not None and msg_id.startswith(own)
            # Published here: this node's sessions had it at once, the taken
            # one only if it came after (those before are given here).
            to_session = seq > position and not (msg_id is not None and (
                msg_id in held or _counted(msg_id, then_prefix, then_count)
                or (mine and not _counted(msg_id, own, published))))
            to_others = seq > here and not mine
            if seq > here:
                stream._advance(seq)
            if not (to_session or to_others) or is_mark(subject):
                continue
            topic = bus.topic_of(subject)
            if topic is None:
                continue
            try:
                message = read_stored(topic, payload, stored_at, now)
            except EnvelopeError:
                continue
            if message.expired(now):
                continue
            message.stream_id = msg_id
            if to_others:
                bus.stats.received += 1
                core.route_remote(message, stream.as_sender, without=session)
            if to_session:
                core.route_to(session, message, stream.as_sender)
                delivered += 1
        if arrived:
            if session.queue is None:
                session.queue = collections.deque()
            session.queue.extend(arrived)
        return delivered


def _counted(msg_id: str, prefix: str, count: int) -> bool:
    """Whether ``msg_id`` is one of the first ``count`` ids under ``prefix``
    (a node's start: cluster.stream's ids are ``<prefix><n>``)."""
    if not prefix or not msg_id.startswith(prefix):
        return False
    number = msg_id[len(prefix):]
    return number.isdigit() and int(number) <= count
