"""An application message on its way through the broker.

A message is encoded once per distinct wire form (protocol family, QoS,
retain flag, subscription identifiers) and the same bytes go to every
subscriber that takes that form; for QoS 1 and 2 only the packet identifier
differs between subscribers, so the form is kept as the bytes before and after
it and the connection writes the three pieces with one vectored write.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from .codec import encode_properties, publish_header
from .properties import NO_PROPERTIES


@attrs.define(slots=True, eq=False)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    #: 5.0 properties to forward (never a topic alias or subscription identifier).
    properties: Mapping[str, Any] = NO_PROPERTIES
    _topic_bytes: bytes | None = attrs.field(default=None, init=False)
    _forms: dict | None = attrs.field(default=None, init=False)

    def wire_form(self, v5: bool, qos: int, retain: bool,
                  subscription_ids: tuple[int, ...] = ()) -> tuple[bytes, bytes]:
        """(head, tail) of this message as a PUBLISH.

        QoS 0: head + tail is the packet. QoS 1/2: head + packet id + tail.
        """
        key = (v5, qos, retain, subscription_ids)
        forms = self._forms
        if forms is None:
            forms = self._forms = {}
        else:
            form = forms.get(key)
            if form is not None:
                return form
        topic = self._topic_bytes
        if topic is None:
            topic = self._topic_bytes = self.topic.encode("utf-8")
        payload = self.payload
        props = None
        if v5:
            props = self.properties
            if subscription_ids:
                props = dict(props)
                props["subscription_identifier"] = list(subscription_ids)
            props = encode_properties(props)
        header = publish_header(topic, qos, retain, False, len(payload), props)
        if qos:
            # Split around the packet identifier placeholder.
            cut = len(header) - (len(props) if props is not None else 0) - 2
            form = (header[:cut], header[cut + 2:] + payload)
        else:
            form = (header + payload, b"")
        forms[key] = form
        return form
