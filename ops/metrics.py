"""The broker's figures in Prometheus' form (``bastionmq_*``).

Nothing is counted for Prometheus on the hot path: the core, the listeners
and the chains keep plain integers, and this collector reads them when
Prometheus scrapes. Counters that only grow are counters; what can go down
(connections, sessions, queues) are gauges.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bastionmq.broker.core import BrokerCore
from bastionmq.broker.properties import reason_name

#: Stats counters by metric name, with their help text. The drop reasons
#: are one metric with a label.
_COUNTERS = (
    ("messages_received", "messages_received", "PUBLISH packets received from clients."),
    ("messages_sent", "messages_sent", "PUBLISH packets sent to clients."),
    ("bytes_received", "bytes_received", "Bytes received from clients."),
    ("bytes_sent", "bytes_sent", "Bytes written to clients."),
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
        authn = broker.authn_stats
        if authn is not None:
            outcomes = CounterMetricFamily("bastionmq_authentication",
                                           "Authentication decisions, by outcome.",
                                           labels=["outcome"])
            outcomes.add_metric(["allowed"], authn.allowed)
            outcomes.add_metric(["denied"], authn.denied)
            yield outcomes
        yield from self._listeners(broker.listeners)
        yield from self._sessions(core)

    def _listeners(self, listeners: Mapping[str, Any]) -> Iterator[Metric]:
        current = GaugeMetricFamily("bastionmq_connections",
                                    "Open network connections, by listener.", labels=["listener"])
        refused = CounterMetricFamily("bastionmq_connections_refused_over_limit",
                                      "Connections refused over max_connections, by listener.",
                                      labels=["listener"])
        handshakes = CounterMetricFamily(
            "bastionmq_tls_handshakes", "TLS handshakes, by listener, result and reason "
            "(empty for those that succeeded).", labels=["listener", "result", "reason"])
        negotiated = CounterMetricFamily(
            "bastionmq_tls_negotiated", "Successful TLS handshakes, by listener, TLS version "
            "and cipher suite.", labels=["listener", "version", "cipher"])
        expiry = GaugeMetricFamily(
            "bastionmq_tls_certificate_expiry_timestamp_seconds",
            "When each certificate a TLS listener presents (server) or trusts (ca) expires, "
            "and when each CRL it holds is next updated (crl), as a Unix time.",
            labels=["listener", "role", "subject"])
        for listener_id, listener in sorted(listeners.items()):
            current.add_metric([listener_id], listener.connection_count)
            refused.add_metric([listener_id], listener.refused_over_limit)
            material = getattr(listener, "material", None)
            if material is None:
                continue  # not a TLS listener
            succeeded = listener.handshakes
            handshakes.add_metric([listener_id, "ok", ""], sum(succeeded.values()))
            for reason, count in sorted(listener.handshake_failures.items()):
                handshakes.add_metric([listener_id, "failed", reason], count)
            for (version, cipher), count in sorted(succeeded.items(), key=str):
                negotiated.add_metric([listener_id, version or "", cipher or ""], count)
            for role, subject, when in material.certificates:
                expiry.add_metric([listener_id, role, subject], when)
            if material.revocation is not None:
                for issuer, _, when in material.revocation.next_updates():
                    expiry.add_metric([listener_id, "crl", issuer], when)
        yield current
        yield refused
        yield handshakes
        yield negotiated
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
