"""MQTT 5.0 properties and reason codes (specification chapters 2.2.2 and 2.4).

Properties travel as a plain ``dict`` keyed by the property's name
("session_expiry_interval", "user_property", ...), which keeps the core's
code readable. ``user_property`` is a list of (name, value) pairs in wire
order; ``subscription_identifier`` is a list of ints in a PUBLISH (it may
repeat there) and a single int in a SUBSCRIBE.
"""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Any, Mapping

from .packet_types import (
    AUTH, CONNACK, CONNECT, DISCONNECT, PACKET_NAMES, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SUBACK, SUBSCRIBE, UNSUBACK, WILL,
)

#: An empty, read-only property set shared by every packet that has none
#: (all 3.1.1 traffic), so decoding does not allocate a dict per packet.
NO_PROPERTIES: Mapping[str, Any] = MappingProxyType({})


class Reason(enum.IntEnum):
    """Reason codes of MQTT 5.0 (2.4) and the 3.1.1 CONNACK return codes' meanings."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


def reason_name(code: int) -> str:
    try:
        return f"0x{code:02X} {Reason(code).name.lower().replace('_', ' ')}"
    except ValueError:
        return f"0x{code:02X}"


#: 3.1.1 CONNACK return codes for the 5.0 reasons a server refuses with
#: (3.2.2.3); anything without a closer match becomes "server unavailable".
CONNACK_V3_CODES: dict[int, int] = {
    Reason.SUCCESS: 0,
    Reason.UNSUPPORTED_PROTOCOL_VERSION: 1,
    Reason.CLIENT_IDENTIFIER_NOT_VALID: 2,
    Reason.SERVER_UNAVAILABLE: 3,
    Reason.SERVER_BUSY: 3,
    Reason.SERVER_SHUTTING_DOWN: 3,
    Reason.BAD_USER_NAME_OR_PASSWORD: 4,
    Reason.BAD_AUTHENTICATION_METHOD: 4,
    Reason.NOT_AUTHORIZED: 5,
    Reason.BANNED: 5,
}

# Value types on the wire.
BYTE, TWO, FOUR, VARINT, UTF8, BINARY, PAIR = range(7)

_PUB = frozenset({PUBLISH, WILL})
_ACKS = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, CONNACK, AUTH})
_ALL = frozenset(PACKET_NAMES) | {WILL}

#: id -> (name, wire type, packet types it may appear in)
PROPERTIES: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", BYTE, _PUB),
    0x02: ("message_expiry_interval", FOUR, _PUB),
    0x03: ("content_type", UTF8, _PUB),
    0x08: ("response_topic", UTF8, _PUB),
    0x09: ("correlation_data", BINARY, _PUB),
    0x0B: ("subscription_identifier", VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("session_expiry_interval", FOUR, frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("assigned_client_identifier", UTF8, frozenset({CONNACK})),
    0x13: ("server_keep_alive", TWO, frozenset({CONNACK})),
    0x15: ("authentication_method", UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("authentication_data", BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("request_problem_information", BYTE, frozenset({CONNECT})),
    0x18: ("will_delay_interval", FOUR, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({CONNECT})),
    0x1A: ("response_information", UTF8, frozenset({CONNACK})),
    0x1C: ("server_reference", UTF8, frozenset({CONNACK, DISCONNECT})),
    0x1F: ("reason_string", UTF8, _ACKS),
    0x21: ("receive_maximum", TWO, frozenset({CONNECT, CONNACK})),
    0x22: ("topic_alias_maximum", TWO, frozenset({CONNECT, CONNACK})),
    0x23: ("topic_alias", TWO, frozenset({PUBLISH})),
    0x24: ("maximum_qos", BYTE, frozenset({CONNACK})),
    0x25: ("retain_available", BYTE, frozenset({CONNACK})),
    0x26: ("user_property", PAIR, _ALL),
    0x27: ("maximum_packet_size", FOUR, frozenset({CONNECT, CONNACK})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({CONNACK})),
    0x29: ("subscription_identifier_available", BYTE, frozenset({CONNACK})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({CONNACK})),
}

#: name -> (id, wire type)
PROPERTY_IDS: dict[str, tuple[int, int]] = {
    name: (pid, kind) for pid, (name, kind, _) in PROPERTIES.items()
}

#: Properties whose value must be 0 or 1 ([MQTT-3.1.2.11] and friends).
BOOLEAN_PROPERTIES = frozenset({
    "payload_format_indicator", "request_problem_information",
    "request_response_information", "maximum_qos", "retain_available",
    "wildcard_subscription_available", "subscription_identifier_available",
    "shared_subscription_available",
})
#: Properties for which 0 is a protocol error.
NONZERO_PROPERTIES = frozenset({
    "receive_maximum", "maximum_packet_size", "subscription_identifier", "topic_alias",
})
