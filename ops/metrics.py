"""The broker's figures in Prometheus' form (``bastionmq_*``).

Nothing is counted for Prometheus on the hot path: the core, the listeners,
the chains and the store keep plain integers (histograms as lists of bucket
counts, broker.stats.Buckets), and this collector reads them when Prometheus
scrapes. Counters that only grow are counters; what can go down
(connections, sessions, queues) are gauges.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bastionmq.broker.core import BrokerCore
from bastionmq.broker.properties import reason_name
from bastionmq.broker.stats import Buckets, Stats

#: Stats counters by metric name, with their help text. The drop reasons
#: are one metric with a label.
_COUNTERS = (
    ("connections_refused", "connections_refused", "CONNECT packets refused."),
    ("protocol_errors", "protocol_errors", "Connections closed for a protocol violation."),
    ("publisher_pauses", "publisher_pauses",
     "Times a publisher was held back by a subscriber over its high-water mark."),
    ("publisher_paused_seconds", "publisher_paused_seconds",
     "Time publishers spent held back."),
    ("slow_subscribers", "slow_subscribers",
     "Subscribers that held their publishers back for the whole slow_subscriber_timeout."),
)
_DROPS = (
    ("qos0_backpressure", "dropped_qos0_backpressure"),
    ("queue_full", "dropped_queue_full"),
    ("too_large", "dropped_too_large"),
    ("expired", "dropped_expired"),
)
_DENIALS = (
    ("publish", "publish_denied"),
    ("subscribe", "subscribe_denied"),
    ("read", "read_denied"),
)


#: What an authentication decision counted by no source of the stats (an
#: older caller adding to ``denied`` or ``allowed`` alone) is shown as.
OTHER_SOURCE = "other"


def histogram_buckets(buckets: Buckets) -> list[tuple[str, float]]:
    """Prometheus' cumulative buckets (``le``, count) of ``buckets``, +Inf last."""
    cumulative = 0
    result: list[tuple[str, float]] = []
    for bound, count in zip((*buckets.bounds, math.inf), buckets.counts):
        cumulative += count
        result.append((floatToGoString(bound), cumulative))
    return result


class BrokerCollector(Collector):
    """Reads a running broker at each scrape. ``broker`` is the embedding
    API's Broker (its core, listeners and authentication stats)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        broker = self.broker
        core: BrokerCore | None = broker.core
        if core is None:
            return  # not started, or stopped
        stats = core.stats
        yield from self._traffic(stats, broker.listeners)
        for name, field, text in _COUNTERS:
            yield CounterMetricFamily(f"bastionmq_{name}", text, value=getattr(stats, field))
        dropped = CounterMetricFamily("bastionmq_messages_dropped",
                                      "Messages not delivered, by reason.", labels=["reason"])
        for reason, field in _DROPS:
            dropped.add_metric([reason], getattr(stats, field))
        yield dropped
        denied = CounterMetricFamily("bastionmq_authorization_denied",
                                     "Requests the authorization chain denied, by action.",
                                     labels=["action"])
        for action, field in _DENIALS:
            denied.add_metric([action], getattr(stats, field))
        yield denied
        connacks = CounterMetricFamily("bastionmq_connack", "CONNACKs sent, by reason.",
                                       labels=["reason"])
        for code, count in sorted(stats.connacks.items()):
            connacks.add_metric([reason_name(code)], count)
        yield connacks
        disconnects = CounterMetricFamily(
            "bastionmq_disconnects", "Connected clients that went, by reason: the reason "
            "code the server closed with, client disconnect or connection lost.",
            labels=["reason"])
        for cause, count in sorted(stats.disconnects.items()):
            disconnects.add_metric([cause], count)
        yield disconnects
        yield from self._authentication(broker.authn_stats)
        if core.access is not None:
            yield self._authorization(core.access)
        yield from self._listeners(broker.listeners)
        yield from self._sessions(core)
        store = broker.store
        if store is not None:
            yield from self._store(store)
        bus = getattr(broker, "bus", None)
        if bus is not None:
            yield from self._cluster(bus)

    def _cluster(self, bus: Any) -> Iterator[Metric]:
        stats = bus.stats
        messages = CounterMetricFamily(
            "bastionmq_cluster_messages", "Messages between this node and the others, by "
            "direction: forwarded (published here, sent to NATS), received (from another "
            "node, delivered here).", labels=["direction"])
        messages.add_metric(["forwarded"], stats.forwarded)
        messages.add_metric(["received"], stats.received)
        yield messages
        sessions = CounterMetricFamily(
            "bastionmq_cluster_sessions_moved", "Persistent sessions that moved with their "
            "client, by direction: given (to another node), taken (from another node).",
            labels=["direction"])
        sessions.add_metric(["given"], stats.sessions_given)
        sessions.add_metric(["taken"], stats.sessions_taken)
        yield sessions
        for name, value, text in (
                ("dropped", stats.dropped, "Messages not forwarded: no connection to NATS, "
                 "or its write buffer over its bound."),
                ("copies", stats.copies, "Extra copies NATS delivered for overlapping "
                 "filters, recognised and dropped."),
                ("refused", stats.refused, "Messages from NATS that no node sends (bad "
                 "subject or envelope), refused."),
                ("too_large", stats.too_large, "Messages not sent to the other nodes because "
                 "NATS would refuse them (over its max_payload, or too long a subject)."),
                ("taken_over", stats.taken_over, "Connections closed because their client id "
                 "connected on another node."),
                ("identity_refused", stats.identity_refused, "Connections closed after their "
                 "CONNECT because another node held the session of their client id for "
                 "another identity (5.0: DISCONNECT 0x87)."),
                ("nats_connects", stats.connects, "Connections made to NATS."),
                ("nats_disconnects", stats.disconnects, "Connections to NATS lost.")):
            yield CounterMetricFamily(f"bastionmq_cluster_{name}", text, value=value)
        replica = bus.replica
        if replica is not None:
            yield _by_outcome(
                "bastionmq_cluster_session_copies", "Persistent sessions and their copies in "
                "the stream BMQ_SESSIONS, by outcome: written, taken (a session resumed here "
                "from the copy a node out of reach left), given_up (a session of this node "
                "that went on elsewhere while it was out of reach: fenced), too_large (a copy "
                "larger than NATS takes: the last that fit stays), failed (written again "
                "at the next checkpoint).", replica.stats,
                ("written", "taken", "given_up", "too_large", "failed"))
        stream = bus.stream
        if stream is not None:
            counts = stream.stats
            yield _by_outcome(
                "bastionmq_cluster_stream_messages", "QoS 1/2 messages and the stream "
                "BMQ_MSGS, by outcome: stored (published here and stored; duplicates "
                "included), duplicate (a copy sent again that the stream had already), "
                "resent (sent again for want of an answer), refused (refused for good: "
                "this node's subscribers only), caught_up (read from the stream after this "
                "node was away, and delivered).", counts,
                ("stored", "duplicate", "resent", "refused", "caught_up"))
            yield CounterMetricFamily(
                "bastionmq_cluster_stream_holds", "Times a subscriber of this node over its "
                "high-water mark held the stream back (its messages then wait in JetStream).",
                value=counts.holds)
            yield CounterMetricFamily(
                "bastionmq_cluster_stream_held_seconds", "Seconds the stream was held back "
                "in all.", value=counts.held_seconds)
            yield GaugeMetricFamily(
                "bastionmq_cluster_stream_waiting", "QoS 1/2 messages sent to the stream "
                "and not yet stored (their acknowledgements wait).", value=len(stream.pending))
            yield GaugeMetricFamily(
                "bastionmq_cluster_stream_position", "The stream sequence of the last "
                "message this node delivered.", value=stream.position or 0)
        yield GaugeMetricFamily("bastionmq_cluster_nats_connected",
                                "1 while this node is connected to NATS.",
                                value=1 if bus.connected else 0)
        yield GaugeMetricFamily("bastionmq_cluster_nodes",
                                "Nodes heard from within three heartbeats, this one included.",
                                value=len(bus.nodes()))

    def _traffic(self, stats: Stats, listeners: Mapping[str, Any]) -> Iterator[Metric]:
        for name, by_qos, text in (
                ("received", stats.received_by_qos, "PUBLISH packets received from clients, "
                 "by QoS."),
                ("sent", stats.sent_by_qos, "PUBLISH packets sent to clients, by QoS.")):
            messages = CounterMetricFamily(f"bastionmq_messages_{name}", text, labels=["qos"])
            for qos, count in enumerate(by_qos):
                messages.add_metric([str(qos)], count)
            yield messages
        received = CounterMetricFamily("bastionmq_bytes_received",
                                       "Bytes of MQTT received from clients, by listener.",
                                       labels=["listener"])
        sent = CounterMetricFamily("bastionmq_bytes_sent",
                                   "Bytes of MQTT written to clients, by listener.",
                                   labels=["listener"])
        # Listeners that have had no connection yet show 0; "" is no listener's
        # (outboxes made without a connection, in tests).
        for listener_id in sorted(set(listeners) | {key for key in stats.traffic if key}):
            traffic = stats.traffic.get(listener_id)
            received.add_metric([listener_id], traffic.received if traffic else 0)
            sent.add_metric([listener_id], traffic.sent if traffic else 0)
        yield received
        yield sent

    def _authentication(self, authn: Any) -> Iterator[Metric]:
        if authn is None:
            return
        outcomes = CounterMetricFamily(
            "bastionmq_authentication", "Authentication decisions, by what decided (an "
            "authenticator, anonymous, peer_certificate, psk, ban, disabled, "
            "enhanced_auth:<method>) and outcome.", labels=["source", "outcome"])
        attributed = {"allowed": 0, "denied": 0}
        for (source, outcome), count in sorted(authn.by_source.items()):
            outcomes.add_metric([source, outcome], count)
            attributed[outcome] += count
        for outcome in ("allowed", "denied"):
            rest = getattr(authn, outcome) - attributed[outcome]
            if rest > 0:
                outcomes.add_metric([OTHER_SOURCE, outcome], rest)
        yield outcomes

    def _authorization(self, access: Any) -> Metric:
        decisions = CounterMetricFamily(
            "bastionmq_authorization", "Authorization decisions, by action, result and what "
            "decided (a source's type, no_match, cache, superuser).",
            labels=["action", "result", "source"])
        counted: dict[tuple[str, str, str], int] = {}
        for (action, allowed, source), count in access.decided.items():
            key = (action, "allow" if allowed else "deny", source)
            counted[key] = counted.get(key, 0) + count
        for (action, allowed), count in access.cache_decisions().items():
            counted[(action, "allow" if allowed else "deny", "cache")] = count
        for action, count in access.superuser.items():
            counted[(action, "allow", "superuser")] = count
        for labels, count in sorted(counted.items()):
            decisions.add_metric(list(labels), count)
        return decisions

    def _store(self, store: Any) -> Iterator[Metric]:
        for name, buckets, text in (
                ("bastionmq_store_commit_seconds", store.commit_seconds,
                 "Time each commit of the durable store took."),
                ("bastionmq_store_commit_batch_size", store.commit_batch_size,
                 "Changes in each batch the durable store committed.")):
            histogram = HistogramMetricFamily(name, text)
            histogram.add_metric([], histogram_buckets(buckets), buckets.total)
            yield histogram

    def _listeners(self, listeners: Mapping[str, Any]) -> Iterator[Metric]:
        current = GaugeMetricFamily("bastionmq_connections",
                                    "Open network connections, by listener.", labels=["listener"])
        refused = CounterMetricFamily("bastionmq_connections_refused_over_limit",
                                      "Connections refused over max_connections, by listener.",
                                      labels=["listener"])
        proxy_refused = CounterMetricFamily(
            "bastionmq_proxy_protocol_refused", "Connections closed for their PROXY protocol "
            "header, by listener and reason (untrusted, malformed, timeout).",
            labels=["listener", "reason"])
        ignored_certs = CounterMetricFamily(
            "bastionmq_ws_forwarded_cert_ignored", "WebSocket upgrade requests whose "
            "proxy_client_cert header was ignored: not from a trusted proxy, by listener.",
            labels=["listener"])
        handshakes = CounterMetricFamily(
            "bastionmq_tls_handshakes", "TLS handshakes, by listener, result and reason "
            "(empty for those that succeeded).", labels=["listener", "result", "reason"])
        negotiated = CounterMetricFamily(
            "bastionmq_tls_negotiated", "Successful TLS handshakes, by listener, TLS version "
            "and cipher suite.", labels=["listener", "version", "cipher"])
        client_expiry = HistogramMetricFamily(
            "bastionmq_tls_client_certificate_expiry_seconds",
            "Remaining validity of each client certificate admitted by a TLS handshake, "
            "at the handshake, by listener.", labels=["listener"])
        expiry = GaugeMetricFamily(
            "bastionmq_tls_certificate_expiry_timestamp_seconds",
            "When each certificate a TLS listener presents (server) or trusts (ca) expires, "
            "and when each CRL it holds is next updated (crl), as a Unix time.",
            labels=["listener", "role", "subject"])
        for listener_id, listener in sorted(listeners.items()):
            current.add_metric([listener_id], listener.connection_count)
            refused.add_metric([listener_id], listener.refused_over_limit)
            if getattr(listener, "proxy", None) is not None:
                for reason in ("untrusted", "malformed", "timeout"):
                    proxy_refused.add_metric([listener_id, reason],
                                             listener.proxy_refusals[reason])
            websocket = getattr(listener, "websocket", None)
            if websocket is not None and websocket.client_cert is not None:
                ignored_certs.add_metric([listener_id], listener.forwarded_certificates_ignored)
            material = getattr(listener, "material", None)
            if material is None:
                continue  # not a TLS listener
            succeeded = listener.handshakes
            handshakes.add_metric([listener_id, "ok", ""], sum(succeeded.values()))
            for reason, count in sorted(listener.handshake_failures.items()):
                handshakes.add_metric([listener_id, "failed", reason], count)
            for (version, cipher), count in sorted(succeeded.items(), key=str):
                negotiated.add_metric([listener_id, version or "", cipher or ""], count)
            remaining = listener.client_certificate_expiry
            client_expiry.add_metric([listener_id], histogram_buckets(remaining),
                                     remaining.total)
            for role, subject, when in material.certificates:
                expiry.add_metric([listener_id, role, subject], when)
            if material.revocation is not None:
                for issuer, _, when in material.revocation.next_updates():
                    expiry.add_metric([listener_id, "crl", issuer], when)
        yield current
        yield refused
        yield proxy_refused
        yield ignored_certs
        yield handshakes
        yield negotiated
        yield client_expiry
        yield expiry

    def _sessions(self, core: BrokerCore) -> Iterator[Metric]:
        sessions = core.sessions.values()
        connected = sum(1 for session in sessions if session.connection is not None)
        by_state = GaugeMetricFamily("bastionmq_sessions", "Sessions, by state.",
                                     labels=["state"])
        by_state.add_metric(["connected"], connected)
        by_state.add_metric(["offline"], len(core.sessions) - connected)
        yield by_state
        yield GaugeMetricFamily("bastionmq_subscriptions", "Subscriptions, shared ones included.",
                                value=core.subscription_count())
        yield GaugeMetricFamily("bastionmq_shared_groups", "Shared subscription groups.",
                                value=len(core.groups))
        yield GaugeMetricFamily("bastionmq_retained_messages", "Retained messages held.",
                                value=len(core.retained))
        yield GaugeMetricFamily("bastionmq_queued_messages",
                                "Messages waiting in session queues.",
                                value=sum(len(s.queue) for s in sessions if s.queue))
        yield GaugeMetricFamily("bastionmq_inflight_messages",
                                "QoS 1/2 messages sent and not yet acknowledged.",
                                value=sum(len(s.inflight) for s in sessions if s.inflight))


def _by_outcome(name: str, text: str, counters: Any, outcomes: tuple[str, ...]) -> Metric:
    """A counter of ``counters``' attributes ``outcomes``, one label value each."""
    family = CounterMetricFamily(name, text, labels=["outcome"])
    for outcome in outcomes:
        family.add_metric([outcome], getattr(counters, outcome))
    return family
