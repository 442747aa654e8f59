"""The broker's counters: what it received, sent, dropped and refused ($SYS
publishes them, the operations listener exports them).

Everything here is a plain integer (or a list of them) that the hot path
adds to; sums, rates and Prometheus' forms are made when they are read.
"""

from __future__ import annotations

from bisect import bisect_left

import attrs


@attrs.define(slots=True)
class Traffic:
    """Bytes of MQTT the connections of one listener received and were sent
    (after TLS and WebSocket framing are taken off). Each connection holds
    its listener's: counting is one addition, and nothing is folded when a
    connection closes."""

    received: int = 0
    sent: int = 0


@attrs.define(slots=True)
class Buckets:
    """A histogram as plain counts: ``counts[i]`` observations of at most
    ``bounds[i]`` (and more than the bound before), the last one those above
    every bound; ``total`` is their sum. Prometheus' cumulative form is made
    when it is read (ops.metrics)."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field()
    total: float = 0.0

    @counts.default
    def _no_counts(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


@attrs.define(slots=True)
class Stats:
    """Counters an operator needs to see what the broker did, dropped or refused."""

    connections_refused: int = 0
    protocol_errors: int = 0
    #: PUBLISH packets received from clients, by QoS (the index).
    received_by_qos: list[int] = attrs.field(factory=lambda: [0, 0, 0])
    #: PUBLISH packets sent to clients: QoS 0, the commonest delivery, apart
    #: (one attribute to add to), and QoS 1 and 2 by their index (0 unused);
    #: ``sent_by_qos`` puts them together. ``messages_received`` and
    #: ``messages_sent`` are the sums.
    sent_qos0: int = 0
    sent_qos12: list[int] = attrs.field(factory=lambda: [0, 0, 0])
    #: Payload bytes of those PUBLISH packets (Mosquitto's publish/bytes).
    publish_bytes_received: int = 0
    publish_bytes_sent: int = 0
    #: MQTT packets of every type received (counted per read) and sent other
    #: than PUBLISH (Mosquitto's messages/received and messages/sent count
    #: every packet).
    packets_received: int = 0
    control_packets_sent: int = 0
    #: Bytes by listener id (see Traffic); ``bytes_received`` and
    #: ``bytes_sent`` are their sums.
    traffic: dict[str, Traffic] = attrs.field(factory=dict)
    #: Network connections accepted by the listeners (before max_connections
    #: and TLS), and CONNECT packets handled (Mosquitto's load/sockets and
    #: load/connections).
    sockets_opened: int = 0
    connects_received: int = 0
    #: Sessions ended because their expiry interval ran out while offline.
    clients_expired: int = 0
    #: The most sessions (connected or not) held at once.
    clients_maximum: int = 0
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
    #: Connected clients that went, by Connection.disconnect_cause.
    disconnects: dict[str, int] = attrs.field(factory=dict)

    @property
    def messages_received(self) -> int:
        return sum(self.received_by_qos)

    @property
    def sent_by_qos(self) -> list[int]:
        return [self.sent_qos0, self.sent_qos12[1], self.sent_qos12[2]]

    @property
    def messages_sent(self) -> int:
        return sum(self.sent_by_qos)

    @property
    def packets_sent(self) -> int:
        return self.control_packets_sent + self.messages_sent

    @property
    def bytes_received(self) -> int:
        return sum(traffic.received for traffic in self.traffic.values())

    @property
    def bytes_sent(self) -> int:
        return sum(traffic.sent for traffic in self.traffic.values())

    @property
    def messages_dropped(self) -> int:
        return (self.dropped_qos0_backpressure + self.dropped_queue_full
                + self.dropped_too_large + self.dropped_expired)

    def traffic_of(self, listener: str) -> Traffic:
        """The byte counters of the listener with id ``listener``."""
        traffic = self.traffic.get(listener)
        if traffic is None:
            traffic = self.traffic[listener] = Traffic()
        return traffic
