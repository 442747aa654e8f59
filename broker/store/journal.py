"""What the core changed since the last commit, as rows to write.

The core reports every change to durable state here as it happens
(synchronously, on the hot path), and the store commits the rows in batches
(group commit). Within a batch the changes to one row are folded together:
the last one wins, and a row made and removed within one batch (a QoS 1
message delivered and acknowledged within a few milliseconds) never reaches
the disk at all. Because each row has exactly one final state in a batch,
the order in which a batch's rows are written does not matter; only the
removal of whole sessions goes last, as it sweeps rows by session.

A message body is one row however many sessions hold it: ``Message.store_id``
names the row and ``Message.store_refs`` counts the queue and in-flight rows
that point at it; the row goes with the last of them.

Acknowledgements that promise durability (PUBACK, PUBREC, PUBREL, PUBCOMP,
SUBACK, UNSUBACK) are held with the batch that holds what they promise, and
written when it has committed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from ..codec import Subscription, Will, encode_properties
from ..message import Message
from ..ownership import client_record
from ..ports import ClientInfo

if TYPE_CHECKING:
    from ..sessions import Inflight, Session, SubscriptionEntry

#: Marks a row to delete in a batch's table of rows.
DELETE = None


def encode_ids(ids: tuple[int, ...]) -> str | None:
    return ",".join(map(str, ids)) if ids else None


def decode_ids(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",")) if text else ()


def _properties(props: Any) -> bytes | None:
    return encode_properties(props) if props else None


def _remove(table: dict, fresh: set, key: Any) -> None:
    """Drop a row: not written at all when this batch made it."""
    if key in fresh:
        fresh.discard(key)
        del table[key]
    else:
        table[key] = DELETE


def _remove_once_written(table: dict, key: Any) -> None:
    """Drop a row of a table whose rows are written once, never replaced
    (message bodies, queue entries): one in the batch was made by it."""
    if key in table:
        del table[key]
    else:
        table[key] = DELETE


class Batch:
    """The rows of one commit: for each table, key -> row, or DELETE."""

    __slots__ = ("size", "messages", "retained", "sessions", "subscriptions", "queue",
                 "inflight", "awaiting", "wills", "fresh_inflight", "fresh_awaiting", "ended",
                 "acks", "waiters", "positions")

    def __init__(self) -> None:
        #: Changes recorded, folded or not: what triggers an early commit.
        self.size = 0
        self.messages: dict[int, tuple | None] = {}
        self.retained: dict[str, tuple | None] = {}
        self.sessions: dict[int, tuple] = {}
        self.subscriptions: dict[tuple[int, str], tuple | None] = {}
        self.queue: dict[tuple[int, int], tuple | None] = {}
        self.inflight: dict[tuple[int, int], tuple | None] = {}
        self.awaiting: dict[tuple[int, int], tuple | None] = {}
        self.wills: dict[str, tuple | None] = {}
        #: Keys of rows first made in this batch: removing one writes nothing.
        #: (Message bodies and queue entries need no such set: their keys are
        #: never used twice.)
        self.fresh_inflight: set[tuple[int, int]] = set()
        self.fresh_awaiting: set[tuple[int, int]] = set()
        #: Sessions whose rows all go, last.
        self.ended: list[int] = []
        #: (outbox, bytes) to write once the batch has committed, in order.
        self.acks: list[tuple[Any, bytes]] = []
        #: Futures to resolve once the batch has committed.
        self.waiters: list[Any] = []
        #: Positions reached in what feeds the core (a cluster's stream:
        #: the last message delivered), by name; written with the rows
        #: those deliveries made, never alone.
        self.positions: dict[str, int] = {}

    def __bool__(self) -> bool:
        """Whether there is anything to commit or to release."""
        return self.size > 0 or bool(self.acks) or bool(self.waiters)


class Journal:
    """Collects the core's changes into the open batch.

    ``on_first`` is called when a change lands in an empty batch (the store
    schedules a commit), ``on_full`` when the batch reaches ``batch_size``
    changes (the store commits as soon as it can).
    """

    __slots__ = ("batch", "batch_size", "on_first", "on_full", "committing", "changes",
                 "_to_wall", "_next_message", "_next_seq", "_next_sid")

    def __init__(self, loop_time: Callable[[], float], batch_size: int,
                 on_first: Callable[[], None], on_full: Callable[[], None],
                 next_message: int = 1, next_seq: int = 1, next_sid: int = 1) -> None:
        self.batch = Batch()
        self.batch_size = batch_size
        self.on_first = on_first
        self.on_full = on_full
        #: Whether a taken batch is being committed (set by the store).
        self.committing = False
        #: Changes recorded since the start: a mark to compare with.
        self.changes = 0
        # Expiry times are kept in loop time in memory and in wall-clock time
        # on disk, since the loop's clock starts again with each process.
        self._to_wall = time.time() - loop_time()
        self._next_message = next_message
        self._next_seq = next_seq
        self._next_sid = next_sid

    def unsettled(self) -> bool:
        """Whether anything recorded has not committed yet."""
        return self.batch.size > 0 or self.committing

    def take(self) -> Batch:
        """The open batch, to commit; a new one opens."""
        batch, self.batch = self.batch, Batch()
        return batch

    def _changed(self, batch: Batch) -> None:
        self.changes += 1
        size = batch.size = batch.size + 1
        if size == 1:
            self.on_first()
        elif size == self.batch_size:
            self.on_full()

    def wall(self, loop_time: float | None) -> float | None:
        return None if loop_time is None else loop_time + self._to_wall

    # ------------------------------------------------------- acknowledgements

    def hold(self, outbox: Any, data: bytes) -> None:
        """Write ``data`` into ``outbox`` (broker.outbox) after the open batch commits."""
        self.batch.acks.append((outbox, data))

    def position_reached(self, name: str, value: int) -> None:
        """Everything up to ``value`` of ``name`` (cluster.stream) has been
        delivered: what that changed is in this batch or an earlier one.
        Commits with the batch's changes, and starts no commit itself: a
        delivery that changed nothing durable needs none."""
        self.batch.positions[name] = value

    # ------------------------------------------------------- message bodies

    def _ref(self, batch: Batch, message: Message) -> int:
        message_id = message.store_id
        if not message_id:
            message_id = message.store_id = self._next_message
            self._next_message = message_id + 1
            props = message.properties
            expires_at = message.expires_at
            batch.messages[message_id] = (
                message_id, message.topic, message.payload, message.qos, message.retain,
                encode_properties(props) if props else None,
                None if expires_at is None else expires_at + self._to_wall)
        message.store_refs += 1
        return message_id

    def _unref(self, batch: Batch, message: Message) -> None:
        message.store_refs -= 1
        if message.store_refs <= 0:
            message_id = message.store_id
            message.store_id = message.store_refs = 0
            _remove_once_written(batch.messages, message_id)

    # ------------------------------------------------------- sessions

    def session_saved(self, session: Session) -> None:
        """Write the session's own row (made durable on first call)."""
        sid = session.store_id
        if not sid:
            sid = session.store_id = self._next_sid
            self._next_sid += 1
        client = session.client
        batch = self.batch
        batch.sessions[sid] = (
            sid, session.client_id, session.expiry_interval, self.wall(session.offline_since),
            client.username if client is not None else None,
            client_record(client) if client is not None else None)
        self._changed(batch)

    def session_deleted(self, session: Session) -> None:
        """Remove the session and everything it holds; it is not durable
        afterwards."""
        sid = session.store_id
        session.store_id = 0
        batch = self.batch
        batch.sessions.pop(sid, None)
        batch.ended.append(sid)
        if session.inflight:
            for entry in session.inflight.values():
                self._unref(batch, entry.message)
        if session.queue:
            for message, _, _, _, _, store_key in session.queue:
                if store_key:
                    self._unref(batch, message)
        self._changed(batch)

    def subscription_saved(self, session: Session, entry: SubscriptionEntry) -> None:
        options: Subscription = entry.options
        batch = self.batch
        batch.subscriptions[(session.store_id, options.filter)] = (
            session.store_id, options.filter, options.qos, int(options.no_local),
            int(options.retain_as_published), options.retain_handling, entry.identifier)
        self._changed(batch)

    def subscription_deleted(self, session: Session, topic_filter: str) -> None:
        batch = self.batch
        batch.subscriptions[(session.store_id, topic_filter)] = DELETE
        self._changed(batch)

    # ------------------------------------------------------- queue and in flight

    def queued(self, session: Session, message: Message, qos: int, retain: bool,
               ids: tuple[int, ...], share: str | None) -> int:
        """Record a message added to the session's queue; returns its key."""
        batch = self.batch
        seq = self._next_seq
        self._next_seq = seq + 1
        sid = session.store_id
        batch.queue[(sid, seq)] = (sid, seq, self._ref(batch, message), qos, int(retain),
                                   ",".join(map(str, ids)) if ids else None, share)
        self._changed(batch)
        return seq

    def unqueued(self, session: Session, seq: int, message: Message) -> None:
        batch = self.batch
        _remove_once_written(batch.queue, (session.store_id, seq))
        self._unref(batch, message)
        self._changed(batch)

    def inflight_saved(self, session: Session, packet_id: int, entry: Inflight,
                       new: bool) -> None:
        """Record a message sent and awaiting acknowledgement (``new``), or
        its QoS 2 release."""
        batch = self.batch
        key = (session.store_id, packet_id)
        if new:
            message_id = self._ref(batch, entry.message)
            if key not in batch.inflight:
                # Memory has no such packet id in flight and no batch left
                # one behind, so the disk has no such row either.
                batch.fresh_inflight.add(key)
        else:
            message_id = entry.message.store_id
        group = entry.group
        batch.inflight[key] = (session.store_id, packet_id, message_id, entry.qos,
                               int(entry.retain), encode_ids(entry.subscription_ids),
                               group.share_filter if group is not None else None,
                               int(entry.released))
        self._changed(batch)

    def inflight_deleted(self, session: Session, packet_id: int, entry: Inflight) -> None:
        batch = self.batch
        _remove(batch.inflight, batch.fresh_inflight, (session.store_id, packet_id))
        self._unref(batch, entry.message)
        self._changed(batch)

    def awaiting_saved(self, session: Session, packet_id: int,
                       stream_id: str | None = None) -> None:
        """An inbound QoS 2 message was accepted and awaits its PUBREL
        (``stream_id``: Session.awaiting_rel)."""
        batch = self.batch
        key = (session.store_id, packet_id)
        if key not in batch.awaiting:
            batch.fresh_awaiting.add(key)
        batch.awaiting[key] = (*key, stream_id)
        self._changed(batch)

    def awaiting_deleted(self, session: Session, packet_id: int) -> None:
        batch = self.batch
        _remove(batch.awaiting, batch.fresh_awaiting, (session.store_id, packet_id))
        self._changed(batch)

    # ------------------------------------------------------- wills

    def will_saved(self, client: ClientInfo, will: Will, due: float | None) -> None:
        """A client's will: while it is connected (``due`` None), so that a
        crash of the broker does not lose it, or held back until ``due``;
        with the client's facts, to authorize it as that client."""
        batch = self.batch
        batch.wills[client.client_id] = (
            client.client_id, client.username, will.topic, will.payload, will.qos,
            int(will.retain), _properties(will.properties), self.wall(due),
            client_record(client))
        self._changed(batch)

    def will_deleted(self, client_id: str) -> None:
        """The will was published or discarded."""
        batch = self.batch
        batch.wills[client_id] = DELETE
        self._changed(batch)

    # ------------------------------------------------------- retained

    def retained_saved(self, message: Message) -> None:
        batch = self.batch
        batch.retained[message.topic] = (
            message.topic, message.payload, message.qos, _properties(message.properties),
            self.wall(message.expires_at))
        self._changed(batch)

    def retained_deleted(self, topic: str) -> None:
        batch = self.batch
        batch.retained[topic] = DELETE
        self._changed(batch)
