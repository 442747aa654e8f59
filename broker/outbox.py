"""What the broker sends one client: its outbox.

The core delivers into a session's ``Outbox`` and never touches a socket. An
outbox appends bytes to its buffer and enlists itself with the broker's
``Outboxes``, whose ``flush`` writes each enlisted outbox once, at the end of
a read pass or of whatever else entered the core (a timer, the embedding
API): a broker pays per read, not per packet. The outbox also holds what
limits the writing to its client: the transport's pause, the send window,
the client's Maximum Packet Size, outbound topic aliases, and the
acknowledgements that wait for the durable store.

Only ``transport.write`` is called, so a list-backed transport is enough to
test an outbox.
"""

from __future__ import annotations

from typing import Any, Callable

from .codec import MQTT_5, Connack, Disconnect, Packet, Suback, encode
from .message import Message
from .stats import Stats, Traffic

#: First bytes of the acknowledgements (3.4-3.7; PUBREL has flag bits 0010).
PUBACK_BYTE, PUBREC_BYTE, PUBREL_BYTE, PUBCOMP_BYTE = 0x40, 0x50, 0x62, 0x70

#: Characters of an explanation sent as a Reason String, at most.
MAX_REASON_STRING = 200


class Outboxes:
    """What the outboxes of one broker share: the list of those with bytes
    waiting, the counters, the clock, and the durable store's journal."""

    __slots__ = ("dirty", "stats", "clock", "journal", "before", "gate")

    def __init__(self, stats: Stats, clock: Callable[[], float]) -> None:
        #: Outboxes with bytes waiting for the next flush.
        self.dirty: list[Outbox] = []
        self.stats = stats
        self.clock = clock
        #: The durable store's journal (store.Journal), or None: memory only.
        self.journal: Any = None
        #: Called before the outboxes are written (a cluster's bus writes
        #: what it has for NATS first when it holds a QoS 1 or 2 message,
        #: so that the message is on its way before its PUBACK), or None.
        self.before: Callable[[], None] | None = None
        #: Where acknowledgements wait for a cluster's stream to store the
        #: message they answer (cluster.stream.MessageStream), or None.
        self.gate: Any = None

    def flush(self) -> None:
        dirty = self.dirty
        if not dirty:
            return
        before = self.before
        if before is not None:
            before()
        for outbox in dirty:
            buffer = outbox.buffer
            if buffer:
                # One buffer per flush: the transport then queues one object
                # however many packets it holds, which stays cheap when a slow
                # socket makes it hold the data (joining costs one memcpy).
                data = b"".join(buffer) if len(buffer) > 1 else buffer[0]
                outbox.traffic.sent += len(data)
                outbox.transport.write(data)
                buffer.clear()
        dirty.clear()

    def release_acks(self, acks: list[tuple[Outbox, bytes]]) -> None:
        """Write the acknowledgements a committed batch of the durable store
        held back, in their order."""
        for outbox, data in acks:
            outbox.release_held(data)
        self.flush()


class Outbox:
    __slots__ = (
        "transport", "outboxes", "buffer", "version", "paused", "send_window",
        "max_packet_size", "aliases", "alias_max", "acks_held", "mark", "closed", "traffic",
    )

    def __init__(self, transport: Any, outboxes: Outboxes, send_window: int,
                 traffic: Traffic | None = None) -> None:
        """An outbox writing to ``transport``; the bytes written count in
        ``traffic``, its listener's (by default those of no listener, "")."""
        self.transport = transport
        self.outboxes = outboxes
        self.traffic = traffic if traffic is not None else outboxes.stats.traffic_of("")
        self.buffer: list[bytes] = []
        #: The client's protocol level, once its CONNECT has been read.
        self.version = 0
        #: The transport is over its write high-water mark.
        self.paused = False
        #: QoS 1/2 messages the client takes in flight (its Receive Maximum).
        self.send_window = send_window
        #: The client's Maximum Packet Size; 0 when it set none.
        self.max_packet_size = 0
        #: Outbound topic aliases (topic -> alias) when the 5.0 client accepts
        #: them; None otherwise, which keeps the shared wire forms in use.
        self.aliases: dict[str, int] | None = None
        self.alias_max = 0
        #: Acknowledgements waiting for the durable store to commit.
        self.acks_held = 0
        #: The journal's change count when the packet being answered arrived
        #: (see write_stored); the connection sets it per packet.
        self.mark = -1
        #: The connection has closed: held acknowledgements are not written.
        self.closed = False

    def write(self, data: bytes) -> None:
        """Queue one packet other than PUBLISH, encoded (send_publish queues those)."""
        self.outboxes.stats.control_packets_sent += 1
        buffer = self.buffer
        if not buffer:
            self.outboxes.dirty.append(self)
        buffer.append(data)

    def send(self, packet: Packet) -> None:
        self.write(encode(packet, self.version))

    def send_explained(self, packet: Connack | Suback | Disconnect, why: str) -> None:
        """Send a CONNACK, SUBACK or DISCONNECT with ``why`` as its 5.0 Reason
        String, unless that would exceed the client's Maximum Packet Size
        ([MQTT-3.2.2-19], [MQTT-3.14.2-3])."""
        self.write(self.explained(packet, why))

    def explained(self, packet: Connack | Suback | Disconnect, why: str) -> bytes:
        """``packet`` encoded, with ``why`` as its Reason String where it fits."""
        data = encode(packet, self.version)
        if why and self.version == MQTT_5:
            packet.properties = {**packet.properties, "reason_string": why[:MAX_REASON_STRING]}
            explained = encode(packet, self.version)
            if not self.max_packet_size or len(explained) <= self.max_packet_size:
                data = explained
        return data

    def write_stored(self, data: bytes, after_commit: bool = False,
                     stored: Any = None) -> None:
        """Write an answer that tells the client something is kept.

        With a durable store it waits for the commit of what handling the
        current packet recorded (or, with ``after_commit``, of anything not yet
        committed, for a promise an earlier packet made), and never goes
        ahead of an earlier held answer ([MQTT-4.6.0-2]: acknowledgements
        keep the order of the packets they answer). What changed nothing
        durable (a QoS 1 message no persistent session takes) goes at once.

        In a cluster, ``stored`` is what the stream is storing (the answered
        message, sent to the other nodes): the answer waits for it, then for
        the commit; while an answer waits there, later ones queue behind it.
        """
        gate = self.outboxes.gate
        if gate is not None and (stored is not None or (self.acks_held and gate.holds_for(self))):
            gate.hold_ack(self, data, stored)
            return
        journal = self.outboxes.journal
        if journal is not None and (self.acks_held or journal.changes != self.mark
                                    or (after_commit and journal.unsettled())):
            self.acks_held += 1
            journal.hold(self, data)
        else:
            self.write(data)

    def release_held(self, data: bytes) -> None:
        """Write an answer the durable store held back until its commit."""
        self.acks_held -= 1
        if not self.closed:
            self.write(data)

    def _ack(self, first: int, packet_id: int, reason: int, after_commit: bool,
             stored: Any = None) -> None:
        """The two-byte short form, or with its reason code for a 5.0 client
        (3.4.2.1); ``after_commit`` waits for anything not yet committed."""
        if reason and self.version == MQTT_5:
            data = bytes((first, 3)) + packet_id.to_bytes(2, "big") + bytes((reason,))
        else:
            data = bytes((first, 2)) + packet_id.to_bytes(2, "big")
        self.write_stored(data, after_commit, stored)

    def puback(self, packet_id: int, reason: int = 0, after_commit: bool = False,
               stored: Any = None) -> None:
        self._ack(PUBACK_BYTE, packet_id, reason, after_commit, stored)

    def pubrec(self, packet_id: int, reason: int = 0, after_commit: bool = False,
               stored: Any = None) -> None:
        self._ack(PUBREC_BYTE, packet_id, reason, after_commit, stored)

    def pubrel(self, packet_id: int, reason: int = 0, after_commit: bool = False) -> None:
        self._ack(PUBREL_BYTE, packet_id, reason, after_commit)

    def pubcomp(self, packet_id: int, reason: int = 0, after_commit: bool = False) -> None:
        self._ack(PUBCOMP_BYTE, packet_id, reason, after_commit)

    def send_publish(self, message: Message, qos: int, retain: bool,
                     subscription_ids: tuple[int, ...], packet_id: int = 0,
                     dup: bool = False) -> bool:
        """Queue a PUBLISH for writing; False when the client's limit forbids it."""
        if self.queue_publish(message, qos, retain, subscription_ids, packet_id, dup):
            self.outboxes.stats.publish_bytes_sent += len(message.payload)
            return True
        return False

    def displace(self, message: Message, retain: bool, subscription_ids: tuple[int, ...]) -> None:
        """A QoS 0 ``message`` the core drops because this client is slow
        (counted by the core): bytes already written cannot be taken back,
        so the new message is the one lost. An in-process subscriber's
        outbox (broker.local) drops its oldest instead."""

    def queue_publish(self, message: Message, qos: int, retain: bool,
                      subscription_ids: tuple[int, ...], packet_id: int = 0,
                      dup: bool = False) -> bool:
        """send_publish without counting the payload's bytes, for the hot
        paths, which count them once per message (BrokerCore.route) or
        where they count anyway (BrokerCore._send_inflight)."""
        outboxes = self.outboxes
        now = outboxes.clock() if message.expires_at is not None else 0.0
        aliases = self.aliases
        alias = 0
        if aliases is not None:
            alias = aliases.get(message.topic, 0)
            new_alias = not alias and len(aliases) < self.alias_max
            if new_alias:
                alias = len(aliases) + 1
            head, tail = message.wire_form(True, qos, retain, subscription_ids, now,
                                           alias, with_topic=not alias or new_alias)
        else:
            head, tail = message.wire_form(
                self.version == MQTT_5, qos, retain, subscription_ids, now)
        if self.max_packet_size and len(head) + len(tail) + (2 if qos else 0) > self.max_packet_size:
            # [MQTT-3.1.2-25]: discard what the client said it cannot take.
            outboxes.stats.dropped_too_large += 1
            return False
        if aliases is not None and new_alias:  # new_alias is set only when aliases is
            # Set up only by a packet the client receives (3.3.2.3.4).
            aliases[message.topic] = alias
        buffer = self.buffer
        if not buffer:
            outboxes.dirty.append(self)
        stats = outboxes.stats
        if dup:
            head = bytes((head[0] | 0x08,)) + head[1:]
        if qos:
            stats.sent_qos12[qos] += 1
            buffer.append(head)
            buffer.append(packet_id.to_bytes(2, "big"))
            if tail:
                buffer.append(tail)
        else:
            stats.sent_qos0 += 1
            buffer.append(head)
        return True
