"""Sans-IO MQTT codec for protocol levels 3 (3.1), 4 (3.1.1) and 5 (5.0).

Bytes in, packet objects out, and back; no asyncio here. ``Decoder.feed``
accepts bytes split at any boundary and returns every complete packet, so a
read that holds a hundred packets costs one call. Every violation of the
specifications' wire rules raises ``MalformedPacket`` with the reason code a
5.0 server answers with (DISCONNECT or CONNACK).
"""

from __future__ import annotations

import collections.abc
import struct
from typing import Any, Callable, Mapping, Union

import attrs

from .logtext import shown
from .packet_types import (
    AUTH, CONNACK, CONNECT, DISCONNECT, PACKET_NAMES, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH,
    PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, WILL,
)
from .properties import (
    BINARY, BOOLEAN_PROPERTIES, BYTE, FOUR, NONZERO_PROPERTIES, NO_PROPERTIES, PAIR, PROPERTIES,
    PROPERTY_IDS, TWO, UTF8, VARINT, Reason,
)

MQTT_3_1 = 3
MQTT_3_1_1 = 4
MQTT_5 = 5
PROTOCOL_NAMES = {MQTT_3_1: "MQIsdp", MQTT_3_1_1: "MQTT", MQTT_5: "MQTT"}

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_unpack_u16 = _U16.unpack_from
_unpack_u32 = _U32.unpack_from
_pack_u16 = _U16.pack
_pack_u32 = _U32.pack


class MalformedPacket(Exception):
    """The bytes break a rule of the protocol; the connection must close.

    ``reason_code`` is what a 5.0 server sends in its DISCONNECT (or CONNACK
    while connecting); ``connack_v3`` is set when a 3.1/3.1.1 CONNACK return
    code must be sent before closing (unsupported protocol level).
    """

    def __init__(self, message: str, reason_code: int = Reason.MALFORMED_PACKET,
                 connack_v3: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.connack_v3 = connack_v3
        #: The protocol level of a CONNECT refused after its level was read:
        #: a 5.0 client is then told ``reason_code`` in a CONNACK (4.13.1).
        self.connect_level: int | None = None
        #: Complete packets decoded from the same read before this error.
        self.packets: list = []


def _protocol_error(message: str) -> MalformedPacket:
    return MalformedPacket(message, Reason.PROTOCOL_ERROR)


Properties = Mapping[str, Any]


# ---------------------------------------------------------------- packets

@attrs.define(slots=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = attrs.field(factory=dict)


@attrs.define(slots=True)
class Connect:
    client_id: str = ""
    protocol_level: int = MQTT_3_1_1
    clean_start: bool = True
    keepalive: int = 0
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = attrs.field(factory=dict)
    type = CONNECT


@attrs.define(slots=True)
class Connack:
    reason_code: int = 0
    session_present: bool = False
    properties: Properties = attrs.field(factory=dict)
    type = CONNACK


@attrs.define(slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = attrs.field(factory=dict)
    type = PUBLISH


@attrs.define(slots=True)
class _Ack:
    packet_id: int
    reason_code: int = 0
    properties: Properties = attrs.field(factory=dict)


@attrs.define(slots=True)
class Puback(_Ack):
    type = PUBACK


@attrs.define(slots=True)
class Pubrec(_Ack):
    type = PUBREC


@attrs.define(slots=True)
class Pubrel(_Ack):
    type = PUBREL


@attrs.define(slots=True)
class Pubcomp(_Ack):
    type = PUBCOMP


@attrs.define(slots=True, frozen=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (3.8.3.1)."""

    filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@attrs.define(slots=True)
class Subscribe:
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = attrs.field(factory=dict)
    type = SUBSCRIBE


@attrs.define(slots=True)
class Suback:
    packet_id: int
    reason_codes: list[int]
    properties: Properties = attrs.field(factory=dict)
    type = SUBACK


@attrs.define(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: Properties = attrs.field(factory=dict)
    type = UNSUBSCRIBE


@attrs.define(slots=True)
class Unsuback:
    packet_id: int
    #: 5.0 only; a 3.1.1 UNSUBACK carries none.
    reason_codes: list[int] = attrs.field(factory=list)
    properties: Properties = attrs.field(factory=dict)
    type = UNSUBACK


@attrs.define(slots=True)
class Pingreq:
    type = PINGREQ


@attrs.define(slots=True)
class Pingresp:
    type = PINGRESP


@attrs.define(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = attrs.field(factory=dict)
    type = DISCONNECT


@attrs.define(slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = attrs.field(factory=dict)
    type = AUTH


Packet = Union[Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe,
               Suback, Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect, Auth]

_ACK_CLASSES: dict[int, type[Puback | Pubrec | Pubrel | Pubcomp]] = {
    PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp}
PINGREQ_BYTES = b"\xc0\x00"
PINGRESP_BYTES = b"\xd0\x00"


# ---------------------------------------------------------------- decoding
#
# Readers take the packet's bytes and a position and return (value, new
# position); they check bounds against ``end`` themselves because a packet's
# fields must never read into the next packet.

def _read_u8(data, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise MalformedPacket("packet ends inside a one-byte field")
    return data[pos], pos + 1


def _read_u16(data, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise MalformedPacket("packet ends inside a two-byte integer")
    return _unpack_u16(data, pos)[0], pos + 2


def _read_u32(data, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise MalformedPacket("packet ends inside a four-byte integer")
    return _unpack_u32(data, pos)[0], pos + 4


def read_varint(data, pos: int, end: int) -> tuple[int, int]:
    """The Variable Byte Integer (1.5.5) at ``pos``: (value, position after it)."""
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise MalformedPacket("packet ends inside a variable byte integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise MalformedPacket("variable byte integer longer than four bytes")


def _read_binary(data, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise MalformedPacket("packet ends inside a length prefix")
    length = (data[pos] << 8) | data[pos + 1]
    pos += 2
    if pos + length > end:
        raise MalformedPacket("length prefix runs past the end of the packet")
    return bytes(data[pos:pos + length]), pos + length


def _read_utf8(data, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _read_binary(data, pos, end)
    return _decode_utf8(raw), pos


def _decode_utf8(raw: bytes) -> str:
    # Python's strict decoder refuses overlong forms and encoded surrogates,
    # which [MQTT-1.5.4-1] forbids; U+0000 is checked separately ([MQTT-1.5.4-2]).
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not well-formed UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")
    return text


_READERS = {BYTE: _read_u8, TWO: _read_u16, FOUR: _read_u32, VARINT: read_varint,
            UTF8: _read_utf8, BINARY: _read_binary}


def _read_properties(data, pos: int, end: int, packet_type: int) -> tuple[Properties, int]:
    length, pos = read_varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property length runs past the end of the packet")
    if not length:
        return NO_PROPERTIES, pos
    props: dict[str, Any] = {}
    value: Any  # an int, str or bytes, as the property's wire type says
    while pos < stop:
        prop_id, pos = read_varint(data, pos, stop)
        spec = PROPERTIES.get(prop_id)
        if spec is None:
            raise MalformedPacket(f"unknown property identifier 0x{prop_id:02X}")
        name, kind, allowed = spec
        if packet_type not in allowed:
            # 2.2.2.2: an identifier not valid for its packet type is malformed.
            raise MalformedPacket(f"property {name} is not allowed in "
                                  f"{PACKET_NAMES.get(packet_type, 'the will')}")
        if kind == PAIR:
            key, pos = _read_utf8(data, pos, stop)
            value, pos = _read_utf8(data, pos, stop)
            props.setdefault(name, []).append((key, value))
            continue
        value, pos = _READERS[kind](data, pos, stop)
        if name == "subscription_identifier" and packet_type == PUBLISH:
            # The one property that may repeat in a PUBLISH (3.3.2.3.8).
            if not value:
                raise _protocol_error("subscription identifier 0")
            props.setdefault(name, []).append(value)
            continue
        if name in props:
            raise _protocol_error(f"property {name} appears twice")
        if name in BOOLEAN_PROPERTIES and value > 1:
            raise _protocol_error(f"property {name} must be 0 or 1, not {value}")
        if name in NONZERO_PROPERTIES and value == 0:
            if name == "topic_alias":
                raise MalformedPacket("topic alias 0", Reason.TOPIC_ALIAS_INVALID)  # 3.3.2.3.4
            raise _protocol_error(f"property {name} must not be 0")
        props[name] = value
    return props, pos


def _check_topic_name(topic: str, version: int | None, has_alias: bool) -> None:
    if "+" in topic or "#" in topic:
        # Malformed, not a name refused by policy (0x90): Protocol Error.
        raise MalformedPacket(f"wildcard in PUBLISH topic {shown(topic)}",
                              Reason.PROTOCOL_ERROR)
    if not topic and not has_alias:
        if version == MQTT_5:
            raise _protocol_error("empty topic name without a topic alias")
        raise MalformedPacket("empty topic name")


def _fixed_flags_error(ptype: int, flags: int) -> MalformedPacket:
    return MalformedPacket(
        f"reserved flags 0x{flags:X} in the fixed header of {PACKET_NAMES[ptype]}")


class Decoder:
    """Incremental decoder for one direction of one connection.

    ``version`` is the negotiated protocol level; a server-side decoder starts
    without one and learns it from the CONNECT it decodes. Packets larger than
    ``max_packet_size`` are refused as soon as their fixed header is read,
    before their body is buffered.
    """

    __slots__ = ("_buffer", "_needed", "version", "max_packet_size")

    def __init__(self, version: int | None = None, max_packet_size: int = 268_435_460) -> None:
        #: The start of a packet whose rest has not come yet; None while
        #: there is none (most of the time: an idle client holds no buffer).
        self._buffer: bytearray | None = None
        #: Size of the packet held in the buffer, once its fixed header is known:
        #: until that many bytes are there, a read is only appended, never rescanned.
        self._needed = 0
        self.version = version
        self.max_packet_size = max_packet_size

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a packet."""
        return len(self._buffer) if self._buffer is not None else 0

    def feed(self, data: bytes) -> list[Packet]:
        buffer = self._buffer
        if buffer is not None:
            buffer += data
            if len(buffer) < self._needed:
                return []
            data = bytes(buffer)
            self._buffer = None
        end = len(data)
        pos = 0
        packets: list[Packet] = []
        try:
            pos = self._split(data, pos, end, packets)
        except MalformedPacket as exc:
            # The packets before the bad one are valid and must still be handled.
            exc.packets = packets
            raise
        if pos < end:
            self._buffer = bytearray(data[pos:] if pos else data)
        return packets

    def _split(self, data: bytes, pos: int, end: int, packets: list) -> int:
        append = packets.append
        while end - pos >= 2:
            first = data[pos]
            byte = data[pos + 1]
            if byte < 0x80:
                length = byte
                body = pos + 2
            else:
                length = byte & 0x7F
                shift = 7
                index = pos + 2
                while True:
                    if index >= end:
                        break
                    byte = data[index]
                    index += 1
                    length |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MalformedPacket("remaining length longer than four bytes")
                if byte >= 0x80:  # the length itself is not complete yet
                    break
                body = index
            stop = body + length
            if stop - pos > self.max_packet_size:
                raise MalformedPacket(
                    f"packet of {stop - pos} bytes exceeds the maximum of {self.max_packet_size}",
                    Reason.PACKET_TOO_LARGE)
            if stop > end:
                self._needed = stop - pos
                return pos
            append(self._decode(first, data, body, stop))
            pos = stop
        self._needed = 0
        return pos

    def _decode(self, first: int, data: bytes, pos: int, end: int) -> Packet:
        ptype = first >> 4
        flags = first & 0x0F
        version = self.version
        if version is None and ptype != CONNECT:
            # [MQTT-3.1.0-1]: a server learns the version from CONNECT, which comes first.
            raise _protocol_error(f"{PACKET_NAMES.get(ptype, 'packet')} before CONNECT")
        if ptype == PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                raise MalformedPacket("PUBLISH with QoS 3")
            if pos + 2 > end:
                raise MalformedPacket("packet ends inside a length prefix")
            tlen = (data[pos] << 8) | data[pos + 1]
            pos += 2
            tend = pos + tlen
            if tend > end:
                raise MalformedPacket("topic length runs past the end of the packet")
            topic = _decode_utf8(data[pos:tend])
            pos = tend
            packet_id = None
            if qos:
                if pos + 2 > end:
                    raise MalformedPacket("packet ends inside the packet identifier")
                packet_id = (data[pos] << 8) | data[pos + 1]
                pos += 2
                if not packet_id:
                    raise MalformedPacket("PUBLISH with QoS > 0 and packet identifier 0")
            elif flags & 8:
                raise MalformedPacket("DUP set on a QoS 0 PUBLISH")  # [MQTT-3.3.1-2]
            if version == MQTT_5:
                props, pos = _read_properties(data, pos, end, PUBLISH)
                _check_topic_name(topic, version, "topic_alias" in props)
            else:
                props = NO_PROPERTIES
                _check_topic_name(topic, version, False)
            return Publish(topic, data[pos:end], qos, bool(flags & 1), bool(flags & 8),
                           packet_id, props)
        if ptype in _ACK_CLASSES:
            if flags != (2 if ptype == PUBREL else 0):
                raise _fixed_flags_error(ptype, flags)
            packet_id, pos = _read_u16(data, pos, end)
            if not packet_id:
                raise MalformedPacket("packet identifier 0")
            reason, props = _read_reason_tail(data, pos, end, ptype, version)
            return _ACK_CLASSES[ptype](packet_id, reason, props)
        if ptype == PINGREQ or ptype == PINGRESP:
            if flags or pos != end:
                raise MalformedPacket(f"malformed {PACKET_NAMES[ptype]}")
            return Pingreq() if ptype == PINGREQ else Pingresp()
        if ptype == CONNECT:
            if flags:
                raise _fixed_flags_error(ptype, flags)
            return self._decode_connect(data, pos, end)
        decoder = _DECODERS.get(ptype)
        if decoder is None or (ptype == AUTH and version != MQTT_5):
            raise MalformedPacket(f"invalid packet type {ptype}")
        expected_flags = 2 if ptype in (SUBSCRIBE, UNSUBSCRIBE) else 0
        if flags != expected_flags:
            raise _fixed_flags_error(ptype, flags)
        return decoder(data, pos, end, version)

    @staticmethod
    def _expect_end(pos: int, end: int, ptype: int) -> None:
        if pos != end:
            raise MalformedPacket(f"{end - pos} unexpected bytes at the end of {PACKET_NAMES[ptype]}")

    def _decode_connect(self, data, pos: int, end: int) -> Connect:
        name, pos = _read_utf8(data, pos, end)
        level, pos = _read_u8(data, pos, end)
        if name not in ("MQTT", "MQIsdp"):
            # [MQTT-3.1.2-1]: the server may close without a CONNACK.
            raise MalformedPacket(f"unknown protocol name {shown(name)}",
                                  Reason.UNSUPPORTED_PROTOCOL_VERSION)
        if PROTOCOL_NAMES.get(level) != name:
            # [MQTT-3.1.2-2]: answer with return code 1 and close.
            raise MalformedPacket(f"unsupported protocol {shown(name)} level {level}",
                                  Reason.UNSUPPORTED_PROTOCOL_VERSION, connack_v3=1)
        try:
            return self._decode_connect_rest(data, pos, end, level)
        except MalformedPacket as exc:
            exc.connect_level = level
            raise

    def _decode_connect_rest(self, data, pos: int, end: int, level: int) -> Connect:
        flags, pos = _read_u8(data, pos, end)
        if flags & 0x01:
            raise MalformedPacket("reserved CONNECT flag set")  # [MQTT-3.1.2-3]
        keepalive, pos = _read_u16(data, pos, end)
        props = NO_PROPERTIES
        if level == MQTT_5:
            props, pos = _read_properties(data, pos, end, CONNECT)
        client_id, pos = _read_utf8(data, pos, end)
        will = None
        will_qos = (flags >> 3) & 3
        will_retain = bool(flags & 0x20)
        if flags & 0x04:
            if will_qos == 3:
                raise MalformedPacket("will QoS 3")  # [MQTT-3.1.2-14]
            will_props = NO_PROPERTIES
            if level == MQTT_5:
                will_props, pos = _read_properties(data, pos, end, WILL)
            will_topic, pos = _read_utf8(data, pos, end)
            _check_topic_name(will_topic, level, False)
            will_payload, pos = _read_binary(data, pos, end)
            if will_props.get("payload_format_indicator") == 1:
                try:
                    will_payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise MalformedPacket("will payload is not UTF-8 as its format says",
                                          Reason.PAYLOAD_FORMAT_INVALID) from None
            will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
        elif will_qos or will_retain:
            raise MalformedPacket("will QoS or retain set without a will")  # [MQTT-3.1.2-11]
        username = password = None
        if flags & 0x80:
            username, pos = _read_utf8(data, pos, end)
        elif flags & 0x40 and level != MQTT_5:
            raise MalformedPacket("password without a user name")  # [MQTT-3.1.2-22]
        if flags & 0x40:
            password, pos = _read_binary(data, pos, end)
        self._expect_end(pos, end, CONNECT)
        self.version = level
        return Connect(client_id, level, bool(flags & 0x02), keepalive, username, password,
                       will, props)


def _decode_connack(data, pos: int, end: int, version: int) -> Connack:
    flags, pos = _read_u8(data, pos, end)
    if flags & 0xFE:
        raise MalformedPacket("reserved CONNACK flags set")
    reason, pos = _read_u8(data, pos, end)
    props = NO_PROPERTIES
    if version == MQTT_5 and pos < end:
        props, pos = _read_properties(data, pos, end, CONNACK)
    Decoder._expect_end(pos, end, CONNACK)
    return Connack(reason, bool(flags & 1), props)


def _decode_subscribe(data, pos: int, end: int, version: int) -> Subscribe:
    packet_id, pos = _read_u16(data, pos, end)
    if not packet_id:
        raise MalformedPacket("packet identifier 0")
    props = NO_PROPERTIES
    if version == MQTT_5:
        props, pos = _read_properties(data, pos, end, SUBSCRIBE)
    subscriptions = []
    while pos < end:
        topic_filter, pos = _read_utf8(data, pos, end)
        options, pos = _read_u8(data, pos, end)
        qos = options & 3
        if qos == 3:
            raise MalformedPacket("subscription with QoS 3")
        if version == MQTT_5:
            if options & 0xC0:
                raise MalformedPacket("reserved subscription option bits set")
            retain_handling = (options >> 4) & 3
            if retain_handling == 3:
                raise _protocol_error("retain handling 3")
            subscriptions.append(Subscription(topic_filter, qos, bool(options & 4),
                                              bool(options & 8), retain_handling))
        else:
            if options & 0xFC:
                raise MalformedPacket("reserved subscription option bits set")  # [MQTT-3-8.3-4]
            subscriptions.append(Subscription(topic_filter, qos))
    if not subscriptions:
        raise _protocol_error("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-3]
    return Subscribe(packet_id, subscriptions, props)


def _decode_suback(data, pos: int, end: int, version: int) -> Suback:
    packet_id, pos = _read_u16(data, pos, end)
    props = NO_PROPERTIES
    if version == MQTT_5:
        props, pos = _read_properties(data, pos, end, SUBACK)
    return Suback(packet_id, list(data[pos:end]), props)


def _decode_unsubscribe(data, pos: int, end: int, version: int) -> Unsubscribe:
    packet_id, pos = _read_u16(data, pos, end)
    if not packet_id:
        raise MalformedPacket("packet identifier 0")
    props = NO_PROPERTIES
    if version == MQTT_5:
        props, pos = _read_properties(data, pos, end, UNSUBSCRIBE)
    filters = []
    while pos < end:
        topic_filter, pos = _read_utf8(data, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise _protocol_error("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
    return Unsubscribe(packet_id, filters, props)


def _decode_unsuback(data, pos: int, end: int, version: int) -> Unsuback:
    packet_id, pos = _read_u16(data, pos, end)
    if version != MQTT_5:
        Decoder._expect_end(pos, end, UNSUBACK)
        return Unsuback(packet_id, [], NO_PROPERTIES)
    props, pos = _read_properties(data, pos, end, UNSUBACK)
    return Unsuback(packet_id, list(data[pos:end]), props)


def _read_reason_tail(data, pos: int, end: int, ptype: int,
                      version: int | None) -> tuple[int, Properties]:
    """The reason code and properties that end a 5.0 PUBACK, PUBREC, PUBREL,
    PUBCOMP, DISCONNECT or AUTH; either may be left off the end, meaning
    success and none (3.4.2.1, 3.14.2.1, 3.15.2.1). 3.1.1 packets have neither."""
    reason = 0
    props = NO_PROPERTIES
    if version == MQTT_5:
        if pos < end:
            reason = data[pos]
            pos += 1
        if pos < end:
            props, pos = _read_properties(data, pos, end, ptype)
    Decoder._expect_end(pos, end, ptype)
    return reason, props


def _decode_reason_only(cls, ptype: int):
    def decode(data, pos: int, end: int, version: int):
        reason, props = _read_reason_tail(data, pos, end, ptype, version)
        return cls(reason, props)
    return decode


_DECODERS = {
    CONNACK: _decode_connack,
    SUBSCRIBE: _decode_subscribe,
    SUBACK: _decode_suback,
    UNSUBSCRIBE: _decode_unsubscribe,
    UNSUBACK: _decode_unsuback,
    DISCONNECT: _decode_reason_only(Disconnect, DISCONNECT),
    AUTH: _decode_reason_only(Auth, AUTH),
}


# ---------------------------------------------------------------- encoding

def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL_VARINTS = tuple(bytes((i,)) for i in range(0x80))


def _utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _pack_u16(len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    return _pack_u16(len(raw)) + bytes(raw)


class WireProperties(collections.abc.Mapping):
    """A PUBLISH's properties kept as their encoded block (what
    ``encode_properties`` makes), decoded at each read: a message that waits
    long, in the retained store, then costs what its properties cost on the
    wire rather than several times that in dicts, lists and tuples."""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes) -> None:
        self.wire = wire

    def _decoded(self) -> Properties:
        return decode_properties(self.wire, PUBLISH)

    def __getitem__(self, name: str) -> Any:
        return self._decoded()[name]

    def __iter__(self):
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"WireProperties({dict(self._decoded())!r})"


def encode_properties(props: Properties) -> bytes:
    """The property block (length prefix included) for a 5.0 packet."""
    if isinstance(props, WireProperties):
        return props.wire
    if not props:
        return b"\x00"
    out = bytearray()
    for name, value in props.items():
        prop_id, kind = PROPERTY_IDS[name]
        if kind == PAIR:
            for key, val in value:
                out.append(prop_id)
                out += _utf8(key)
                out += _utf8(val)
            continue
        values = value if isinstance(value, list) else (value,)
        for item in values:
            out.append(prop_id)
            if kind == BYTE:
                out.append(item)
            elif kind == TWO:
                out += _pack_u16(item)
            elif kind == FOUR:
                out += _pack_u32(item)
            elif kind == VARINT:
                out += encode_varint(item)
            elif kind == UTF8:
                out += _utf8(item)
            else:
                out += _binary(item)
    return encode_varint(len(out)) + out


def decode_properties(data: bytes, packet_type: int) -> Properties:
    """A property block written by ``encode_properties``, read back as the
    decoder reads one in a packet of ``packet_type`` (PUBLISH, or WILL)."""
    props, _ = _read_properties(memoryview(data), 0, len(data), packet_type)
    return props


def _frame(first: int, body: bytes | bytearray) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _encode_connect(p: Connect, version: int) -> bytes:
    level = p.protocol_level
    flags = 0x02 if p.clean_start else 0
    will = p.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        flags |= 0x40
    body = bytearray(_utf8(PROTOCOL_NAMES[level]))
    body.append(level)
    body.append(flags)
    body += _pack_u16(p.keepalive)
    if level == MQTT_5:
        body += encode_properties(p.properties)
    body += _utf8(p.client_id)
    if will is not None:
        if level == MQTT_5:
            body += encode_properties(will.properties)
        body += _utf8(will.topic)
        body += _binary(will.payload)
    if p.username is not None:
        body += _utf8(p.username)
    if p.password is not None:
        body += _binary(p.password)
    return _frame(CONNECT << 4, body)


def _encode_connack(p: Connack, version: int) -> bytes:
    body = bytearray((1 if p.session_present else 0, p.reason_code))
    if version == MQTT_5:
        body += encode_properties(p.properties)
    return _frame(CONNACK << 4, body)


def publish_header(topic: bytes, qos: int, retain: bool, dup: bool, payload_length: int,
                   properties: bytes | None, packet_id: int = 0) -> bytes:
    """Everything of a PUBLISH before its payload.

    The hot path builds this once per wire form and writes it together with
    the payload the message already holds; for QoS > 0 the packet identifier
    sits at ``len(header) - len(properties or b"") - 2``.
    """
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    length = 2 + len(topic) + payload_length
    if qos:
        length += 2
    if properties is not None:
        length += len(properties)
    head = bytearray((first,))
    head += encode_varint(length)
    head += _pack_u16(len(topic))
    head += topic
    if qos:
        head += _pack_u16(packet_id)
    if properties is not None:
        head += properties
    return bytes(head)


def _encode_publish(p: Publish, version: int) -> bytes:
    props = encode_properties(p.properties) if version == MQTT_5 else None
    head = publish_header(p.topic.encode("utf-8"), p.qos, p.retain, p.dup, len(p.payload),
                          props, p.packet_id or 0)
    return head + p.payload


def _encode_ack(p: Puback | Pubrec | Pubrel | Pubcomp, version: int) -> bytes:
    first = (p.type << 4) | (2 if p.type == PUBREL else 0)
    if version != MQTT_5 or (not p.reason_code and not p.properties):
        # The short form (3.4.2.1): a success without properties is two bytes.
        return bytes((first, 2)) + _pack_u16(p.packet_id)
    body = bytearray(_pack_u16(p.packet_id))
    body.append(p.reason_code)
    if p.properties:
        body += encode_properties(p.properties)
    return _frame(first, body)


def _encode_subscribe(p: Subscribe, version: int) -> bytes:
    body = bytearray(_pack_u16(p.packet_id))
    if version == MQTT_5:
        body += encode_properties(p.properties)
    for sub in p.subscriptions:
        body += _utf8(sub.filter)
        options = sub.qos
        if version == MQTT_5:
            options |= ((4 if sub.no_local else 0) | (8 if sub.retain_as_published else 0)
                        | (sub.retain_handling << 4))
        body.append(options)
    return _frame(0x82, body)


def _encode_suback(p: Suback, version: int) -> bytes:
    body = bytearray(_pack_u16(p.packet_id))
    if version == MQTT_5:
        body += encode_properties(p.properties)
    body += bytes(p.reason_codes)
    return _frame(SUBACK << 4, body)


def _encode_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    body = bytearray(_pack_u16(p.packet_id))
    if version == MQTT_5:
        body += encode_properties(p.properties)
    for topic_filter in p.filters:
        body += _utf8(topic_filter)
    return _frame(0xA2, body)


def _encode_unsuback(p: Unsuback, version: int) -> bytes:
    body = bytearray(_pack_u16(p.packet_id))
    if version == MQTT_5:
        body += encode_properties(p.properties)
        body += bytes(p.reason_codes)
    return _frame(UNSUBACK << 4, body)


def _encode_reason_only(p: Disconnect | Auth, version: int) -> bytes:
    first = p.type << 4
    if version != MQTT_5 or (not p.reason_code and not p.properties):
        return bytes((first, 0))
    body = bytearray((p.reason_code,))
    if p.properties:
        body += encode_properties(p.properties)
    return _frame(first, body)


#: Packet type -> its encoder, which takes a packet of that type.
_ENCODERS: dict[int, Callable[[Any, int], bytes]] = {
    CONNECT: _encode_connect,
    CONNACK: _encode_connack,
    PUBLISH: _encode_publish,
    PUBACK: _encode_ack,
    PUBREC: _encode_ack,
    PUBREL: _encode_ack,
    PUBCOMP: _encode_ack,
    SUBSCRIBE: _encode_subscribe,
    SUBACK: _encode_suback,
    UNSUBSCRIBE: _encode_unsubscribe,
    UNSUBACK: _encode_unsuback,
    PINGREQ: lambda p, v: PINGREQ_BYTES,
    PINGRESP: lambda p, v: PINGRESP_BYTES,
    DISCONNECT: _encode_reason_only,
    AUTH: _encode_reason_only,
}


def encode(packet: Packet, version: int = MQTT_3_1_1) -> bytes:
    """The wire bytes of ``packet`` for protocol level ``version``."""
    return _ENCODERS[packet.type](packet, version)
