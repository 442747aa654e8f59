"""Topic filters with placeholders (``devices/${clientid}/#``), shared by the
rule sources that take EMQX's placeholder names.

A placeholder's value is checked before use: a value that is missing or
empty, holds a topic separator, a wildcard or a control character, or would
start the filter with '$', makes the filter match nothing for that client,
so no value can widen a rule.
"""

from __future__ import annotations

import re
from typing import Callable

from bastionmq.broker.ports import ClientInfo

Value = Callable[[ClientInfo], "str | None"]

#: What a placeholder's value must not hold: topic separators, wildcards and
#: control characters (C0, DEL, C1).
UNSAFE_VALUE = re.compile(r"[/+#\x00-\x1f\x7f-\x9f]")


def _certificate_field(field: str) -> Value:
    def value(client: ClientInfo) -> str | None:
        certificate = client.peer.certificate
        return getattr(certificate, field) if certificate is not None else None
    return value


#: ${name} -> how a client's value is found.
PLACEHOLDER_VALUES: dict[str, Value] = {
    "username": lambda client: client.username,
    "clientid": lambda client: client.client_id,
    "cert_common_name": _certificate_field("common_name"),
    "cert_subject": _certificate_field("subject"),
    "peerhost": lambda client: client.peer.host,
}


class TopicTemplate:
    """A topic filter with placeholders, rendered per check."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[str | Value, ...]) -> None:
        self.parts = parts

    def render(self, client: ClientInfo) -> str | None:
        """The filter for ``client``; None when a value is missing or unsafe."""
        rendered = []
        for part in self.parts:
            if isinstance(part, str):
                rendered.append(part)
                continue
            value = part(client)
            if not value or UNSAFE_VALUE.search(value) or (not rendered and value[0] == "$"):
                return None
            rendered.append(value)
        return "".join(rendered)
