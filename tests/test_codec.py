"""The sans-IO codec: exact bytes, round trips, strict decoding, random input.

As in h11's tests, every decoding case is fed three ways: whole, one byte at a
time, and followed by the first bytes of a following packet (which must stay
buffered, intact, until the rest of that packet arrives). Expected bytes are
written by hand from the MQTT 3.1, 3.1.1 and 5.0 specifications, never
produced by the encoder under test.
"""

from __future__ import annotations

from typing import Callable

import pytest
import mqtt_strategies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastionmq.broker.codec import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, Auth, Connack, Connect, Decoder, Disconnect,
    MalformedPacket, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
    Subscribe, Subscription, Unsuback, Unsubscribe, Will, encode, encode_varint,
    publish_header,
)

VERSIONS = (MQTT_3_1, MQTT_3_1_1, MQTT_5)

MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
UNSUPPORTED_PROTOCOL_VERSION = 0x84
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95
PAYLOAD_FORMAT_INVALID = 0x99

#: Tests never assert timings, so hypothesis's per-example deadline is off.
PROPERTY_TEST = settings(deadline=None, max_examples=150,
                         suppress_health_check=[HealthCheck.too_slow])


def h(text: str) -> bytes:
    """Bytes from hex written with spaces, as packets are shown in the specification."""
    return bytes.fromhex(text)


# ---------------------------------------------------------------- feeding

#: A PUBACK of packet id 7 in its two-byte form, the same bytes in every version.
FOLLOWING = h("40 02 00 07")


def feed_whole(decoder: Decoder, data: bytes) -> list:
    return decoder.feed(data)


def feed_bytewise(decoder: Decoder, data: bytes) -> list:
    packets = []
    for index in range(len(data)):
        packets += decoder.feed(data[index:index + 1])
    return packets


def feed_with_trailing(decoder: Decoder, data: bytes) -> list:
    """The packet followed by the first three bytes of another, then the rest of it."""
    packets = decoder.feed(data + FOLLOWING[:3])
    assert decoder.buffered == 3
    assert decoder.feed(FOLLOWING[3:]) == [Puback(7)]
    assert decoder.buffered == 0
    return packets


FEEDS = pytest.mark.parametrize(
    "feed", [feed_whole, feed_bytewise, feed_with_trailing],
    ids=["whole", "bytewise", "trailing"])


def feed_chunks(decoder: Decoder, data: bytes, cuts: list[int]) -> list:
    packets = []
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        packets += decoder.feed(data[start:cut])
        start = cut
    return packets


def refused(feed: Callable, decoder: Decoder, data: bytes) -> MalformedPacket:
    with pytest.raises(MalformedPacket) as info:
        feed(decoder, data)
    return info.value


def connected(version: int, **kwargs) -> Decoder:
    """A server-side decoder that has decoded the CONNECT of a ``version`` client."""
    decoder = Decoder(**kwargs)
    assert decoder.feed(encode(Connect("c", version), version)) == [Connect("c", version)]
    assert decoder.version == version
    return decoder


# ---------------------------------------------------------------- exact bytes

CONNECT_3_1_1 = h("10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 63")

#: (version, packet, its bytes); every case decodes back to the same packet.
EXACT = [
    # Fixed-header-only packets (3.12, 3.13, 3.14).
    (MQTT_3_1_1, Pingreq(), h("c0 00")),
    (MQTT_3_1, Pingreq(), h("c0 00")),
    (MQTT_5, Pingreq(), h("c0 00")),
    (MQTT_3_1_1, Pingresp(), h("d0 00")),
    (MQTT_5, Pingresp(), h("d0 00")),
    (MQTT_3_1_1, Disconnect(), h("e0 00")),
    (MQTT_5, Disconnect(), h("e0 00")),
    # CONNECT: protocol name, level, flags, keep alive, (properties), client id.
    (MQTT_3_1_1, Connect("c", MQTT_3_1_1, keepalive=60), CONNECT_3_1_1),
    (MQTT_3_1, Connect("c", MQTT_3_1, keepalive=60),
     h("10 0f 00 06 4d 51 49 73 64 70 03 02 00 3c 00 01 63")),
    (MQTT_5, Connect("c", MQTT_5, keepalive=60),
     h("10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 63")),
    # Flags 0xEC: user name, password, will retain, will QoS 1, will; no clean session.
    (MQTT_3_1_1, Connect("id", MQTT_3_1_1, clean_start=False, keepalive=10, username="u",
                         password=b"p", will=Will("w", b"bye", 1, True)),
     h("10 1c 00 04 4d 51 54 54 04 ec 00 0a 00 02 69 64 00 01 77 00 03 62 79 65"
       " 00 01 75 00 01 70")),
    # 5.0: session expiry 3600, receive maximum 20, a user property; a will with
    # will delay 5 and an empty payload; user name only; empty client id.
    (MQTT_5, Connect("", MQTT_5, username="u",
                     will=Will("w", b"", properties={"will_delay_interval": 5}),
                     properties={"session_expiry_interval": 3600, "receive_maximum": 20,
                                 "user_property": [("a", "b")]}),
     h("10 2a 00 04 4d 51 54 54 05 86 00 00"
       " 0f 11 00 00 0e 10 21 00 14 26 00 01 61 00 01 62"
       " 00 00 05 18 00 00 00 05 00 01 77 00 00 00 01 75")),
    # 5.0 allows a password without a user name (3.1.2.9).
    (MQTT_5, Connect("c", MQTT_5, password=b"\x00\xff"),
     h("10 12 00 04 4d 51 54 54 05 42 00 00 00 00 01 63 00 02 00 ff")),
    # CONNACK (3.2).
    (MQTT_3_1_1, Connack(), h("20 02 00 00")),
    (MQTT_3_1_1, Connack(0, session_present=True), h("20 02 01 00")),
    (MQTT_3_1_1, Connack(5), h("20 02 00 05")),
    (MQTT_3_1, Connack(2), h("20 02 00 02")),
    (MQTT_5, Connack(), h("20 03 00 00 00")),
    (MQTT_5, Connack(0, True, {"assigned_client_identifier": "x", "topic_alias_maximum": 10,
                               "maximum_qos": 1}),
     h("20 0c 01 00 09 12 00 01 78 22 00 0a 24 01")),
    (MQTT_5, Connack(0x86), h("20 03 00 86 00")),
    # PUBLISH (3.3): flags DUP(8) QoS(6) RETAIN(1).
    (MQTT_3_1_1, Publish("a/b", b"hi"), h("30 07 00 03 61 2f 62 68 69")),
    (MQTT_3_1, Publish("a/b", b"hi"), h("30 07 00 03 61 2f 62 68 69")),
    (MQTT_3_1_1, Publish("a/b", b"hi", 1, retain=True, dup=True, packet_id=10),
     h("3b 09 00 03 61 2f 62 00 0a 68 69")),
    (MQTT_3_1_1, Publish("t", b"hi", 2, packet_id=0xFFFF), h("34 07 00 01 74 ff ff 68 69")),
    (MQTT_3_1_1, Publish("t", b""), h("30 03 00 01 74")),
    (MQTT_3_1_1, Publish("\ufeffa", b""), h("30 06 00 04 ef bb bf 61")),
    (MQTT_5, Publish("a/b", b"hi"), h("30 08 00 03 61 2f 62 00 68 69")),
    (MQTT_5, Publish("t", b"x", 1, packet_id=1, properties={
        "message_expiry_interval": 60,
        "user_property": [("k", "v"), ("k", "w")],
        "subscription_identifier": [1, 300]}),
     h("32 1f 00 01 74 00 01 18 02 00 00 00 3c 26 00 01 6b 00 01 76"
       " 26 00 01 6b 00 01 77 0b 01 0b ac 02 78")),
    # An empty topic name with a topic alias (3.3.2.3.4).
    (MQTT_5, Publish("", b"", properties={"topic_alias": 3}), h("30 06 00 00 03 23 00 03")),
    (MQTT_5, Publish("t", b"", properties={"payload_format_indicator": 1,
                                           "content_type": "a", "response_topic": "r",
                                           "correlation_data": b"\x01"}),
     h("30 12 00 01 74 0e 01 01 03 00 01 61 08 00 01 72 09 00 01 01")),
    # Remaining length of two and three bytes (2.2.3).
    (MQTT_3_1_1, Publish("t", b"x" * 200), h("30 cb 01 00 01 74") + b"x" * 200),
    (MQTT_3_1_1, Publish("t", b"x" * 16381), h("30 80 80 01 00 01 74") + b"x" * 16381),
    # PUBACK, PUBREC, PUBREL (flags 0010), PUBCOMP (3.4 - 3.7).
    (MQTT_3_1_1, Puback(1), h("40 02 00 01")),
    (MQTT_3_1_1, Pubrec(2), h("50 02 00 02")),
    (MQTT_3_1_1, Pubrel(3), h("62 02 00 03")),
    (MQTT_3_1_1, Pubcomp(4), h("70 02 00 04")),
    (MQTT_3_1, Puback(0x1234), h("40 02 12 34")),
    # 5.0 short form: success without properties leaves out the reason code (3.4.2.1).
    (MQTT_5, Puback(1), h("40 02 00 01")),
    (MQTT_5, Pubcomp(4), h("70 02 00 04")),
    (MQTT_5, Puback(1, 0x10), h("40 03 00 01 10")),
    (MQTT_5, Pubrec(2, 0x80), h("50 03 00 02 80")),
    (MQTT_5, Pubrel(3, 0x92), h("62 03 00 03 92")),
    (MQTT_5, Puback(1, 0x10, {"reason_string": "no"}), h("40 09 00 01 10 05 1f 00 02 6e 6f")),
    (MQTT_5, Pubcomp(9, 0, {"user_property": [("a", "")]}),
     h("70 0a 00 09 00 06 26 00 01 61 00 00")),
    # SUBSCRIBE (flags 0010) and SUBACK (3.8, 3.9).
    (MQTT_3_1_1, Subscribe(1, [Subscription("a/b", 1)]), h("82 08 00 01 00 03 61 2f 62 01")),
    (MQTT_3_1, Subscribe(1, [Subscription("a/b", 1)]), h("82 08 00 01 00 03 61 2f 62 01")),
    (MQTT_3_1_1, Subscribe(2, [Subscription("a", 0), Subscription("b/#", 2)]),
     h("82 0c 00 02 00 01 61 00 00 03 62 2f 23 02")),
    # Options 0x2e: retain handling 2, retain as published, no local, QoS 2.
    (MQTT_5, Subscribe(1, [Subscription("a", 2, True, True, 2)], {"subscription_identifier": 5}),
     h("82 09 00 01 02 0b 05 00 01 61 2e")),
    (MQTT_5, Subscribe(1, [Subscription("+", 1, retain_handling=1)],
                       {"subscription_identifier": 268_435_455}),
     h("82 0c 00 01 05 0b ff ff ff 7f 00 01 2b 11")),
    (MQTT_3_1_1, Suback(1, [0, 1, 2, 0x80]), h("90 06 00 01 00 01 02 80")),
    (MQTT_5, Suback(1, [0x00, 0x8F]), h("90 05 00 01 00 00 8f")),
    # UNSUBSCRIBE (flags 0010) and UNSUBACK (3.10, 3.11).
    (MQTT_3_1_1, Unsubscribe(1, ["a"]), h("a2 05 00 01 00 01 61")),
    (MQTT_3_1_1, Unsubscribe(3, ["a", "+/#"]), h("a2 0a 00 03 00 01 61 00 03 2b 2f 23")),
    (MQTT_5, Unsubscribe(1, ["a"]), h("a2 06 00 01 00 00 01 61")),
    (MQTT_3_1_1, Unsuback(1), h("b0 02 00 01")),
    (MQTT_5, Unsuback(1, [0x00, 0x11]), h("b0 05 00 01 00 00 11")),
    # DISCONNECT and AUTH with reason codes and properties (3.14, 3.15).
    (MQTT_5, Disconnect(0x04), h("e0 01 04")),
    (MQTT_5, Disconnect(0x8E, {"reason_string": "x"}), h("e0 06 8e 04 1f 00 01 78")),
    (MQTT_5, Disconnect(0, {"session_expiry_interval": 0}), h("e0 07 00 05 11 00 00 00 00")),
    (MQTT_5, Auth(), h("f0 00")),
    (MQTT_5, Auth(0x18, {"authentication_method": "m"}), h("f0 06 18 04 15 00 01 6d")),
    (MQTT_5, Auth(0x19, {"authentication_method": "m", "authentication_data": b"\x01"}),
     h("f0 0a 19 08 15 00 01 6d 16 00 01 01")),
]

#: Forms the encoder never writes but a decoder must accept.
DECODE_ONLY = [
    # 5.0 acknowledgements: reason code with an empty property block (3.4.2.2.1).
    (MQTT_5, Puback(1), h("40 04 00 01 00 00")),
    (MQTT_5, Pubrel(1, 0x92), h("62 04 00 01 92 00")),
    (MQTT_5, Disconnect(), h("e0 02 00 00")),
    (MQTT_5, Auth(), h("f0 02 00 00")),
    (MQTT_5, Disconnect(0x04), h("e0 02 04 00")),
    # A 5.0 CONNACK of a server that leaves out the empty property block.
    (MQTT_5, Connack(0x80), h("20 02 00 80")),
]


def _exact_id(case) -> str:
    version, packet, _ = case
    return f"{type(packet).__name__}-v{version}"


@pytest.mark.parametrize("version, packet, data", EXACT, ids=[_exact_id(c) for c in EXACT])
def test_encode_writes_the_specified_bytes(version, packet, data):
    assert encode(packet, version) == data


@FEEDS
@pytest.mark.parametrize("version, packet, data", EXACT + DECODE_ONLY,
                         ids=[_exact_id(c) for c in EXACT + DECODE_ONLY])
def test_decode_reads_the_specified_bytes(feed, version, packet, data):
    # A CONNECT goes to a server-side decoder, which learns the version from it.
    decoder = Decoder() if isinstance(packet, Connect) else Decoder(version)
    assert feed(decoder, data) == [packet]
    assert decoder.version == version
    assert decoder.buffered == 0


def test_decoded_3_1_1_packets_carry_no_properties_and_no_reason_codes():
    decoder = connected(MQTT_3_1_1)
    packets = decoder.feed(h("40 02 00 01 e0 00 b0 02 00 05 30 03 00 01 74"))
    assert packets == [Puback(1), Disconnect(), Unsuback(5), Publish("t")]
    for packet in packets:
        assert not packet.properties
    assert packets[0].reason_code == 0
    assert packets[2].reason_codes == []


@pytest.mark.parametrize("value, data", [
    (0, "00"), (1, "01"), (127, "7f"), (128, "80 01"), (16_383, "ff 7f"),
    (16_384, "80 80 01"), (2_097_151, "ff ff 7f"), (2_097_152, "80 80 80 01"),
    (268_435_455, "ff ff ff 7f"),
])
def test_variable_byte_integer_examples_of_the_specification(value, data):
    # Table 1.1 of 3.1.1 / 1.5.5 of 5.0.
    assert encode_varint(value) == h(data)


@pytest.mark.parametrize("properties", [None, b"\x00", h("05 23 00 01 01 00")])
def test_publish_header_places_the_packet_id_where_it_says(properties):
    head = publish_header(b"t", 1, False, False, 2, properties, packet_id=0xABCD)
    cut = len(head) - len(properties or b"") - 2
    assert head[cut:cut + 2] == h("ab cd")


@FEEDS
def test_server_decoder_learns_the_version_within_one_read(feed):
    # The PUBLISH after a 5.0 CONNECT has a property block; it must be read as such.
    data = (h("10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 63")
            + h("30 0a 00 01 74 03 23 00 05 70 61 79")
            + h("c0 00"))
    decoder = Decoder()
    assert feed(decoder, data) == [
        Connect("c", MQTT_5, keepalive=60),
        Publish("t", b"pay", properties={"topic_alias": 5}),
        Pingreq(),
    ]
    assert decoder.version == MQTT_5


@pytest.mark.parametrize("version", VERSIONS)
def test_connect_decoding_sets_the_version_of_a_server_decoder(version):
    decoder = Decoder()
    assert decoder.version is None
    decoder.feed(encode(Connect("c", version), version)[:5])
    assert decoder.version is None
    decoder.feed(encode(Connect("c", version), version)[5:])
    assert decoder.version == version


def test_decoder_buffers_nothing_more_than_an_unfinished_packet():
    decoder = Decoder(MQTT_3_1_1)
    assert decoder.feed(b"") == []
    assert decoder.feed(h("30")) == []
    assert decoder.buffered == 1
    assert decoder.feed(h("ff ff ff 7f")) == []  # the largest length, four bytes
    assert decoder.buffered == 5


def test_three_packets_in_one_read_and_a_packet_across_reads():
    decoder = Decoder(MQTT_3_1_1)
    data = h("c0 00 40 02 00 01 30 07 00 03 61 2f 62 68 69 d0 00")
    assert decoder.feed(data[:9]) == [Pingreq(), Puback(1)]
    assert decoder.feed(data[9:]) == [Publish("a/b", b"hi"), Pingresp()]


# ---------------------------------------------------------------- strategies

CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00")
LEVEL_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",),
                            exclude_characters="\x00/+#")
texts = st.text(CHARS, max_size=10)
binaries = st.binary(max_size=12)
levels = st.text(LEVEL_CHARS, max_size=5)
topic_names = mqtt_strategies.topic_names(levels)
topic_filters = mqtt_strategies.topic_filters(levels)


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
flag = st.integers(0, 1)
packet_ids = st.integers(1, 0xFFFF)
subscription_ids = st.integers(1, 268_435_455)

#: Value of every 5.0 property, from table 2-4 and the rules of each property.
PROPERTY_VALUES = {
    "payload_format_indicator": flag,
    "message_expiry_interval": u32,
    "content_type": texts,
    "response_topic": topic_names,
    "correlation_data": binaries,
    "subscription_identifier": subscription_ids,
    "session_expiry_interval": u32,
    "assigned_client_identifier": texts,
    "server_keep_alive": u16,
    "authentication_method": texts,
    "authentication_data": binaries,
    "request_problem_information": flag,
    "will_delay_interval": u32,
    "request_response_information": flag,
    "response_information": texts,
    "server_reference": texts,
    "reason_string": texts,
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": u16,
    "topic_alias": st.integers(1, 0xFFFF),
    "maximum_qos": flag,
    "retain_available": flag,
    "user_property": st.lists(st.tuples(texts, texts), min_size=1, max_size=4),
    "maximum_packet_size": st.integers(1, 0xFFFF_FFFF),
    "wildcard_subscription_available": flag,
    "subscription_identifier_available": flag,
    "shared_subscription_available": flag,
}

_ACK_PROPERTIES = ("reason_string", "user_property")
#: Which packet may carry which property (table 2-4 of 5.0).
ALLOWED_PROPERTIES = {
    "CONNECT": ("session_expiry_interval", "authentication_method", "authentication_data",
                "request_problem_information", "request_response_information",
                "receive_maximum", "topic_alias_maximum", "user_property",
                "maximum_packet_size"),
    "CONNACK": ("session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
                "authentication_method", "authentication_data", "response_information",
                "server_reference", "reason_string", "receive_maximum",
                "topic_alias_maximum", "maximum_qos", "retain_available", "user_property",
                "maximum_packet_size", "wildcard_subscription_available",
                "subscription_identifier_available", "shared_subscription_available"),
    "PUBLISH": ("payload_format_indicator", "message_expiry_interval", "content_type",
                "response_topic", "correlation_data", "subscription_identifier",
                "topic_alias", "user_property"),
    "WILL": ("payload_format_indicator", "message_expiry_interval", "content_type",
             "response_topic", "correlation_data", "will_delay_interval", "user_property"),
    "PUBACK": _ACK_PROPERTIES,
    "SUBSCRIBE": ("subscription_identifier", "user_property"),
    "SUBACK": _ACK_PROPERTIES,
    "UNSUBSCRIBE": ("user_property",),
    "UNSUBACK": _ACK_PROPERTIES,
    "DISCONNECT": ("session_expiry_interval", "server_reference", "reason_string",
                   "user_property"),
    "AUTH": ("authentication_method", "authentication_data", "reason_string",
             "user_property"),
}


def properties(packet: str, version: int):
    if version != MQTT_5:
        return st.just({})
    optional = {name: PROPERTY_VALUES[name] for name in ALLOWED_PROPERTIES[packet]}
    if packet == "PUBLISH":
        # The one property that may repeat in a PUBLISH (3.3.2.3.8).
        optional["subscription_identifier"] = st.lists(subscription_ids, min_size=1, max_size=4)
    return st.fixed_dictionaries({}, optional=optional)


#: Reason codes each 5.0 packet may carry (2.4 and each packet's chapter).
REASONS_5 = {
    "CONNACK": (0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A,
                0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F),
    "PUBACK": (0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99),
    "PUBREL": (0x00, 0x92),
    "SUBACK": (0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2),
    "UNSUBACK": (0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91),
    "DISCONNECT": (0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F,
                   0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D,
                   0x9E, 0x9F, 0xA0, 0xA1, 0xA2),
    "AUTH": (0x00, 0x18, 0x19),
}


@st.composite
def wills(draw, version: int) -> Will:
    props = draw(properties("WILL", version))
    if props.get("payload_format_indicator") == 1:
        payload = draw(texts).encode("utf-8")
    else:
        payload = draw(binaries)
    return Will(draw(topic_names), payload, draw(st.integers(0, 2)), draw(st.booleans()), props)


@st.composite
def connects(draw, version: int) -> Connect:
    if version == MQTT_3_1:
        client_id = draw(st.text(CHARS, min_size=1, max_size=23))  # 3.1: 1 to 23 characters
    else:
        client_id = draw(texts)
    # 3.1.1: an empty client id comes with a clean session [MQTT-3.1.3-7].
    clean = True if (version != MQTT_5 and not client_id) else draw(st.booleans())
    username = draw(st.none() | texts)
    if version != MQTT_5 and username is None:
        password = None  # [MQTT-3.1.2-22]
    else:
        password = draw(st.none() | binaries)
    return Connect(client_id, version, clean, draw(u16), username, password,
                   draw(st.none() | wills(version)), draw(properties("CONNECT", version)))


@st.composite
def connacks(draw, version: int) -> Connack:
    if version == MQTT_5:
        reason = draw(st.sampled_from(REASONS_5["CONNACK"]))
    else:
        reason = draw(st.integers(0, 5))
    # The session present flag is 0 in a refusal [MQTT-3.2.2-4].
    present = draw(st.booleans()) if reason == 0 else False
    return Connack(reason, present, draw(properties("CONNACK", version)))


@st.composite
def publishes(draw, version: int) -> Publish:
    props = draw(properties("PUBLISH", version))
    topic = draw(topic_names)
    if "topic_alias" in props and draw(st.booleans()):
        topic = ""  # the alias stands for the topic (3.3.2.3.4)
    qos = draw(st.integers(0, 2))
    return Publish(topic, draw(st.binary(max_size=300)), qos, draw(st.booleans()),
                   draw(st.booleans()) if qos else False,  # [MQTT-3.3.1-2]
                   draw(packet_ids) if qos else None, props)


@st.composite
def acks(draw, version: int):
    cls = draw(st.sampled_from([Puback, Pubrec, Pubrel, Pubcomp]))
    if version != MQTT_5:
        return cls(draw(packet_ids))
    kind = "PUBACK" if cls in (Puback, Pubrec) else "PUBREL"
    return cls(draw(packet_ids), draw(st.sampled_from(REASONS_5[kind])),
               draw(properties("PUBACK", version)))


@st.composite
def subscriptions(draw, version: int) -> Subscription:
    if version != MQTT_5:
        return Subscription(draw(topic_filters), draw(st.integers(0, 2)))
    return Subscription(draw(topic_filters), draw(st.integers(0, 2)), draw(st.booleans()),
                        draw(st.booleans()), draw(st.integers(0, 2)))


def subscribes(version: int):
    return st.builds(Subscribe, packet_ids,
                     st.lists(subscriptions(version), min_size=1, max_size=4),
                     properties("SUBSCRIBE", version))


def subacks(version: int):
    codes = (st.sampled_from(REASONS_5["SUBACK"]) if version == MQTT_5
             else st.sampled_from([0, 1, 2, 0x80] if version == MQTT_3_1_1 else [0, 1, 2]))
    return st.builds(Suback, packet_ids, st.lists(codes, min_size=1, max_size=4),
                     properties("SUBACK", version))


def unsubscribes(version: int):
    return st.builds(Unsubscribe, packet_ids,
                     st.lists(topic_filters, min_size=1, max_size=4),
                     properties("UNSUBSCRIBE", version))


def unsubacks(version: int):
    if version != MQTT_5:
        return st.builds(Unsuback, packet_ids)
    return st.builds(Unsuback, packet_ids,
                     st.lists(st.sampled_from(REASONS_5["UNSUBACK"]), min_size=1, max_size=4),
                     properties("UNSUBACK", version))


def reason_only(cls, kind: str, version: int):
    if version != MQTT_5:
        return st.builds(cls)
    return st.builds(cls, st.sampled_from(REASONS_5[kind]), properties(kind, version))


def packets(version: int):
    kinds = [
        connects(version), connacks(version), publishes(version), acks(version),
        subscribes(version), subacks(version), unsubscribes(version), unsubacks(version),
        st.builds(Pingreq), st.builds(Pingresp), reason_only(Disconnect, "DISCONNECT", version),
    ]
    if version == MQTT_5:
        kinds.append(reason_only(Auth, "AUTH", version))
    return st.one_of(kinds)


versioned_packets = st.sampled_from(VERSIONS).flatmap(
    lambda version: st.tuples(st.just(version), packets(version)))
versioned_streams = st.sampled_from(VERSIONS).flatmap(
    lambda version: st.tuples(st.just(version), st.lists(packets(version), min_size=2,
                                                         max_size=6)))


# ---------------------------------------------------------------- round trips

@PROPERTY_TEST
@given(versioned_packets)
def test_round_trip_whole(case):
    version, packet = case
    decoder = Decoder(version)
    assert decoder.feed(encode(packet, version)) == [packet]
    assert decoder.buffered == 0


@PROPERTY_TEST
@given(versioned_packets)
def test_round_trip_one_byte_at_a_time(case):
    version, packet = case
    data = encode(packet, version)
    decoder = Decoder(version)
    for index in range(len(data) - 1):
        assert decoder.feed(data[index:index + 1]) == []
        assert decoder.buffered == index + 1
    assert decoder.feed(data[-1:]) == [packet]
    assert decoder.buffered == 0


@PROPERTY_TEST
@given(versioned_packets, st.data())
def test_round_trip_split_at_a_random_point(case, data):
    version, packet = case
    wire = encode(packet, version)
    cut = data.draw(st.integers(0, len(wire)), label="cut")
    decoder = Decoder(version)
    first = decoder.feed(wire[:cut])
    second = decoder.feed(wire[cut:])
    assert first + second == [packet]
    assert (first == []) == (cut < len(wire))


@PROPERTY_TEST
@given(versioned_packets)
def test_round_trip_with_trailing_bytes(case):
    version, packet = case
    assert feed_with_trailing(Decoder(version), encode(packet, version)) == [packet]


@PROPERTY_TEST
@given(versioned_streams, st.data())
def test_round_trip_of_several_packets_in_one_read_and_in_random_chunks(case, data):
    version, stream = case
    wire = b"".join(encode(packet, version) for packet in stream)
    assert Decoder(version).feed(wire) == stream
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8), label="cuts")
    assert feed_chunks(Decoder(version), wire, cuts) == stream


@PROPERTY_TEST
@given(versioned_streams)
def test_server_decoder_round_trip_after_connect(case):
    version, stream = case
    connect = Connect("client", version)
    decoder = Decoder()
    wire = encode(connect, version) + b"".join(encode(packet, version) for packet in stream)
    assert decoder.feed(wire) == [connect] + stream
    assert decoder.version == version


@PROPERTY_TEST
@given(st.sampled_from(VERSIONS).flatmap(
    lambda version: st.tuples(st.just(version), connects(version))))
def test_connect_round_trip_teaches_the_server_decoder_its_version(case):
    version, connect = case
    decoder = Decoder()
    assert feed_bytewise(decoder, encode(connect, version)) == [connect]
    assert decoder.version == version


# ---------------------------------------------------------------- random input

ANY_DECODER_VERSION = st.sampled_from([None, MQTT_3_1, MQTT_3_1_1, MQTT_5])


def outcome(decoder: Decoder, data: bytes, cuts: list[int]):
    """(packets decoded, reason code of the error or None), whatever the chunks."""
    found = []
    start = 0
    try:
        for cut in sorted(cuts) + [len(data)]:
            found += decoder.feed(data[start:cut])
            start = cut
    except MalformedPacket as exc:
        assert isinstance(exc.reason_code, int)
        return found + exc.packets, exc.reason_code
    return found, None


@PROPERTY_TEST
@given(ANY_DECODER_VERSION, st.binary(max_size=400))
def test_random_bytes_raise_nothing_but_malformed_packet(version, data):
    decoder = Decoder(version)
    try:
        decoder.feed(data)
    except MalformedPacket:
        pass


@PROPERTY_TEST
@given(ANY_DECODER_VERSION, st.binary(max_size=200))
def test_random_bytes_fed_one_at_a_time_raise_nothing_but_malformed_packet(version, data):
    decoder = Decoder(version)
    try:
        feed_bytewise(decoder, data)
    except MalformedPacket:
        pass


@st.composite
def mutated_streams(draw):
    version = draw(st.sampled_from(VERSIONS))
    stream = draw(st.lists(packets(version), min_size=1, max_size=4))
    wire = bytearray(encode(Connect("c", version), version))
    for packet in stream:
        wire += encode(packet, version)
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not wire:
            break
        index = draw(st.integers(0, len(wire) - 1))
        if action == "flip":
            wire[index] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            wire[index] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif action == "insert":
            wire[index:index] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del wire[index:index + draw(st.integers(1, 4))]
        else:
            del wire[index:]
    start_after_connect = draw(st.booleans())
    return version, start_after_connect, bytes(wire)


@PROPERTY_TEST
@given(mutated_streams(), st.data())
def test_mutated_packets_raise_nothing_but_malformed_packet(case, data):
    version, as_client, wire = case
    # As a server (learning the version from the CONNECT) or as a client decoder.
    decoder = Decoder(version) if as_client else Decoder()
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6), label="cuts")
    packets_, _ = outcome(decoder, wire, cuts)
    for packet in packets_:
        assert packet.type in range(1, 16)


@PROPERTY_TEST
@given(ANY_DECODER_VERSION, st.one_of(st.binary(max_size=200), mutated_streams().map(
    lambda case: case[2])), st.data())
def test_decoding_does_not_depend_on_how_the_bytes_are_split(version, wire, data):
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8), label="cuts")
    assert outcome(Decoder(version), wire, cuts) == outcome(Decoder(version), wire, [])
    assert (outcome(Decoder(version), wire, list(range(len(wire))))
            == outcome(Decoder(version), wire, []))


# ---------------------------------------------------------------- strict rules

def check_refused(feed, decoder_factory, data: bytes, reason: int,
                  connack_v3: int | None = None) -> None:
    exc = refused(feed, decoder_factory(), data)
    assert exc.reason_code == reason, str(exc)
    assert exc.connack_v3 == connack_v3
    assert exc.packets == []


def client(version: int) -> Callable[[], Decoder]:
    return lambda: Decoder(version)


server = Decoder


@FEEDS
def test_remaining_length_of_more_than_four_bytes(feed):
    # 2.2.3: at most four bytes; the fifth is malformed whatever follows.
    check_refused(feed, client(MQTT_3_1_1), h("30 ff ff ff ff 7f"), MALFORMED)
    check_refused(feed, client(MQTT_5), h("30 80 80 80 80 01"), MALFORMED)
    check_refused(feed, server, h("10 80 80 80 80"), MALFORMED)


def test_remaining_length_of_four_bytes_is_refused_as_soon_as_the_fifth_is_announced():
    decoder = Decoder(MQTT_3_1_1)
    assert decoder.feed(h("30 ff ff ff")) == []
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(h("ff"))
    assert info.value.reason_code == MALFORMED


def _with_flags(data: bytes, flags: int) -> bytes:
    return bytes(((data[0] & 0xF0) | flags,)) + data[1:]


#: One valid packet of each type whose fixed-header flags are reserved (2.1.3).
RESERVED_FLAG_PACKETS = [
    (MQTT_3_1_1, Connack(), 0), (MQTT_5, Connack(), 0),
    (MQTT_3_1_1, Puback(1), 0), (MQTT_5, Puback(1, 0x10), 0),
    (MQTT_3_1_1, Pubrec(1), 0), (MQTT_3_1_1, Pubrel(1), 2), (MQTT_5, Pubrel(1, 0x92), 2),
    (MQTT_3_1_1, Pubcomp(1), 0),
    (MQTT_3_1_1, Subscribe(1, [Subscription("a")]), 2),
    (MQTT_5, Subscribe(1, [Subscription("a")]), 2),
    (MQTT_3_1_1, Suback(1, [0]), 0), (MQTT_5, Suback(1, [0]), 0),
    (MQTT_3_1_1, Unsubscribe(1, ["a"]), 2), (MQTT_5, Unsubscribe(1, ["a"]), 2),
    (MQTT_3_1_1, Unsuback(1), 0), (MQTT_5, Unsuback(1, [0]), 0),
    (MQTT_3_1_1, Pingreq(), 0), (MQTT_3_1_1, Pingresp(), 0),
    (MQTT_3_1_1, Disconnect(), 0), (MQTT_5, Disconnect(0x04), 0), (MQTT_5, Auth(0x18), 0),
]


@FEEDS
@pytest.mark.parametrize("version, packet, required", RESERVED_FLAG_PACKETS,
                         ids=[_exact_id((v, p, None)) for v, p, _ in RESERVED_FLAG_PACKETS])
def test_reserved_fixed_header_flags(feed, version, packet, required):
    data = encode(packet, version)
    assert data[0] & 0x0F == required
    assert Decoder(version).feed(data) == [packet]
    for flags in range(16):
        if flags != required:
            check_refused(feed, client(version), _with_flags(data, flags), MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_reserved_fixed_header_flags_of_connect(feed, version):
    data = encode(Connect("c", version), version)
    for flags in range(1, 16):
        check_refused(feed, server, _with_flags(data, flags), MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_publish_with_qos_3(feed, version):
    # [MQTT-3.3.1-4]: both QoS bits set is malformed.
    props = b"\x00" if version == MQTT_5 else b""
    check_refused(feed, client(version), _frame(0x36, _string(b"t") + b"\x00\x01" + props),
                  MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_dup_on_qos_0(feed, version):
    # [MQTT-3.3.1-2]: the DUP flag is 0 for all QoS 0 messages.
    data = encode(Publish("t", b"x"), version)
    check_refused(feed, client(version), _with_flags(data, 0x08), MALFORMED)
    check_refused(feed, client(version), _with_flags(data, 0x09), MALFORMED)


BAD_UTF8 = {
    "invalid byte": b"\xff",
    "lone continuation": b"\x80",
    "truncated sequence": b"\xe2\x82",
    "overlong slash": b"\xc0\xaf",  # [MQTT-1.5.4-1] / 1.5.3
    "encoded surrogate": b"\xed\xa0\x80",  # [MQTT-1.5.4-1]
    "beyond U+10FFFF": b"\xf4\x90\x80\x80",
    "null character": b"a\x00b",  # [MQTT-1.5.4-2]
}


def _string(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def _frame(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((first, len(body))) + body


def _connect_body(level: int, flags: int, payload: bytes, props: bytes = b"") -> bytes:
    name = b"MQIsdp" if level == MQTT_3_1 else b"MQTT"
    if level == MQTT_5 and not props:
        props = b"\x00"
    return _string(name) + bytes((level, flags)) + b"\x00\x3c" + props + payload


def _bad_string_packets(raw: bytes):
    """(version, decoder factory, bytes) with the string ``raw`` in every kind of string field."""
    bad = _string(raw)
    for version in (MQTT_3_1_1, MQTT_5):
        p = b"\x00" if version == MQTT_5 else b""
        yield version, client(version), _frame(0x30, bad + p + b"x")  # PUBLISH topic
        yield version, client(version), _frame(0x82, b"\x00\x01" + p + bad + b"\x00")  # filter
        yield version, client(version), _frame(0xA2, b"\x00\x01" + p + bad)  # UNSUBSCRIBE
        yield version, server, _frame(0x10, _connect_body(version, 0x02, bad))  # client id
        yield version, server, _frame(0x10, _connect_body(  # will topic
            version, 0x06, _string(b"c") + p + bad + _string(b"")))
        yield version, server, _frame(0x10, _connect_body(  # user name
            version, 0x82, _string(b"c") + bad))
    # 5.0 string properties: reason string, and user property name and value.
    yield MQTT_5, client(MQTT_5), _frame(0x40, b"\x00\x01\x10" + _varint_prefixed(b"\x1f" + bad))
    yield MQTT_5, client(MQTT_5), _frame(0xE0, b"\x00" + _varint_prefixed(
        b"\x26" + bad + _string(b"v")))
    yield MQTT_5, client(MQTT_5), _frame(0xE0, b"\x00" + _varint_prefixed(
        b"\x26" + _string(b"k") + bad))
    yield MQTT_5, client(MQTT_5), _frame(0x30, _string(b"t") + _varint_prefixed(
        b"\x03" + bad) + b"x")


def _varint_prefixed(block: bytes) -> bytes:
    return encode_varint(len(block)) + block


@FEEDS
@pytest.mark.parametrize("raw", BAD_UTF8.values(), ids=BAD_UTF8.keys())
def test_ill_formed_utf8_and_null_in_strings(feed, raw):
    # 5.0 1.5.4: a string with ill-formed UTF-8 or U+0000 is a Malformed Packet.
    for version, factory, data in _bad_string_packets(raw):
        check_refused(feed, factory, data, MALFORMED)


@FEEDS
def test_the_same_packets_with_well_formed_strings_decode(feed):
    # The guard of the test above: only the bad string makes those packets fail.
    for version, factory, data in _bad_string_packets("é\ufeff".encode()):
        assert len(feed(factory(), data)) == 1


@FEEDS
def test_byte_order_mark_is_kept(feed):
    # [MQTT-1.5.4-3]: 0xEF 0xBB 0xBF is U+FEFF and must not be stripped.
    assert feed(Decoder(MQTT_3_1_1), h("30 06 00 04 ef bb bf 61")) == [Publish("\ufeffa")]


DUPLICATE_PROPERTIES = {
    "PUBLISH message expiry": _frame(0x30, _string(b"t") + _varint_prefixed(
        h("02 00 00 00 01 02 00 00 00 02"))),
    "PUBLISH topic alias": _frame(0x30, _string(b"t") + _varint_prefixed(h("23 00 01 23 00 02"))),
    "SUBSCRIBE subscription identifier": _frame(0x82, b"\x00\x01" + _varint_prefixed(
        h("0b 01 0b 02")) + _string(b"a") + b"\x00"),
    "PUBACK reason string": _frame(0x40, b"\x00\x01\x00" + _varint_prefixed(
        b"\x1f" + _string(b"a") + b"\x1f" + _string(b"b"))),
    "DISCONNECT session expiry": _frame(0xE0, b"\x00" + _varint_prefixed(
        h("11 00 00 00 01 11 00 00 00 01"))),
    "AUTH method": _frame(0xF0, b"\x18" + _varint_prefixed(
        b"\x15" + _string(b"m") + b"\x15" + _string(b"m"))),
}


@FEEDS
@pytest.mark.parametrize("data", DUPLICATE_PROPERTIES.values(), ids=DUPLICATE_PROPERTIES.keys())
def test_property_twice_is_a_protocol_error(feed, data):
    # "It is a Protocol Error to include <property> more than once" (3.x.2.x of 5.0).
    check_refused(feed, client(MQTT_5), data, PROTOCOL_ERROR)


@FEEDS
@pytest.mark.parametrize("factory, data", [
    (server, _frame(0x10, _connect_body(MQTT_5, 0x02, _string(b"c"), _varint_prefixed(
        h("11 00 00 00 01 11 00 00 00 01"))))),
    (server, _frame(0x10, _connect_body(MQTT_5, 0x06, _string(b"c") + _varint_prefixed(
        h("18 00 00 00 01 18 00 00 00 01")) + _string(b"w") + _string(b"")))),
], ids=["CONNECT session expiry", "will delay"])
def test_property_twice_in_connect_is_a_protocol_error(feed, factory, data):
    check_refused(feed, factory, data, PROTOCOL_ERROR)


@FEEDS
def test_repeatable_properties_keep_their_order(feed):
    data = _frame(0x30, _string(b"t") + _varint_prefixed(
        b"\x26" + _string(b"k") + _string(b"2") + h("0b 07")
        + b"\x26" + _string(b"k") + _string(b"1") + h("0b 03 0b 07")) + b"x")
    assert feed(Decoder(MQTT_5), data) == [Publish("t", b"x", properties={
        "user_property": [("k", "2"), ("k", "1")], "subscription_identifier": [7, 3, 7]})]


NOT_ALLOWED_PROPERTIES = {
    "session expiry in PUBLISH": (client(MQTT_5), _frame(0x30, _string(b"t") + _varint_prefixed(
        h("11 00 00 00 01")))),
    "content type in PUBACK": (client(MQTT_5), _frame(0x40, b"\x00\x01\x00" + _varint_prefixed(
        b"\x03" + _string(b"a")))),
    "reason string in SUBSCRIBE": (client(MQTT_5), _frame(0x82, b"\x00\x01" + _varint_prefixed(
        b"\x1f" + _string(b"a")) + _string(b"a") + b"\x00")),
    "subscription identifier in UNSUBSCRIBE": (client(MQTT_5), _frame(
        0xA2, b"\x00\x01" + _varint_prefixed(h("0b 01")) + _string(b"a"))),
    "will delay in PUBLISH": (client(MQTT_5), _frame(0x30, _string(b"t") + _varint_prefixed(
        h("18 00 00 00 01")))),
    "topic alias in CONNECT": (server, _frame(0x10, _connect_body(
        MQTT_5, 0x02, _string(b"c"), _varint_prefixed(h("23 00 01"))))),
    "session expiry in will": (server, _frame(0x10, _connect_body(
        MQTT_5, 0x06, _string(b"c") + _varint_prefixed(h("11 00 00 00 01"))
        + _string(b"w") + _string(b"")))),
    "server keep alive in DISCONNECT": (client(MQTT_5), _frame(0xE0, b"\x00" + _varint_prefixed(
        h("13 00 01")))),
    "session expiry in AUTH": (client(MQTT_5), _frame(0xF0, b"\x18" + _varint_prefixed(
        h("11 00 00 00 01")))),
}


@FEEDS
@pytest.mark.parametrize("factory, data", NOT_ALLOWED_PROPERTIES.values(),
                         ids=NOT_ALLOWED_PROPERTIES.keys())
def test_property_not_allowed_in_the_packet(feed, factory, data):
    # 5.0 2.2.2.2: "A Control Packet which contains an Identifier which is not
    # valid for its packet type, or contains a value not of the specified data
    # type, is a Malformed Packet. If received, use a CONNACK or DISCONNECT
    # packet with Reason Code 0x81 (Malformed Packet)".
    exc = refused(feed, factory(), data)
    assert exc.reason_code == MALFORMED, str(exc)


@FEEDS
@pytest.mark.parametrize("identifier", ["00", "04", "0a", "14", "2b", "7f", "80 01"])
def test_unknown_property_identifier(feed, identifier):
    data = _frame(0x30, _string(b"t") + _varint_prefixed(h(identifier) + h("00 00 00 00")))
    check_refused(feed, client(MQTT_5), data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("block, reason", [
    ("01 02", PROTOCOL_ERROR),  # payload format indicator 2
    ("23 00 00", 0x94),  # topic alias 0: Topic Alias invalid (3.3.2.3.4, [MQTT-3.3.2-8])
    ("0b 00", PROTOCOL_ERROR),  # subscription identifier 0 (3.3.2.3.8)
], ids=["format indicator 2", "topic alias 0", "subscription identifier 0"])
def test_property_values_out_of_range_in_publish(feed, block, reason):
    data = _frame(0x30, _string(b"t") + _varint_prefixed(h(block)))
    check_refused(feed, client(MQTT_5), data, reason)


@FEEDS
@pytest.mark.parametrize("block", [
    "21 00 00",  # receive maximum 0 (3.1.2.11.3)
    "27 00 00 00 00",  # maximum packet size 0 (3.1.2.11.4)
    "17 02",  # request problem information 2 (3.1.2.11.7)
    "19 02",  # request response information 2 (3.1.2.11.6)
], ids=["receive maximum 0", "maximum packet size 0", "problem information 2",
        "response information 2"])
def test_property_values_out_of_range_in_connect(feed, block):
    data = _frame(0x10, _connect_body(MQTT_5, 0x02, _string(b"c"), _varint_prefixed(h(block))))
    check_refused(feed, server, data, PROTOCOL_ERROR)


@FEEDS
@pytest.mark.parametrize("data", [
    _frame(0x30, _string(b"t") + h("05 02 00 00")),  # block longer than the packet
    _frame(0x30, _string(b"t") + h("03 02 00 00")),  # four-byte value cut by the block
    _frame(0x30, _string(b"t") + h("04 03 00 05 61")),  # string longer than the block
    _frame(0x30, _string(b"t") + h("ff ff ff ff 7f")),  # property length over four bytes
    _frame(0x30, _string(b"t") + h("02 0b 80")),  # subscription identifier unfinished
], ids=["past packet", "value cut", "string cut", "long length", "varint cut"])
def test_property_block_overruns(feed, data):
    check_refused(feed, client(MQTT_5), data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [1, 2])
def test_publish_with_packet_id_0(feed, version, qos):
    # [MQTT-2.2.1-3] (5.0) / [MQTT-2.3.1-1] (3.1.1): a QoS > 0 PUBLISH has a non-zero id.
    props = b"\x00" if version == MQTT_5 else b""
    data = _frame(0x30 | qos << 1, _string(b"t") + b"\x00\x00" + props + b"x")
    check_refused(feed, client(version), data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("first, body", [
    (0x82, "00 00 00 01 61 00"), (0xA2, "00 00 00 01 61"),
    (0x40, "00 00"), (0x50, "00 00"), (0x62, "00 00"), (0x70, "00 00"),
], ids=["SUBSCRIBE", "UNSUBSCRIBE", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP"])
def test_packet_id_0(feed, version, first, body):
    data = h(body)
    if version == MQTT_5 and first in (0x82, 0xA2):
        data = data[:2] + b"\x00" + data[2:]
    check_refused(feed, client(version), _frame(first, data), MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("topic", ["+", "#", "a/+", "a/#", "a/b+", "sport#", "+/x"])
def test_wildcard_in_publish_topic(feed, version, topic):
    # [MQTT-3.3.2-2]: no wildcard characters in a PUBLISH topic name. The name
    # is malformed, not refused by policy (0x90): 0x82, Protocol Error, in 5.0.
    props = b"\x00" if version == MQTT_5 else b""
    data = _frame(0x30, _string(topic.encode()) + props + b"x")
    check_refused(feed, client(version), data, PROTOCOL_ERROR)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_wildcard_in_will_topic(feed, version):
    props = b"\x00" if version == MQTT_5 else b""
    data = _frame(0x10, _connect_body(version, 0x06, _string(b"c") + props + _string(b"w/#")
                                      + _string(b"")))
    check_refused(feed, server, data, PROTOCOL_ERROR)


@FEEDS
def test_empty_publish_topic(feed):
    # [MQTT-4.7.3-1]; in 5.0 an empty topic without a topic alias is a protocol error.
    check_refused(feed, client(MQTT_3_1_1), h("30 03 00 00 78"), MALFORMED)
    check_refused(feed, client(MQTT_5), h("30 04 00 00 00 78"), PROTOCOL_ERROR)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_and_unsubscribe_without_a_filter(feed, version):
    # [MQTT-3.8.3-3] / [MQTT-3.10.3-2] (3.1.1); "a SUBSCRIBE packet with no Payload
    # is a Protocol Error" (5.0 3.8.3).
    props = b"\x00" if version == MQTT_5 else b""
    check_refused(feed, client(version), _frame(0x82, b"\x00\x01" + props), PROTOCOL_ERROR)
    check_refused(feed, client(version), _frame(0xA2, b"\x00\x01" + props), PROTOCOL_ERROR)


@FEEDS
@pytest.mark.parametrize("options", [0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFC])
def test_reserved_subscription_option_bits_in_3_1_1(feed, options):
    # [MQTT-3-8.3-4]: the upper six bits of the requested QoS byte are reserved.
    data = _frame(0x82, b"\x00\x01" + _string(b"a") + bytes((options,)))
    check_refused(feed, client(MQTT_3_1_1), data, MALFORMED)
    check_refused(feed, client(MQTT_3_1), data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("options", [0x40, 0x80, 0xC0, 0x6E])
def test_reserved_subscription_option_bits_in_5(feed, options):
    # [MQTT-3.8.3-5]: reserved bits 6 and 7 set make the packet malformed.
    data = _frame(0x82, b"\x00\x01\x00" + _string(b"a") + bytes((options,)))
    check_refused(feed, client(MQTT_5), data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_subscription_with_qos_3(feed, version):
    props = b"\x00" if version == MQTT_5 else b""
    data = _frame(0x82, b"\x00\x01" + props + _string(b"a") + b"\x03")
    check_refused(feed, client(version), data, MALFORMED)


@FEEDS
def test_retain_handling_3(feed):
    # 5.0 3.8.3.1: "It is a Protocol Error to send a Retain Handling value of 3".
    data = _frame(0x82, b"\x00\x01\x00" + _string(b"a") + b"\x30")
    check_refused(feed, client(MQTT_5), data, PROTOCOL_ERROR)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_reserved_connect_flag(feed, version):
    # [MQTT-3.1.2-3]: the reserved flag is 0, otherwise the packet is malformed.
    data = _frame(0x10, _connect_body(version, 0x03, _string(b"c")))
    check_refused(feed, server, data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_will_qos_3(feed, version):
    # [MQTT-3.1.2-14] (3.1.1); "A value of 3 (0x03) is a Malformed Packet" (5.0 3.1.2.6).
    props = b"\x00" if version == MQTT_5 else b""
    data = _frame(0x10, _connect_body(version, 0x1E, _string(b"c") + props + _string(b"w")
                                      + _string(b"")))
    check_refused(feed, server, data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flags", [0x0A, 0x12, 0x22, 0x3A], ids=["qos1", "qos2", "retain", "all"])
def test_will_qos_or_retain_without_a_will(feed, version, flags):
    # [MQTT-3.1.2-13] / [MQTT-3.1.2-15] (3.1.1); [MQTT-3.1.2-11] / [MQTT-3.1.2-13] (5.0).
    data = _frame(0x10, _connect_body(version, flags, _string(b"c")))
    check_refused(feed, server, data, MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", [MQTT_3_1, MQTT_3_1_1])
def test_password_without_user_name_before_5(feed, version):
    # [MQTT-3.1.2-22]: if the user name flag is 0, the password flag is 0.
    data = _frame(0x10, _connect_body(version, 0x42, _string(b"c") + _string(b"pw")))
    check_refused(feed, server, data, MALFORMED)


@FEEDS
def test_will_payload_that_is_not_utf8_as_its_format_says(feed):
    data = _frame(0x10, _connect_body(MQTT_5, 0x06, _string(b"c") + h("02 01 01")
                                      + _string(b"w") + _string(b"\xff")))
    check_refused(feed, server, data, PAYLOAD_FORMAT_INVALID)


@FEEDS
@pytest.mark.parametrize("name, level", [
    (b"MQTX", 4), (b"mqtt", 4), (b"MQIsdP", 3), (b"", 4), (b"MQTT ", 5), (b"MQIsdp3", 3),
])
def test_unknown_protocol_name(feed, name, level):
    # [MQTT-3.1.2-1]: the server may close without a CONNACK, so no 3.1.1 return code.
    data = _frame(0x10, _string(name) + bytes((level,)) + h("02 00 3c 00 01 63"))
    exc = refused(feed, server(), data)
    assert exc.reason_code == UNSUPPORTED_PROTOCOL_VERSION
    assert exc.connack_v3 is None


@FEEDS
@pytest.mark.parametrize("name, level", [
    (b"MQTT", 6), (b"MQTT", 3), (b"MQTT", 0), (b"MQTT", 255), (b"MQIsdp", 4), (b"MQIsdp", 5),
])
def test_unsupported_protocol_level(feed, name, level):
    # [MQTT-3.1.2-2]: CONNACK return code 0x01 (3.1.1), reason 0x84 (5.0), then close.
    data = _frame(0x10, _string(name) + bytes((level,)) + h("02 00 3c 00 01 63"))
    check_refused(feed, server, data, UNSUPPORTED_PROTOCOL_VERSION, connack_v3=1)


@FEEDS
def test_packet_larger_than_the_maximum_is_refused_from_its_fixed_header(feed):
    # Only the fixed header is fed; the body never arrives. 30 64: 2 + 100 bytes.
    exc = refused(feed, Decoder(MQTT_5, max_packet_size=100), h("30 64"))
    assert exc.reason_code == PACKET_TOO_LARGE
    exc = refused(feed, Decoder(MQTT_5, max_packet_size=100), h("30 ff 01"))  # 3 + 255
    assert exc.reason_code == PACKET_TOO_LARGE
    exc = refused(feed, Decoder(max_packet_size=1000), h("10 ff ff ff 7f"))
    assert exc.reason_code == PACKET_TOO_LARGE


def test_packet_size_counts_the_fixed_header():
    # 5.0 3.1.2.11.4: the Maximum Packet Size is the total packet size.
    packet = Publish("t", b"x" * 94)  # 2 + 3 + 1 + 94 = 100 in all
    data = encode(packet, MQTT_5)
    assert len(data) == 100
    assert Decoder(MQTT_5, max_packet_size=100).feed(data) == [packet]
    with pytest.raises(MalformedPacket) as info:
        Decoder(MQTT_5, max_packet_size=99).feed(data[:2])
    assert info.value.reason_code == PACKET_TOO_LARGE


def test_oversized_packet_after_valid_ones_in_the_same_read():
    decoder = Decoder(MQTT_3_1_1, max_packet_size=10)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(h("c0 00 40 02 00 01 30 7f"))
    assert info.value.reason_code == PACKET_TOO_LARGE
    assert info.value.packets == [Pingreq(), Puback(1)]


BEFORE_CONNECT = [
    Connack(), Publish("t", b"x"), Publish("t", b"x", 1, packet_id=1), Puback(1), Pubrec(1),
    Pubrel(1), Pubcomp(1), Subscribe(1, [Subscription("a")]), Suback(1, [0]),
    Unsubscribe(1, ["a"]), Unsuback(1), Pingreq(), Pingresp(), Disconnect(),
]


@FEEDS
@pytest.mark.parametrize("packet", BEFORE_CONNECT,
                         ids=[f"{type(p).__name__}-qos{getattr(p, 'qos', 0)}"
                              for p in BEFORE_CONNECT])
def test_packet_before_connect_on_a_server_decoder(feed, packet):
    # [MQTT-3.1.0-1]: the first packet from a client is CONNECT; a server-side
    # decoder has no version before it, and refuses anything else as a protocol error.
    check_refused(feed, server, encode(packet, MQTT_3_1_1), PROTOCOL_ERROR)


@FEEDS
def test_auth_before_connect_on_a_server_decoder(feed):
    check_refused(feed, server, h("f0 00"), PROTOCOL_ERROR)


@FEEDS
@pytest.mark.parametrize("version", [MQTT_3_1, MQTT_3_1_1])
def test_auth_before_5(feed, version):
    # AUTH (type 15) is reserved before 5.0 ([MQTT-2.2.1-1] of 3.1.1: forbidden type).
    check_refused(feed, client(version), h("f0 00"), MALFORMED)
    check_refused(feed, lambda: connected(version), h("f0 00"), MALFORMED)


@FEEDS
@pytest.mark.parametrize("version", VERSIONS)
def test_reserved_packet_type_0(feed, version):
    check_refused(feed, client(version), h("00 00"), MALFORMED)


@FEEDS
@pytest.mark.parametrize("version, data", [
    (MQTT_3_1_1, h("c0 01 00")),  # PINGREQ with a body
    (MQTT_3_1_1, h("d0 01 00")),
    (MQTT_3_1_1, h("40 03 00 01 00")),  # 3.1.1 PUBACK with a reason code
    (MQTT_3_1_1, h("40 01 00")),  # PUBACK cut inside its packet id
    (MQTT_3_1_1, h("e0 01 00")),  # 3.1.1 DISCONNECT with a body
    (MQTT_3_1_1, h("b0 03 00 01 00")),  # 3.1.1 UNSUBACK with a reason code
    (MQTT_3_1_1, h("20 03 00 00 00")),  # 3.1.1 CONNACK with a property block
    (MQTT_3_1_1, h("20 02 02 00")),  # reserved CONNACK acknowledge flag
    (MQTT_5, h("40 05 00 01 00 00 ff")),  # bytes after the property block
    (MQTT_5, h("e0 03 00 00 ff")),
    (MQTT_3_1_1, h("30 04 00 05 61 62")),  # topic longer than the packet
    (MQTT_3_1_1, h("32 04 00 01 74 00")),  # packet id cut
    (MQTT_3_1_1, h("82 05 00 01 00 01 61")),  # subscription without its options byte
    (MQTT_3_1_1, h("a2 04 00 01 00 05")),  # filter longer than the packet
], ids=["pingreq", "pingresp", "puback reason", "puback cut", "disconnect body",
        "unsuback reason", "connack props", "connack flags", "puback extra", "disconnect extra",
        "topic cut", "packet id cut", "options cut", "filter cut"])
def test_packets_with_bytes_missing_or_left_over(feed, version, data):
    check_refused(feed, client(version), data, MALFORMED)


@FEEDS
def test_connect_with_bytes_missing_or_left_over(feed):
    check_refused(feed, server, CONNECT_3_1_1[:1] + bytes((CONNECT_3_1_1[1] + 1,))
                  + CONNECT_3_1_1[2:] + b"\x00", MALFORMED)
    check_refused(feed, server, _frame(0x10, _connect_body(MQTT_3_1_1, 0x82, _string(b"c"))),
                  MALFORMED)  # user name flag without a user name
    check_refused(feed, server, _frame(0x10, _connect_body(MQTT_3_1_1, 0x06, _string(b"c")
                                                           + _string(b"w"))),
                  MALFORMED)  # will without its payload


# ---------------------------------------------------------------- errors and packets before them

def test_packets_before_a_malformed_one_in_the_same_read_are_kept():
    decoder = Decoder(MQTT_3_1_1)
    good = h("c0 00 40 02 00 01 30 07 00 03 61 2f 62 68 69")
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(good + h("36 05 00 01 74 00 01") + h("d0 00"))
    assert info.value.packets == [Pingreq(), Puback(1), Publish("a/b", b"hi")]
    assert info.value.reason_code == MALFORMED


def test_packets_before_a_malformed_one_include_one_completed_from_an_earlier_read():
    decoder = Decoder(MQTT_5)
    assert decoder.feed(h("40 03 00")) == []
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(h("01 10 e0 00 30 05 00 01 23 00 78"))
    assert info.value.packets == [Puback(1, 0x10), Disconnect()]
    assert info.value.reason_code == PROTOCOL_ERROR


def test_packets_before_an_error_on_a_server_decoder_include_the_connect():
    decoder = Decoder()
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(CONNECT_3_1_1 + h("c0 00 f0 00"))
    assert info.value.packets == [Connect("c", MQTT_3_1_1, keepalive=60), Pingreq()]


def test_error_raised_alone_has_no_packets():
    with pytest.raises(MalformedPacket) as info:
        Decoder(MQTT_3_1_1).feed(h("c0 01 00 c0 00"))
    assert info.value.packets == []
