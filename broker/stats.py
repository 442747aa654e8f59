"""The broker's counters: what it received, sent, dropped and refused ($SYS
publishes them)."""

from __future__ import annotations

import attrs


@attrs.define(slots=True)
class Stats:
    """Counters an operator needs to see what the broker dropped or refused."""

    connections_refused: int = 0
    protocol_errors: int = 0
    #: PUBLISH packets received from clients, and sent to them.
    messages_received: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    #: QoS 0 messages not written because the subscriber was over its high-water mark.
    dropped_qos0_backpressure: int = 0
    #: Messages pushed out of a full session queue (the oldest goes).
    dropped_queue_full: int = 0
    #: Messages larger than the subscriber's Maximum Packet Size.
    dropped_too_large: int = 0
    #: Messages whose Message Expiry Interval ran out before delivery.
    dropped_expired: int = 0
    #: PUBLISH and SUBSCRIBE requests the authorization chain denied.
    publish_denied: int = 0
    subscribe_denied: int = 0
    #: Subscribers left out of a topic's routes because their client may not
    #: read it (counted once per subscriber and topic, when the routes are made).
    read_denied: int = 0
    #: Publisher flow control: how often a publisher was held back, for how
    #: long in all, and how often a subscriber was declared slow.
    publisher_pauses: int = 0
    publisher_paused_seconds: float = 0.0
    slow_subscribers: int = 0
    #: CONNACKs sent, by 5.0 reason code (a 3.1.1 client's return code is
    #: counted by the reason it stands for); 0 is success.
    connacks: dict[int, int] = attrs.field(factory=dict)
