"""A message as it travels between nodes: the payload of one NATS PUB.

The topic travels as the subject (cluster.codec); everything else an MQTT
subscriber may see travels here, in a fixed binary frame that the receiving
node reads without parsing text:

    version   1 byte   ENVELOPE_VERSION
    flags     1 byte   QoS (bits 0-1), RETAIN (bit 2), properties (bit 3),
                       expiry (bit 4), served groups (bit 5)
    origin    8 bytes  the sending node's bus, new at each start
    sequence  8 bytes  the sender's count of messages sent, from 1
    expiry    8 bytes  seconds the message has left (a double), if flagged
    served             if flagged: a 2-byte count, then each shared group the
                       sending node served itself, as a 2-byte length and
                       the UTF-8 of share name, U+0000, filter
    properties         the 5.0 property block as a PUBLISH carries it
                       (length prefix included), if flagged
    payload            the rest

Origin and sequence let a node recognise the copies NATS delivers once per
matching subscription of its connection (overlapping filters, ``a/#`` and
``a/+``): the copies of one message follow each other, since one publisher's
messages are processed in order, so a sequence at or below the last seen from
that origin is a copy. Interoperability with NATS-native clients is a
non-goal, as for the subjects.

A shared group is served by the node a message is published on when one of
its members is there (local first), else by the node NATS picks among those
subscribed to the group's queue: the served list tells the node NATS picks
that the group had its message already.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Sequence

from bastionmq.broker.codec import (
    PUBLISH, MalformedPacket, decode_properties, encode_properties, read_varint,
)
from bastionmq.broker.message import Message
from bastionmq.broker.properties import NO_PROPERTIES

ENVELOPE_VERSION = 1

_HEAD = struct.Struct(">BB8sQ")
_EXPIRY = struct.Struct(">d")
HEAD_SIZE = _HEAD.size
#: The head of a message without properties or expiry: (version, flags, origin, sequence).
pack_head = _HEAD.pack

_RETAIN = 0x04
_PROPERTIES = 0x08
_EXPIRES = 0x10
_SERVED = 0x20
_KNOWN_FLAGS = 0x3F
_COUNT = struct.Struct(">H")


class EnvelopeError(ValueError):
    """A payload that is not an envelope this version reads."""


def group_key(share: str, topic_filter: str) -> str:
    """How a served list names a shared group."""
    return share + "\x00" + topic_filter


def envelope_head(message: Message, origin: bytes, sequence: int, now: float,
                  served: Sequence[str] = ()) -> bytes:
    """Everything of the envelope before the payload, which the caller
    writes after it without copying it here; ``served``: the group_key of
    each shared group this node delivered the message to."""
    flags = message.qos | (_RETAIN if message.retain else 0)
    props = message.properties
    tail = b""
    if message.expires_at is not None:
        flags |= _EXPIRES
        tail = _EXPIRY.pack(max(0.0, message.expires_at - now))
    if served:
        flags |= _SERVED
        names = [name.encode() for name in served]
        tail += _COUNT.pack(len(names)) + b"".join(
            _COUNT.pack(len(name)) + name for name in names)
    if props:
        flags |= _PROPERTIES
        tail += encode_properties(props)
    return _HEAD.pack(ENVELOPE_VERSION, flags, origin, sequence) + tail


def open_envelope(topic: str, data: bytes, now: float
                  ) -> tuple[bytes, int, Message, tuple[str, ...]]:
    """(origin, sequence, message, served groups) of an envelope received
    for ``topic``."""
    flags, origin, sequence = read_head(data)
    return (origin, sequence, *read_message(topic, data, flags, now))


def read_head(data: bytes) -> tuple[int, bytes, int]:
    """(flags, origin, sequence) of an envelope: what tells a copy, read
    before the message is made."""
    if len(data) < HEAD_SIZE:
        raise EnvelopeError(f"an envelope of {len(data)} bytes is shorter than its head")
    version, flags, origin, sequence = _HEAD.unpack_from(data)
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(f"envelope version {version}; this node reads {ENVELOPE_VERSION}")
    if flags & 3 == 3:
        raise EnvelopeError("QoS 3 in an envelope")
    if flags & ~_KNOWN_FLAGS:
        raise EnvelopeError(f"unknown flags 0x{flags:02X}")
    return flags, origin, sequence


def read_message(topic: str, data: bytes, flags: int, now: float
                 ) -> tuple[Message, tuple[str, ...]]:
    """The message of an envelope whose head gave ``flags``, and the
    shared groups its node served."""
    if flags < _PROPERTIES:  # no properties, expiry or served groups: the common case
        return Message(topic, data[HEAD_SIZE:], flags & 3, flags > 3), ()
    pos = HEAD_SIZE
    expires_at = None
    if flags & _EXPIRES:
        if len(data) < pos + _EXPIRY.size:
            raise EnvelopeError("an envelope that ends inside its expiry")
        (remaining,) = _EXPIRY.unpack_from(data, pos)
        if not math.isfinite(remaining):
            raise EnvelopeError("an expiry that is not a number")
        expires_at = now + remaining
        pos += _EXPIRY.size
    served: tuple[str, ...] = ()
    if flags & _SERVED:
        served, pos = _read_served(data, pos)
    props = NO_PROPERTIES
    if flags & _PROPERTIES:
        try:
            length, body = read_varint(data, pos, len(data))
            if body + length > len(data):
                raise MalformedPacket("properties longer than the envelope")
            props = decode_properties(data[pos:body + length], PUBLISH)
        except MalformedPacket as exc:
            raise EnvelopeError(f"bad properties: {exc}") from None
        pos = body + length
    message = Message(topic, data[pos:], flags & 3, bool(flags & _RETAIN), props)
    message.expires_at = expires_at
    return message, served



def read_stored(topic: str, data: bytes, stored_at: int, now: float) -> Message:
    """The message of an envelope a JetStream stream kept since ``stored_at``
    (Unix ns): its time left counted from then, not from its reading (the
    envelope holds what it had left when it was published)."""
    message = read_message(topic, data, read_head(data)[0], now)[0]
    if message.expires_at is not None:
        message.expires_at -= max(0.0, time.time() - stored_at / 1e9)
    return message


def _read_served(data: bytes, pos: int) -> tuple[tuple[str, ...], int]:
    try:
        (count,) = _COUNT.unpack_from(data, pos)
        pos += 2
        names = []
        for _ in range(count):
            (size,) = _COUNT.unpack_from(data, pos)
            pos += 2
            if pos + size > len(data):
                raise EnvelopeError("a served group longer than the envelope")
            names.append(data[pos:pos + size].decode())
            pos += size
    except (struct.error, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"bad served groups: {exc}") from None
    return tuple(names), pos
