"""Session state: subscriptions, messages in flight, the offline queue.

A session outlives its connection when its expiry interval says so; while it
has no connection, messages for it wait in its queue. The containers are made
on first use because most connections never need most of them, and an idle
connection should cost little memory.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from .codec import Subscription
from .message import Message

#: Session Expiry Interval meaning "never" ([MQTT-3.1.2-23] 0xFFFFFFFF).
NEVER_EXPIRES = 0xFFFFFFFF


@attrs.define(slots=True, frozen=True)
class SubscriptionEntry:
    """A session's subscription as the trie stores it."""

    options: Subscription
    #: 5.0 Subscription Identifier, if the SUBSCRIBE carried one.
    identifier: int | None = None


@attrs.define(slots=True, eq=False)
class Inflight:
    """A QoS 1/2 message sent to the client and not yet fully acknowledged."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...]
    #: The shared subscription group it was sent through, if any: another
    #: member gets it should this session go before acknowledging it.
    group: Any = None
    #: QoS 2: PUBREC arrived and PUBREL was sent; only PUBCOMP is awaited.
    released: bool = False


#: A message waiting in a session's queue: (message, QoS, the RETAIN flag
#: it is to be sent with, subscription ids, the shared subscription group it
#: came through or None, the entry's key in the durable store or 0). Read by
#: unpacking it whole, never by index. A plain tuple, not a NamedTuple: one
#: is made for each message queued and unpacked on its way out, and a tuple
#: subclass costs several times as much to make and to unpack (CPython
#: specialises both for exact tuples only).
QueuedMessage = tuple[Message, int, bool, tuple[int, ...], Any, int]


@attrs.define(slots=True, eq=False)
class Session:
    client_id: str
    #: Seconds the session outlives its connection; 0 ends it with the connection.
    expiry_interval: int = 0
    subscriptions: dict[str, SubscriptionEntry] = attrs.field(factory=dict)
    inflight: dict[int, Inflight] | None = None
    queue: deque[QueuedMessage] | None = None
    #: Packet ids of inbound QoS 2 messages waiting for PUBREL, each with
    #: the id its message was stored under in a cluster's stream (None
    #: without one): a resend after a crash is stored under it again.
    awaiting_rel: dict[int, str | None] | None = None
    next_packet_id: int = 1
    #: How many of ``subscriptions`` are shared ($share/...).
    shared_count: int = 0
    #: The live connection (a ports.Client) and its outbox, or None while
    #: the session waits offline.
    connection: Any = None
    outbox: Any = None
    expiry_handle: Any = None
    #: Who the session's client is (a ClientInfo), for authorizing its will.
    client: Any = None
    #: The identity the session belongs to (broker.ownership.owner_of); None
    #: when only the username of ``client`` is known (an old store's session).
    owner: str | None = None
    #: A will held back by its Will Delay Interval, and the timer that sends it.
    pending_will: Any = None
    will_handle: Any = None
    #: Loop time at which the held-back will is due.
    will_due: float | None = None
    #: Loop time at which the session lost its connection (None while connected).
    offline_since: float | None = None
    #: Its row in the durable store; 0 when the session is not durable.
    store_id: int = 0
    #: Publisher flow control (BrokerCore.hold_back): the connections this
    #: session holds back while it is over its high-water mark, the timer
    #: that declares it slow, and whether it is (then it holds nobody back
    #: and its queue bound applies) until it has drained.
    waiters: set | None = None
    slow_handle: Any = None
    slow: bool = False

    def allocate_packet_id(self) -> int:
        inflight = self.inflight
        if inflight is None:
            inflight = self.inflight = {}
        if len(inflight) >= 65535:
            raise RuntimeError("no free packet identifier")
        packet_id = self.next_packet_id
        while packet_id in inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        return packet_id

    def enqueue(self, item: QueuedMessage, max_len: int) -> QueuedMessage | None:
        """Queue a message; when full, the oldest is dropped (EMQX's mqueue
        rule) and returned."""
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        dropped = None
        if max_len and len(queue) >= max_len:
            dropped = queue.popleft()
        queue.append(item)
        return dropped

    def inflight_count(self) -> int:
        return len(self.inflight) if self.inflight else 0
