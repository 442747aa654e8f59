"""QoS 1 and 2 messages between nodes: through the JetStream stream BMQ_MSGS.

Acknowledged means stored. A QoS 1 or 2 message published on this node is
routed to its own subscribers, as ever, and goes to the stream (``HPUB
bmq.d.<subject>`` with a ``Nats-Msg-Id``); its PUBACK or PUBREC waits at the
ack gate here until the stream has answered that it stored the message, then
for the durable store's commit as any acknowledgement does. A message the
stream did not answer for is sent again with the same id (the stream drops
the copy it already has, within ``cluster.duplicate_window``), on this
connection to NATS or the next one: the client's acknowledgement waits, as
it would for a slow disk.

The stream republishes each message it stores on ``bmq.r.<subject>``, with
its sequence number in the headers; every node subscribes there to the
subjects of its subscribers' filters, next to ``bmq.t`` for QoS 0, and
delivers those copies as it delivers any message of another node (its own
copies it skips: its subscribers had the message when it was published).
The copies come in the stream's order, so one number, the last sequence
delivered (the node's position), says what the node has had: it is kept in
the durable store with the rows those deliveries made. When the node starts
again after a crash, or gets its connection to NATS back, it reads the
stream from its position on through an ephemeral consumer before it takes
the live copies again (those arriving meanwhile wait, and the ones it read
already are dropped by their sequence): a message stored while the node was
away reaches the sessions it restored, once.

The same position holds the stream back when this node's subscribers fall
behind: the stream is their publisher (``as_sender``), which the core holds
back, as it holds back a client publishing to a subscriber over its
high-water mark. While held, the live copies are let go, the position not
moved past them; once released (the subscriber drained, or was taken for
slow after ``mqtt.slow_subscriber_timeout``), the node reads them from the
stream. JetStream is the queue between nodes: a subscriber that keeps up
loses nothing, however fast another node's publishers are.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from typing import Any

import attrs

from .bus import REPUBLISHED_PREFIX, STORED_PREFIX, ClusterUnavailable
from .codec import topic_to_key, topic_to_subject
from .envelope import EnvelopeError, read_stored
from .jetstream import JetStreamError, api, delivery_position, ensure_stream, patient_api
from .wire import pub, sub

log = logging.getLogger("bastionmq.cluster")

STREAM = "BMQ_MSGS"

#: The name of this node's position in the durable store.
POSITION = "cluster." + STREAM

#: A message the stream has not answered for within this many seconds is
#: sent again (JetStream electing a leader, a lost connection).
RESEND_AFTER = 2.0
#: How often the messages waiting for the stream are looked at.
CHECK_INTERVAL = 0.5
#: Seconds between warnings that messages are still waiting.
WARN_INTERVAL = 30.0
#: How long a catch-up waits for the next message of the stream before it
#: starts again from where it got to.
CATCH_UP_STALL = 10.0

#: Live copies kept waiting while the node catches up; those beyond are let
#: go and read from the stream.
EARLY_KEPT = 10_000
#: Messages a catch-up consumer sends before it waits for this node's
#: acknowledgement: while a subscriber holds the stream back the node stops
#: acknowledging, and at most this many are sent for nothing.
CATCH_UP_WINDOW = 512

_SEQUENCE = b"Nats-Sequence: "

#: Each node stores a mark of its own in the stream now and then, on
#: ``bmq.d.==.<node>`` (no topic maps to the token "=="), and takes it back
#: on its own subscription: the copies come in the stream's order, so its
#: mark coming back means that every copy before it that the node wants has
#: come, and its position moves to the mark's sequence. Without it a node
#: whose subscribers want little of the stream would keep an old position,
#: and read (and give new subscriptions) all that came since at its next
#: catch-up.
MARK_TOKEN = "=="
#: Seconds between marks while the stream takes other messages; doubled up
#: to MARK_IDLE while nothing else comes between two marks.
MARK_INTERVAL = 1.0
MARK_IDLE = 60.0


def is_mark(subject: str) -> bool:
    """Whether ``subject`` (``bmq.d.`` or ``bmq.r.``) is a node's mark."""
    return subject[6:9] == MARK_TOKEN + "."


def stream_config(replicas: int, retention: float, duplicate_window: float) -> dict[str, Any]:
    return {
        "name": STREAM,
        "subjects": [STORED_PREFIX + ".>"],
        "retention": "limits",
        "max_age": int(retention * 1e9),
        "discard": "old",
        "storage": "file",
        "num_replicas": replicas,
        "duplicate_window": int(duplicate_window * 1e9),
        "republish": {"src": STORED_PREFIX + ".>", "dest": REPUBLISHED_PREFIX + ".>"},
    }


def header(headers: bytes | None, name: bytes) -> bytes | None:
    """The value of header ``name`` (given as ``b"Name: "``) in a NATS
    header block, or None."""
    if not headers:
        return None
    start = headers.find(name)
    if start < 0:
        return None
    start += len(name)
    end = headers.find(b"\r", start)
    return headers[start:end if end >= 0 else None]


def sequence_of(headers: bytes) -> int:
    """The stream sequence in the headers of a republished copy (0: none)."""
    value = header(headers, _SEQUENCE)
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


@attrs.define(slots=True, eq=False)
class Pending:
    """A message sent to the stream, not yet answered for."""

    reply: str
    #: The HPUB, sent again as it is (same id, same reply subject).
    frame: bytes
    #: Loop time it was last sent; 0.0: not yet (no connection at the time).
    sent_at: float
    stored: bool = False
    #: Not to be sent before the durable store's next commit.
    deferred: bool = False
    #: (outbox, acknowledgement) written once this and every message sent
    #: before it are stored.
    acks: list[tuple[Any, bytes]] | None = None


@attrs.define(slots=True)
class StreamStats:
    #: Messages the stream stored (its answer came), and those it had already.
    stored: int = 0
    duplicate: int = 0
    #: Messages sent to the stream again, for want of an answer.
    resent: int = 0
    #: Messages the stream refused for good (published on to this node's
    #: subscribers only).
    refused: int = 0
    #: Messages read from the stream when catching up, and delivered.
    caught_up: int = 0
    #: Times a subscriber of this node over its high-water mark held the
    #: stream back, and the seconds it was held in all.
    holds: int = 0
    held_seconds: float = 0.0


@attrs.define(slots=True, eq=False)
class _SendAfterCommit:
    """Held with the durable store's open batch as an acknowledgement is
    (Journal.hold): sends a QoS 2 message to the stream once its id has
    committed with its session."""

    stream: MessageStream
    entry: Pending

    def release_held(self, data: bytes) -> None:
        self.stream._send_deferred(self.entry)


@attrs.define(slots=True, eq=False)
class _FromStream:
    """The sender of the stream's copies, for the core: what it holds back
    is its ``connection``, the stream."""

    connection: MessageStream


class MessageStream:
    """This node's side of BMQ_MSGS: sending, the ack gate, the position."""

    def __init__(self, bus: Any, core: Any, *, replicas: int, retention: float,
                 duplicate_window: float) -> None:
        self.bus = bus
        self.core = core
        self.config = stream_config(replicas, retention, duplicate_window)
        self.stats = StreamStats()
        #: Message ids are ``<node>:<this start>:<count>``: unique in the
        #: cluster, and a node knows its own copies by the first part.
        self._own = f"Nats-Msg-Id: {bus.name}:".encode()
        self._id_prefix = f"{bus.name}:{secrets.token_hex(6)}:"
        self._count = 0
        self._replies = 0
        self._lines: dict[str, bytes] = {}
        #: Messages waiting for the stream's answer, by reply subject, and in
        #: the order they were sent (acknowledgements leave in that order).
        self.pending: dict[str, Pending] = {}
        self.order: collections.deque[Pending] = collections.deque()
        #: Acknowledgements at the gate per outbox: while it has one there,
        #: its later ones queue behind it, whatever they wait for.
        self.holds: dict[Any, int] = {}
        #: The sequence of the last copy delivered; None until the first catch-up.
        self.position: int | None = None
        #: Live copies arriving while the node reads the stream wait here.
        self.catching_up = True
        self._early: list[tuple[str, int, bytes, bytes]] = []
        self._overflow = False
        self._catch_up: asyncio.Task[None] | None = None
        self._checks: asyncio.Task[None] | None = None
        self._warned_at = 0.0
        #: The stream as the core sees it when it delivers its copies: a
        #: sender whose ``connection`` (this) it can hold back.
        self.as_sender = _FromStream(self)
        #: Subscribers over their high-water mark holding the stream back.
        self.holders = 0
        self._held_since = 0.0
        node = topic_to_key(bus.name)
        self._mark = pub(f"{STORED_PREFIX}.{MARK_TOKEN}.{node}", b"")
        self._mark_subject = f"{REPUBLISHED_PREFIX}.{MARK_TOKEN}.{node}"
        self._marked_at = 0.0
        self._mark_every = MARK_INTERVAL
        self._last_mark = 0

    # ------------------------------------------------------------ lifecycle

    async def prepare(self) -> None:
        """Make the stream (or bring it to this node's settings)."""
        await ensure_stream(self.bus, self.config)
        self._checks = self.core.loop.create_task(self._check(),
                                                  name="bastionmq cluster stream")

    async def start(self, position: int | None) -> None:
        """Catch up from ``position`` (the durable store's), or from the
        stream's end for a node without one, then take live copies."""
        self.position = position
        await self.catch_up()

    def close(self) -> None:
        for task in (self._catch_up, self._checks):
            if task is not None:
                task.cancel()
        self._catch_up = self._checks = None

    def reconnecting(self) -> None:
        """A new connection to NATS is being greeted: send what waits for
        the stream again on it; live copies wait until the node caught up."""
        self.catching_up = True
        bus = self.bus
        sid = bus._next_sid
        bus._next_sid += 1
        bus._write(sub(self._mark_subject, sid))  # its marks (a copy as any other)
        for entry in self.order:
            if not entry.stored and not entry.deferred:
                self._transmit(entry)

    def reconnected(self) -> None:
        """The connection is ready: read what was stored while it was down."""
        if self.position is None:
            return  # start() catches up the first time
        self._catch_up_soon()

    def _catch_up_soon(self) -> None:
        # Live copies wait from now on: one delivered before the catch-up
        # would move the position past those it reads.
        self.catching_up = True
        if self._catch_up is None:
            self._catch_up = self.core.loop.create_task(self._catch_up_later(),
                                                        name="bastionmq cluster catch-up")

    # ------------------------------------------------------------ held back

    def hold(self) -> None:
        """A subscriber of this node is over its high-water mark (the core's
        hold_back): deliver nothing more from the stream until released."""
        self.holders += 1
        if self.holders == 1:
            self.stats.holds += 1
            self._held_since = self.core.loop.time()

    def release(self) -> None:
        """One subscriber no longer holds the stream back; with the last,
        what was let go meanwhile is read from the stream."""
        if self.holders <= 0:
            return
        self.holders -= 1
        if self.holders == 0:
            self.stats.held_seconds += self.core.loop.time() - self._held_since
            if self.position is not None:
                self._catch_up_soon()

    async def _catch_up_later(self) -> None:
        try:
            await self.catch_up()
        except Exception as exc:  # logged, and live copies flow again
            log.error("could not read the messages stored while this node was cut off "
                      "from NATS: %s", exc)
            self._take_early()
        finally:
            self._catch_up = None

    def status(self) -> dict[str, Any]:
        """For the management API's /cluster."""
        return {"name": STREAM, "position": self.position, "waiting": len(self.pending),
                "catching_up": self.catching_up, "counters": attrs.asdict(self.stats)}

    # ------------------------------------------------------------ sending

    def new_id(self) -> str:
        """A message id no other message of the cluster has."""
        self._count += 1
        return f"{self._id_prefix}{self._count}"

    def send(self, topic: str, head: bytes, payload: bytes, stream_id: str | None = None,
             after_commit: bool = False) -> Pending | None:
        """Send a QoS 1 or 2 message to the stream, under ``stream_id`` (a
        new id when None), after the durable store's next commit with
        ``after_commit``; the Pending its acknowledgements wait for, or None
        when it cannot go (too large)."""
        bus = self.bus
        line = self._lines.get(topic)
        if line is None:
            line = self._line_of(topic)
        if stream_id is None:
            stream_id = self.new_id()
        self._replies += 1
        reply = f"{bus._inbox}.s{self._replies}"
        headers = b"NATS/1.0\r\nNats-Msg-Id: %b\r\n\r\n" % stream_id.encode()
        size = len(headers) + len(head) + len(payload)
        if size > bus.max_payload or not line:
            bus._unsendable(topic, size)
            return None
        frame = b"".join((line % (reply.encode(), len(headers), size), headers, head, payload,
                          b"\r\n"))
        entry = Pending(reply, frame, 0.0)
        self.pending[reply] = entry
        self.order.append(entry)
        journal = self.core.journal
        if after_commit and journal is not None and journal.unsettled():
            entry.deferred = True
            journal.hold(_SendAfterCommit(self, entry), b"")
        elif bus._sending:
            self._transmit(entry)
        return entry

    def _send_deferred(self, entry: Pending) -> None:
        entry.deferred = False
        if self.bus._sending and not entry.stored:
            self._transmit(entry)

    def _transmit(self, entry: Pending) -> None:
        """Write ``entry``'s HPUB (again: same id, same reply subject). An
        entry not yet stored stays in ``pending`` until answered."""
        entry.sent_at = self.core.loop.time()
        self.bus._write(entry.frame)

    def _line_of(self, topic: str) -> bytes:
        subject = topic_to_subject(STORED_PREFIX, topic).encode()
        line = b"HPUB " + subject + b" %b %d %d\r\n" if len(subject) < 4000 else b""
        if len(self._lines) >= 8192:
            self._lines.clear()
        self._lines[topic] = line
        return line

    def answered(self, reply: str, payload: bytes, headers: bytes | None) -> bool:
        """The stream's answer to a message sent to it; False when ``reply``
        is not one of ours."""
        entry = self.pending.pop(reply, None)
        if entry is None:
            return reply.startswith(self.bus._inbox + ".s")  # a late second answer
        if headers is not None or b'"error"' in payload:
            self._failed(entry, payload, headers)
            return True
        if b'"duplicate"' in payload:
            self.stats.duplicate += 1
        self.stats.stored += 1
        entry.stored = True
        self._release_stored()
        return True

    def _failed(self, entry: Pending, payload: bytes, headers: bytes | None) -> None:
        """No responders (JetStream not there, for the moment) or an error
        answer: sent again later, unless the error is for good."""
        text = payload.decode("utf-8", "replace")
        if headers is None and '"code":400' in text.replace(" ", ""):
            # Refused for good (larger than the stream takes, say): the
            # message reached this node's subscribers only.
            self.stats.refused += 1
            log.error("the stream %s refused a message: %s", STREAM, text[:300])
            entry.stored = True
            self._release_stored()
            return
        self.pending[entry.reply] = entry
        entry.sent_at = self.core.loop.time() - RESEND_AFTER / 2  # again soon

    def _release_stored(self) -> None:
        order = self.order
        released = False
        while order and order[0].stored:
            entry = order.popleft()
            if entry.acks:
                for outbox, data in entry.acks:
                    self._release(outbox, data)
                released = True
        if released:
            # Called for an answer read from NATS: the bus writes the
            # outboxes once after the read, however many answers it held.
            self.bus._routed = True

    # ------------------------------------------------------------ the ack gate

    def holds_for(self, outbox: Any) -> bool:
        return outbox in self.holds

    def hold_ack(self, outbox: Any, data: bytes, entry: Pending | None) -> None:
        """Write ``data`` (an acknowledgement) to ``outbox`` once ``entry``
        is stored, or, for None, once what this outbox waits for already is."""
        if entry is None:
            entry = self.order[-1]  # the outbox holds at the gate: order has entries
        if entry.acks is None:
            entry.acks = []
        entry.acks.append((outbox, data))
        self.holds[outbox] = self.holds.get(outbox, 0) + 1
        outbox.acks_held += 1

    def _release(self, outbox: Any, data: bytes) -> None:
        left = self.holds[outbox] - 1
        if left:
            self.holds[outbox] = left
        else:
            del self.holds[outbox]
        outbox.acks_held -= 1
        if outbox.closed:
            return
        journal = self.core.journal
        if journal is not None and journal.unsettled():
            # What publishing it changed in the durable store commits first.
            outbox.acks_held += 1
            journal.hold(outbox, data)
        else:
            outbox.write(data)

    async def _check(self) -> None:
        """Send again what the stream has not answered for in time."""
        loop = self.core.loop
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            now = loop.time()
            if now - self._marked_at >= self._mark_every and self.bus._sending \
                    and self.position is not None and not self.catching_up \
                    and not self.holders:
                self._marked_at = now
                self.bus._write(self._mark)
            if not self.pending or not self.bus._sending:
                continue
            waiting = 0
            for entry in self.order:
                if entry.stored or entry.deferred:
                    continue
                waiting += 1
                if now - entry.sent_at >= RESEND_AFTER:
                    self._transmit(entry)
                    self.stats.resent += 1
            if waiting and now - self._warned_at >= WARN_INTERVAL:
                self._warned_at = now
                log.warning("%d QoS 1/2 messages wait for the stream %s to store them "
                            "(their acknowledgements wait with them)", waiting, STREAM)

    # ------------------------------------------------------------ receiving

    def received(self, subject: str, sid: int, payload: bytes, headers: bytes) -> None:
        """A copy the stream republished, on one of this node's subscriptions."""
        if self.catching_up:
            if len(self._early) < EARLY_KEPT:
                self._early.append((subject, sid, payload, headers))
            else:
                self._overflow = True  # read from the stream instead
            return
        bus = self.bus
        if sid not in bus._group_sids:
            # (A shared group's copy is a second copy of a message this node
            # may take for its other subscribers too: not counted here.)
            if self.holders:
                return  # let go: read from the stream once released
            sequence = sequence_of(headers)
            position = self.position
            if position is not None and sequence <= position:
                bus.stats.copies += 1  # a second matching subject of this node's
                return
            self._advance(sequence)
            if self._own in headers:
                return
        if is_mark(subject):
            if subject == self._mark_subject:
                # Back off while nothing but marks (one per node at most)
                # is stored between two of this node's.
                quiet = sequence - self._last_mark <= len(self.bus.peers) + 1
                self._mark_every = min(self._mark_every * 2, MARK_IDLE) if quiet \
                    else MARK_INTERVAL
                self._last_mark = sequence
            return
        topic = bus.topic_of(subject)
        if topic is not None:
            bus.deliver_remote(topic, sid, payload, False, self.as_sender)

    def _advance(self, sequence: int) -> None:
        self.position = sequence
        journal = self.core.journal
        if journal is not None:
            journal.position_reached(POSITION, sequence)

    def _take_early(self) -> None:
        self.catching_up = False
        early, self._early = self._early, []
        for item in early:
            self.received(*item)
        if early:
            self.core.outboxes.flush()

    async def catch_up(self) -> None:
        """Deliver what the stream stored after this node's position, then
        the live copies that waited meanwhile (when more came than are kept
        waiting, the stream is read again up to its new end instead)."""
        self.catching_up = True
        while await self._catch_up_to_end() and not self.holders:
            self._early.clear()
        self._take_early()

    async def _catch_up_to_end(self) -> bool:
        """One pass of ``catch_up``; whether live copies were let go meanwhile."""
        self._overflow = False
        info = await patient_api(self.bus, f"STREAM.INFO.{STREAM}")
        state = info.get("state", {})
        first, last = state.get("first_seq", 0), state.get("last_seq", 0)
        position = self.position
        if position is None:
            # A node that never read the stream: what was stored before it is
            # not its. Kept with the first commit (its first session's, say).
            self._advance(last)
        elif position > last:
            log.warning("the stream %s ends at %d, before this node's position %d (was it "
                        "deleted?): going on from its end", STREAM, last, position)
            self._advance(last)
        elif position < last:
            if first > position + 1:
                log.warning("%d messages of the stream %s aged out before this node read "
                            "them (cluster.message_retention)", first - position - 1, STREAM)
            while self.position is not None and self.position < last and not self.holders:
                if not await self._read(self.position + 1, last):
                    log.warning("catching up from the stream %s stalled at %d of %d; "
                                "starting again from there", STREAM, self.position, last)
        return self._overflow

    async def _read(self, start: int, last: int) -> bool:
        """Deliver the stream's messages from ``start`` to ``last``; False
        when the reading stalled before it got there."""
        bus = self.bus
        loop = self.core.loop
        done: asyncio.Future[None] = loop.create_future()
        progress = [loop.time()]
        delivered_count = [0]

        def delivered(subject: str, payload: bytes, headers: bytes | None,
                      reply: str | None) -> None:
            where = delivery_position(reply)
            if where is None:
                return  # a status message: none asked for
            sequence, stored_at, pending = where
            progress[0] = loop.time()
            if done.done():
                # What the consumer sent before it is deleted: taken, it
                # would move the position past the ones let go while held
                # (the stream may be released before this read ends).
                return
            if self.holders:
                # Held back: the rest is read again once released.
                if not done.done():
                    done.set_result(None)
                return
            if sequence > (self.position or 0):
                self._advance(sequence)
                if headers is None or self._own not in headers:
                    self._deliver_stored(subject, payload, stored_at)
            finished = pending == 0 or sequence >= last
            delivered_count[0] += 1
            if delivered_count[0] % (CATCH_UP_WINDOW // 4) == 0 and not finished:
                # Acknowledges this one and all before it: the next ones come.
                bus.publish(reply, b"")
            if finished and not done.done():
                done.set_result(None)

        inbox, sid = bus.deliver_to(delivered)
        name = None
        try:
            answer = await patient_api(bus, f"CONSUMER.CREATE.{STREAM}", {
                "stream_name": STREAM, "config": {
                    "deliver_subject": inbox, "deliver_policy": "by_start_sequence",
                    "opt_start_seq": start, "ack_policy": "all",
                    "max_ack_pending": CATCH_UP_WINDOW, "ack_wait": 30_000_000_000,
                    "filter_subject": STORED_PREFIX + ".>", "mem_storage": True,
                    "num_replicas": 1, "inactive_threshold": 5_000_000_000}})
            name = answer.get("name")
            while not done.done():
                try:
                    await asyncio.wait_for(asyncio.shield(done), CATCH_UP_STALL)
                except asyncio.TimeoutError:
                    if loop.time() - progress[0] >= CATCH_UP_STALL:
                        return False
            return True
        finally:
            bus.stop_delivery(sid)
            if name:
                try:
                    await api(bus, f"CONSUMER.DELETE.{STREAM}.{name}")
                except (JetStreamError, asyncio.TimeoutError, ClusterUnavailable):
                    pass  # it goes by itself when inactive

    def _deliver_stored(self, subject: str, payload: bytes, stored_at: int) -> None:
        bus = self.bus
        if is_mark(subject):
            return
        topic = bus.topic_of(subject)
        if topic is None:
            return
        now = self.core.loop.time()
        try:
            message = read_stored(topic, payload, stored_at, now)
        except EnvelopeError as exc:
            bus._refuse(subject, str(exc))
            return
        if message.expired(now):
            return
        self.stats.caught_up += 1
        bus.stats.received += 1
        self.core.route_remote(message, self.as_sender)
        bus._routed = True
