"""The envelope a message travels in between nodes (cluster.envelope)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastionmq.broker.codec import WireProperties, encode_properties
from bastionmq.broker.message import Message
from bastionmq.cluster.envelope import (
    HEAD_SIZE, EnvelopeError, envelope_head, group_key, open_envelope,
)

ORIGIN = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def sealed(message: Message, sequence: int = 7, now: float = 100.0) -> bytes:
    return envelope_head(message, ORIGIN, sequence, now) + message.payload


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("retain", [False, True])
def test_a_plain_message_round_trips(qos, retain):
    message = Message("a/b", b"payload", qos, retain)
    data = sealed(message)
    assert len(data) == HEAD_SIZE + len(b"payload")  # nothing but the head
    origin, sequence, back, served = open_envelope("a/b", data, 5.0)
    assert (origin, sequence) == (ORIGIN, 7)
    assert (back.topic, back.payload, back.qos, back.retain) == ("a/b", b"payload", qos, retain)
    assert back.expires_at is None and not back.properties and served == ()


def test_properties_and_the_time_left_travel():
    props = {"user_property": [("k", "v"), ("k", "w")], "content_type": "text/plain",
             "correlation_data": b"\x00", "message_expiry_interval": 60}
    message = Message("t", b"", 1, False, props)
    message.stamp_expiry(1000.0)  # expires at 1060
    data = sealed(message, now=1015.0)  # 45 s left when it leaves
    _, _, back, _ = open_envelope("t", data, 2.0)  # another node's clock
    assert dict(back.properties) == props
    assert back.expires_at == pytest.approx(47.0)
    assert back.payload == b""


def test_properties_kept_in_wire_form_travel_as_they_are():
    props = {"user_property": [("a", "b")]}
    message = Message("t", b"x", 0, True, WireProperties(encode_properties(props)))
    _, _, back, _ = open_envelope("t", sealed(message), 0.0)
    assert dict(back.properties) == props


def test_the_served_groups_travel_with_the_rest():
    message = Message("t", b"x", 1, False, {"content_type": "a"})
    served = [group_key("g", "t/#"), group_key("\u00e9quipe", "+/+")]
    data = envelope_head(message, ORIGIN, 3, 0.0, served) + message.payload
    _, _, back, got = open_envelope("t", data, 0.0)
    assert got == tuple(served)
    assert (back.payload, dict(back.properties)) == (b"x", {"content_type": "a"})


def test_an_expired_message_arrives_expired():
    message = Message("t", b"x", 1, False, {"message_expiry_interval": 1})
    message.stamp_expiry(0.0)
    _, _, back, _ = open_envelope("t", sealed(message, now=10.0), 50.0)
    assert back.expired(50.0)


@pytest.mark.parametrize("data, why", [
    (b"", "shorter than its head"),
    (b"\x02" + bytes(17), "version 2"),
    (b"\x01\x03" + bytes(16), "QoS 3"),
    (b"\x01\x08" + bytes(16) + b"\x05\x01", "properties"),
    (b"\x01\x08" + bytes(16) + b"\x80\x80\x80\x80\x01", "properties"),
    (b"\x01\x08" + bytes(16) + b"\x02\x99\x00", "properties"),
    (b"\x01\x10" + bytes(16) + b"\x7f\xf8" + bytes(6), "not a number"),
    (b"\x01\x10" + bytes(16) + b"\x00", "inside its expiry"),
    (b"\x01\x40" + bytes(16), "unknown flags"),
    (b"\x01\x20" + bytes(16) + b"\x00\x01\x00\x09ab", "served group longer"),
    (b"\x01\x20" + bytes(16) + b"\x00\x01\x00", "bad served groups"),
    (b"\x01\x20" + bytes(16) + b"\x00\x01\x00\x01\xff", "bad served groups"),
])
def test_what_no_node_makes_is_refused(data, why):
    with pytest.raises(EnvelopeError, match=why):
        open_envelope("t", data, 0.0)


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_the_envelope_error(data):
    try:
        open_envelope("t", data, 0.0)
    except EnvelopeError:
        pass
