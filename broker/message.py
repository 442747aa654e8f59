"""An application message on its way through the broker.

A message is encoded once per distinct wire form (protocol family, QoS,
retain flag, subscription identifiers) and the same bytes go to every
subscriber that takes that form; for QoS 1 and 2 only the packet identifier
differs between subscribers, so the form is kept as the bytes before and after
it, and the subscriber's outbox joins the three pieces into the one buffer
it writes per read pass.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import attrs

from .codec import WireProperties, encode_properties, publish_header
from .properties import NO_PROPERTIES


@attrs.define(slots=True, eq=False)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    #: 5.0 properties to forward (never a topic alias or subscription identifier).
    properties: Mapping[str, Any] = NO_PROPERTIES
    #: Loop time at which the 5.0 Message Expiry Interval runs out, if it has one.
    expires_at: float | None = None
    #: Its row in the durable store and how many stored queue and in-flight
    #: entries point at it (see broker.store.journal); 0 when not stored.
    store_id: int = attrs.field(default=0, init=False)
    store_refs: int = attrs.field(default=0, init=False)
    #: The id it went to a cluster's stream under (cluster.stream), when it
    #: was published on this node: a session that moves to another node
    #: knows by it which messages of the stream it holds already.
    stream_id: str | None = attrs.field(default=None, init=False)
    _topic_bytes: bytes | None = attrs.field(default=None, init=False)
    _forms: dict | None = attrs.field(default=None, init=False)

    def stamp_expiry(self, now: float) -> None:
        """Start the Message Expiry Interval clock, if the message has one."""
        interval = self.properties.get("message_expiry_interval")
        if interval is not None:
            self.expires_at = now + interval

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def wire_form(self, v5: bool, qos: int, retain: bool,
                  subscription_ids: tuple[int, ...] = (), now: float = 0.0,
                  alias: int = 0, with_topic: bool = True) -> tuple[bytes, bytes]:
        """(head, tail) of this message as a PUBLISH.

        QoS 0: head + tail is the packet. QoS 1/2: head + packet id + tail.
        A message with an expiry is sent with the time it has left ([MQTT-3.3.2-6]),
        so that figure is part of the form. A form with an outbound topic
        ``alias`` belongs to one connection and is not kept.
        """
        remaining = None
        if self.expires_at is not None and v5:
            # Less a microsecond: (now + 600) - now is 600.0000000000001 for
            # some floats, which would round up to a second more than given.
            remaining = max(0, math.ceil(self.expires_at - now - 1e-6))
        if alias:
            return self._encode(v5, qos, retain, subscription_ids, remaining, alias, with_topic)
        if subscription_ids or remaining is not None:
            key: Any = (v5, qos, retain, subscription_ids, remaining)
        else:
            # The common form, keyed by a small int: no tuple built per delivery.
            key = (v5 << 3) | (qos << 1) | retain
        forms = self._forms
        if forms is None:
            forms = self._forms = {}
        else:
            form = forms.get(key)
            if form is not None:
                return form
        form = forms[key] = self._encode(v5, qos, retain, subscription_ids, remaining, 0, True)
        return form

    def _encode(self, v5: bool, qos: int, retain: bool, subscription_ids: tuple[int, ...],
                remaining: int | None, alias: int, with_topic: bool) -> tuple[bytes, bytes]:
        topic = self._topic_bytes
        if topic is None:
            topic = self._topic_bytes = self.topic.encode("utf-8")
        if not with_topic:
            topic = b""
        payload = self.payload
        # The 5.0 property block as it goes on the wire (3.1.1 has none).
        wire_props = None
        if v5:
            props = self.properties
            if subscription_ids or remaining is not None or alias:
                props = dict(props)
                if subscription_ids:
                    props["subscription_identifier"] = list(subscription_ids)
                if remaining is not None:
                    props["message_expiry_interval"] = remaining
                if alias:
                    props["topic_alias"] = alias
            wire_props = encode_properties(props)
        header = publish_header(topic, qos, retain, False, len(payload), wire_props)
        if qos:
            # Split around the packet identifier placeholder.
            cut = len(header) - (len(wire_props) if wire_props is not None else 0) - 2
            return header[:cut], header[cut + 2:] + payload
        return header + payload, b""


def retained_form(message: Message) -> Message:
    """The message as the retained store keeps it: with user properties, its
    properties as their wire encoding (WireProperties), which costs a small
    fraction of the dicts and tuples they are decoded into."""
    props = message.properties
    if "user_property" not in props:
        return message
    kept = Message(message.topic, message.payload, message.qos, message.retain,
                   WireProperties(encode_properties(props)))
    kept.expires_at = message.expires_at
    return kept
