"""In-process subscribers: an embedding application's own subscriber.

Design. The core delivers into a session's outbox and otherwise sees a
connection only as a ``Client`` (broker.ports). An in-process subscriber is
exactly that: a ``LocalSubscriber`` (the Client) with a session of its own
and a ``LocalOutbox`` whose "socket buffer" is a deque of the messages the
application has not taken yet. So routing, retained messages, shared
subscriptions, read authorization, the in-flight window, the session queue,
publisher flow control and the slow-subscriber rule are the core's own code,
unchanged, with no check added to the delivery path: the outbox is reached
through the same attribute and method calls as a network client's.

The other way considered was a real Connection on a memory transport (the
core cannot tell it from a network client at all). Measured on the sans-IO
harness (tests/sansio.py; one subscriber, 32-byte payloads, ten PUBLISH per
read, the publisher's own handling included; two runs on a busy two-core
machine), a message cost two to three times as much that way: 12 to 17
microseconds against 5.5 to 6.2 at QoS 0, and 20 to 23 against 8 to 10 at
QoS 1: each message is encoded into a PUBLISH and decoded again into a packet
object, and each PUBACK encoded, decoded and handled, for a subscriber in the
same process. Both look alike to the core; this one skips the wire.

Backpressure, as for a network client:
- the deque is bounded by ``limit`` as a transport by its write high-water
  mark: at ``limit`` the outbox pauses (the core then holds QoS 1/2 messages
  in the session queue and QoS 0 ones behind the publishers it holds back),
  and it resumes once the application has taken it down to a quarter;
- QoS 1/2 messages are acknowledged when the application takes them, so at
  most the in-flight window (``mqtt.max_inflight``, and not beyond
  ``limit``) is unacknowledged, and what follows waits in the session queue,
  whose high-water mark holds the publishers back
  (``mqtt.mqueue_high_watermark``) until the subscriber has been slow for
  ``mqtt.slow_subscriber_timeout``; then ``mqtt.max_mqueue_len`` applies and
  its oldest messages are dropped, counted as a network client's are;
- QoS 0 messages a slow in-process subscriber cannot take replace the oldest
  QoS 0 message it has not taken (a network client's written bytes cannot be
  taken back, so there the newest is the one dropped); counted the same.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from typing import Any, AsyncIterator, Callable, Mapping

import attrs

from .codec import MQTT_5, Subscription
from .outbox import Outbox, Outboxes
from .packet_types import PUBACK, PUBCOMP
from .ports import SUBSCRIBE_ACTION, ClientInfo, PeerInfo
from .properties import Reason
from .sessions import Session
from .shared import shared_inner, split_shared
from .topics import InvalidTopic, validate_filter

log = logging.getLogger("bastionmq.local")

#: The listener id in-process clients have (their ClientInfo.peer.listener):
#: what authorization hooks and ACL templates see for them.
LOCAL_LISTENER = "local"

#: Messages delivered to an in-process subscriber and not yet taken, at
#: most, by default (its write high-water mark, in messages).
DEFAULT_LIMIT = 1000


# Not frozen: a frozen attrs instance costs about 2.5 times as much to make
# (1.1 against 0.4 µs), and an on_message observer makes one per message routed.
@attrs.define(slots=True)
class LocalMessage:
    """A message as the application sees it: delivered to an in-process
    subscriber, or observed by an ``on_message`` hook."""

    topic: str
    payload: bytes
    #: The QoS it was delivered with (observed: published with).
    qos: int
    #: The RETAIN flag it was delivered with: set for a retained message sent
    #: on subscribing; for live messages only with retain as published, as
    #: for any subscriber ([MQTT-3.3.1-9]). Observed: as published.
    retain: bool
    #: MQTT 5 properties (user_property, content_type, correlation_data,
    #: response_topic, message_expiry_interval...); empty when none.
    properties: Mapping[str, Any] = attrs.field(factory=dict)
    #: Observed messages: the client id of the publisher, None when the
    #: broker published it (the embedding API, a will of a session gone).
    client_id: str | None = None


class SubscriptionClosed(Exception):
    """The in-process subscription has ended (unsubscribed, or the broker stopped)."""


class _NoTransport:
    """What a LocalOutbox's base writes to: nothing ever reaches it, since
    a LocalOutbox never enlists for a flush."""

    def write(self, data: bytes) -> None:
        pass


_NO_TRANSPORT = _NoTransport()


class LocalOutbox(Outbox):
    """The outbox of an in-process subscriber: messages, not bytes."""

    __slots__ = ("pending", "limit", "waiter")

    def __init__(self, outboxes: Outboxes, send_window: int, limit: int) -> None:
        super().__init__(_NO_TRANSPORT, outboxes, send_window)
        self.version = MQTT_5
        #: (message, QoS, RETAIN flag, packet id) delivered, not yet taken.
        self.pending: deque[tuple[Any, int, bool, int]] = deque()
        self.limit = limit
        #: The future the application waits on while ``pending`` is empty.
        self.waiter: asyncio.Future | None = None

    def write(self, data: bytes) -> None:
        pass  # control packets (acknowledgements): an in-process client reads none

    def queue_publish(self, message: Any, qos: int, retain: bool,
                      subscription_ids: tuple[int, ...], packet_id: int = 0,
                      dup: bool = False) -> bool:
        pending = self.pending
        pending.append((message, qos, retain, packet_id))
        stats = self.outboxes.stats
        if qos:
            stats.sent_qos12[qos] += 1
        else:
            stats.sent_qos0 += 1
        if len(pending) >= self.limit:
            self.paused = True  # as a transport at its write high-water mark
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return True

    def displace(self, message: Any, retain: bool, subscription_ids: tuple[int, ...]) -> None:
        # Unlike bytes written to a socket, a message not yet taken can be
        # dropped: the oldest QoS 0 one makes room for the new one. In-flight
        # QoS 1/2 ones stay (they are the session's until acknowledged).
        pending = self.pending
        for index, (_, qos, _, _) in enumerate(pending):
            if not qos:
                del pending[index]
                pending.append((message, 0, retain, 0))
                return


class LocalSubscriber:
    """The broker side of an in-process subscription: a ``Client`` of the
    core (broker.ports) with a session of its own, never a publisher."""

    def __init__(self, core: Any, client_id: str, username: str | None, trusted: bool,
                 limit: int) -> None:
        if limit < 1:
            raise ValueError(f"queue size {limit} must be at least 1")
        self.core = core
        self.client_id = client_id
        self.peer = PeerInfo(listener=LOCAL_LISTENER)
        #: A trusted subscriber is a superuser: the authorization chain (and
        #: its hooks) is not asked about it, as for any superuser.
        self.client_info = ClientInfo(client_id=client_id, username=username, peer=self.peer,
                                      superuser=trusted)
        self.access_cache: dict | None = None
        self.will_stored = False
        self.closed = False
        #: Why it closed when authorization refused it after a wait: what
        #: ``get`` raises then.
        self.refusal: PermissionError | None = None
        #: Called with this subscriber once it has closed (its owner forgets it).
        self.on_close: Callable[[LocalSubscriber], Any] | None = None
        self.outbox = LocalOutbox(core.outboxes, min(core.settings.max_inflight, limit), limit)
        session = self.session = Session(client_id)
        session.connection = self
        session.outbox = self.outbox
        session.client = self.client_info
        # Not in core.sessions (its client id is no network client's to take
        # over) nor in core.connections (it is not a connection operators
        # see or kick); the application's Broker keeps it.

    def __repr__(self) -> str:
        return f"<LocalSubscriber {self.client_id}>"

    @property
    def version(self) -> int:
        return MQTT_5

    # ------------------------------------------------------- Client

    def hold(self) -> None:
        pass  # never a publisher: the embedding API publishes with no sender

    def release(self) -> None:
        pass

    def close(self, reason: int = Reason.SUCCESS, message: str = "",
              send_disconnect: bool = True, publish_will: bool = True,
              linger: bool = True) -> None:
        """Unsubscribe: the publishers it held back go on, the shared
        subscription messages it had not taken go to other members, and its
        session ends."""
        if self.closed:
            return
        self.closed = True
        core = self.core
        core.end_connection(self, None)
        core.outboxes.flush()
        waiter, self.outbox.waiter = self.outbox.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    # ------------------------------------------------------- application side

    def subscribe(self, topic_filter: str, qos: int) -> None:
        """Subscribe as a client's SUBSCRIBE would: the filter checked, read
        authorization asked unless trusted, retained messages delivered."""
        core = self.core
        settings = core.settings
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        try:
            shared = split_shared(topic_filter)
            validate_filter(shared[1] if shared else topic_filter, settings.max_topic_levels)
        except InvalidTopic as exc:
            raise ValueError(f"invalid topic filter {topic_filter[:100]!r}: {exc}") from None
        if shared and not settings.shared_subscription:
            raise ValueError("shared subscriptions are turned off (mqtt.shared_subscription)")
        if not settings.wildcard_subscription and ("+" in topic_filter or "#" in topic_filter):
            raise ValueError("wildcard subscriptions are turned off (mqtt.wildcard_subscription)")
        access = core.access
        if access is not None:
            allowed = access.permits(self.client_info, None, SUBSCRIBE_ACTION,
                                     shared_inner(topic_filter), qos)
            if allowed is False:
                core.stats.subscribe_denied += 1
                raise PermissionError(f"not authorized to subscribe to {topic_filter[:100]!r}")
            if allowed is not True:  # decided later: subscribed then, or refused
                allowed.then(lambda allowed: self._decided(topic_filter, qos, allowed))
                return
        self._subscribe(topic_filter, qos)

    def _decided(self, topic_filter: str, qos: int, allowed: bool) -> None:
        if self.closed:
            return
        if allowed:
            self._subscribe(topic_filter, qos)
        else:
            self.core.stats.subscribe_denied += 1
            self.refusal = PermissionError(f"not authorized to subscribe to {topic_filter[:100]!r}")
            self.close()

    def _subscribe(self, topic_filter: str, qos: int) -> None:
        core = self.core
        options = Subscription(topic_filter, min(qos, core.settings.max_qos_allowed))
        existed = core.subscribe(self.session, options, None)
        core.send_retained(self.session, options, None, existed)
        core.outboxes.flush()

    def take(self) -> LocalMessage | None:
        """The next message, acknowledged; None when none is waiting."""
        if self.closed:
            return None  # what was not taken went with the session
        outbox = self.outbox
        pending = outbox.pending
        core = self.core
        while pending:
            message, qos, retain, packet_id = pending.popleft()
            if qos:
                session = self.session
                if qos == 2:
                    # In-process, PUBREC and PUBCOMP are one step.
                    entry = session.inflight.get(packet_id) if session.inflight else None
                    if entry is not None:
                        entry.released = True
                core.acknowledge(session, packet_id, PUBACK if qos == 1 else PUBCOMP)
            if outbox.paused and len(pending) <= outbox.limit // 4:
                # As a transport's resume_writing at its low-water mark.
                outbox.paused = False
                core.drain(self.session)
            core.outboxes.flush()  # what the release of publishers wrote
            if message.expired(core.loop.time()):
                core.stats.dropped_expired += 1
                continue
            props = message.properties
            return LocalMessage(message.topic, message.payload, qos, retain,
                                dict(props) if props else {})
        return None

    async def get(self) -> LocalMessage:
        """Wait for the next message; SubscriptionClosed once unsubscribed."""
        outbox = self.outbox
        while True:
            message = self.take()
            if message is not None:
                return message
            if self.closed:
                if self.refusal is not None:
                    raise self.refusal
                raise SubscriptionClosed(f"subscription {self.client_id} has ended")
            waiter = outbox.waiter = self.core.loop.create_future()
            await waiter


def _close_soon(loop: asyncio.AbstractEventLoop, subscriber: LocalSubscriber) -> None:
    try:
        loop.call_soon_threadsafe(subscriber.close)
    except RuntimeError:
        pass  # the loop is closed: the broker, and the subscription, are gone


class LocalSubscription:
    """What ``Broker.subscribe`` returns: subscribed from the start, an async
    iterator and an async context manager. Ending an iteration (a break, an
    exception) or leaving the ``async with`` block unsubscribes, and so does
    dropping the last reference to it."""

    def __init__(self, subscriber: LocalSubscriber) -> None:
        self._subscriber = subscriber
        loop = subscriber.core.loop
        # A subscription the application forgot must not stay in the trie.
        # Scheduled, never run from the collector: that may run inside the core.
        self._finalizer = weakref.finalize(self, _close_soon, loop, subscriber)
        self._finalizer.atexit = False

    @property
    def client_id(self) -> str:
        """The client id it routes as (its shared-subscription member name)."""
        return self._subscriber.client_id

    @property
    def closed(self) -> bool:
        return self._subscriber.closed

    @property
    def waiting(self) -> int:
        """Messages delivered and not yet taken."""
        return len(self._subscriber.outbox.pending)

    async def get(self) -> LocalMessage:
        """The next message (a QoS 1/2 one is acknowledged now);
        SubscriptionClosed when the subscription has ended."""
        return await self._subscriber.get()

    def get_nowait(self) -> LocalMessage | None:
        """The next message if one is waiting, else None."""
        return self._subscriber.take()

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        self._finalizer.detach()
        self._subscriber.close()

    def __aiter__(self) -> AsyncIterator[LocalMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[LocalMessage]:
        try:
            while True:
                try:
                    message = await self._subscriber.get()
                except SubscriptionClosed:
                    return
                yield message
        finally:
            # A break leaves this generator to the collector, whose asyncio
            # hook closes it at the loop's next turn: this runs then.
            self.close()

    async def __aenter__(self) -> LocalSubscription:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()
