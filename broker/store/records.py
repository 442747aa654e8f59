"""What the durable store hands the core at start-up: the state to restore."""

from __future__ import annotations

import attrs

from ..codec import Subscription, Will
from ..message import Message


@attrs.define(slots=True, eq=False)
class StoredSession:
    sid: int
    client_id: str
    expiry: int
    #: Wall-clock time the session lost its connection; None if it was
    #: connected when the broker stopped (it counts as lost at start-up).
    disconnected_at: float | None
    username: str | None
    #: Its client's facts (broker.ownership.client_record); None when the
    #: store was written before they were kept.
    client: str | None
    subscriptions: list[tuple[Subscription, int | None]] = attrs.field(factory=list)
    #: (packet id, message, QoS, retain, subscription ids, $share filter or None, released).
    inflight: list[tuple[int, Message, int, bool, tuple[int, ...], str | None, bool]] = \
        attrs.field(factory=list)
    #: (key, message, QoS, retain, subscription ids, $share filter or None), in order.
    queue: list[tuple[int, Message, int, bool, tuple[int, ...], str | None]] = \
        attrs.field(factory=list)
    #: Inbound QoS 2 messages awaiting PUBREL: (packet id, the id of its
    #: message in a cluster's stream or None).
    awaiting_rel: list[tuple[int, str | None]] = attrs.field(factory=list)


@attrs.define(slots=True, eq=False)
class StoredWill:
    """The will of a client that was connected when the broker stopped, or
    one held back by its Will Delay Interval."""

    client_id: str
    username: str | None
    will: Will
    #: Wall-clock time a held-back will is due; None if its client was
    #: connected (its connection ended with the broker).
    due: float | None
    #: Its client's facts, as StoredSession.client.
    client: str | None = None


@attrs.define(slots=True)
class Snapshot:
    """Everything durable, with message expiry times in the loop's clock."""

    sessions: list[StoredSession] = attrs.field(factory=list)
    retained: list[Message] = attrs.field(factory=list)
    wills: list[StoredWill] = attrs.field(factory=list)
    #: Distinct message bodies the sessions hold.
    messages: int = 0
    #: Positions reached in what fed the core (Journal.position_reached).
    positions: dict[str, int] = attrs.field(factory=dict)


@attrs.define(slots=True)
class RestoreReport:
    """What start-up restored, and what had expired while the broker was down."""

    sessions: int = 0
    subscriptions: int = 0
    queued: int = 0
    inflight: int = 0
    awaiting_rel: int = 0
    retained: int = 0
    expired_sessions: int = 0
    expired_messages: int = 0
    wills_published: int = 0
