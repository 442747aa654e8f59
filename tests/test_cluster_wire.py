"""The NATS wire codec (cluster/wire.py): exact bytes, incremental decoding,
strictness, random input, and a real nats-server at the other end.

As in test_codec.py, every decoding case is fed three ways: whole, one byte at
a time, and followed by the first bytes of a following message (which must
stay buffered until the rest arrives). Expected bytes are written by hand
from the protocol's description, never produced by the encoder under test.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats_peer import NatsServer, nats_cluster, poll
from tls_helpers import plain_socket

from bastionmq.cluster import wire
from bastionmq.cluster.wire import (
    MAX_CONTROL_LINE, NO_RESPONDERS, Err, Event, Info, Msg, NatsParser, Ok, Ping, Pong,
    WireError, encode_headers, parse_headers, parse_status,
)

#: Tests never assert timings, so hypothesis's per-example deadline is off.
PROPERTY_TEST = settings(deadline=None, max_examples=150,
                         suppress_health_check=[HealthCheck.too_slow])

TIMEOUT = 10.0


# ---------------------------------------------------------------- feeding

#: A PING: what follows a case in feed_with_following.
FOLLOWING = b"PING\r\n"


def feed_whole(parser: NatsParser, data: bytes) -> list[Event]:
    return parser.feed(data)


def feed_bytewise(parser: NatsParser, data: bytes) -> list[Event]:
    events = []
    for index in range(len(data)):
        events += parser.feed(data[index:index + 1])
    return events


def feed_with_following(parser: NatsParser, data: bytes) -> list[Event]:
    """``data`` and the first half of a PING in one read: the PING must come
    out, whole, once its second half is fed."""
    events = parser.feed(data + FOLLOWING[:3])
    assert parser.buffered == 3
    assert parser.feed(FOLLOWING[3:]) == [Ping()]
    assert parser.buffered == 0
    return events


FEEDERS = [feed_whole, feed_bytewise, feed_with_following]


def decode(data: bytes, feeder: Callable[[NatsParser, bytes], list[Event]] = feed_whole,
           parser: NatsParser | None = None) -> list[Event]:
    parser = parser or NatsParser()
    events = feeder(parser, data)
    assert parser.buffered == 0
    return events


# ---------------------------------------------------------------- decoding

HEADERS = b"NATS/1.0\r\nBmq-Qos: 1\r\nNats-Msg-Id: abc\r\n\r\n"  # 10 + 12 + 18 + 2 = 42

CASES = [
    pytest.param(b'INFO {"server_id":"X","max_payload":1048576,"headers":true}\r\n',
                 [Info({"server_id": "X", "max_payload": 1048576, "headers": True})], id="info"),
    pytest.param(b"MSG a.b 1 2\r\nhi\r\n", [Msg("a.b", 1, None, b"hi")], id="msg"),
    pytest.param(b"MSG a.b 12 _INBOX.x.1 3\r\nabc\r\n", [Msg("a.b", 12, "_INBOX.x.1", b"abc")],
                 id="msg-reply"),
    pytest.param(b"MSG a 1 0\r\n\r\n", [Msg("a", 1, None, b"")], id="msg-empty"),
    pytest.param(b"MSG a 1 8\r\nMSG\r\nx 1\r\n", [Msg("a", 1, None, b"MSG\r\nx 1")],
                 id="msg-crlf-in-payload"),
    pytest.param(b"MSG \xc3\xa9t\xc3\xa9.x 7 2\r\nhi\r\n", [Msg("\u00e9t\u00e9.x", 7, None, b"hi")],
                 id="msg-utf8-subject"),
    pytest.param(b"HMSG a.b 3 42 44\r\n" + HEADERS + b"hi\r\n",
                 [Msg("a.b", 3, None, b"hi", HEADERS)], id="hmsg"),
    pytest.param(b"HMSG a.b 3 r.1 42 42\r\n" + HEADERS + b"\r\n",
                 [Msg("a.b", 3, "r.1", b"", HEADERS)], id="hmsg-reply-no-payload"),
    pytest.param(b"HMSG _INBOX.r.1 9 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
                 [Msg("_INBOX.r.1", 9, None, b"", b"NATS/1.0 503\r\n\r\n")], id="hmsg-503"),
    pytest.param(b"PING\r\n", [Ping()], id="ping"),
    pytest.param(b"PONG\r\n", [Pong()], id="pong"),
    pytest.param(b"+OK\r\n", [Ok()], id="ok"),
    pytest.param(b"-ERR 'Unknown Protocol Operation'\r\n", [Err("Unknown Protocol Operation")],
                 id="err"),
    pytest.param(b"-ERR\r\n", [Err("")], id="err-empty"),
    # Verbs are case-insensitive; arguments are split by any run of spaces and tabs.
    pytest.param(b"msg\ta.b  \t 1 \t2\r\nhi\r\n", [Msg("a.b", 1, None, b"hi")],
                 id="msg-lower-tabs"),
    pytest.param(b"hMsG a 2 16 18\r\nNATS/1.0 503\r\n\r\nhi\r\n",
                 [Msg("a", 2, None, b"hi", b"NATS/1.0 503\r\n\r\n")], id="hmsg-mixed-case"),
    pytest.param(b"ping\r\npong\r\n+ok\r\n-err 'x y'\r\ninfo\t{} \r\n",
                 [Ping(), Pong(), Ok(), Err("x y"), Info({})], id="lower-case-controls"),
]


@pytest.mark.parametrize("feeder", FEEDERS)
@pytest.mark.parametrize("data,expected", CASES)
def test_decode(data, expected, feeder):
    assert decode(data, feeder) == expected


def test_the_shared_events_compare_like_new_ones():
    assert NatsParser().feed(b"PING\r\nPONG\r\n+OK\r\n") == [Ping(), Pong(), Ok()]
    assert Ping() != Pong()


def stream_of(count: int) -> tuple[bytes, list[Event]]:
    """A stream of every kind of server line, ``count`` messages of each kind."""
    data = bytearray(b'INFO {"max_payload":1000}\r\n')
    expected: list[Event] = [Info({"max_payload": 1000})]
    for index in range(count):
        payload = b"p%d\r\n" % index
        data += b"MSG dev.%d %d %d\r\n%b\r\n" % (index, index, len(payload), payload)
        expected.append(Msg(f"dev.{index}", index, None, payload))
        data += b"HMSG dev.%d %d in.%d 42 %d\r\n%b%b\r\n" % (
            index, index, index, 42 + len(payload), HEADERS, payload)
        expected.append(Msg(f"dev.{index}", index, f"in.{index}", payload, HEADERS))
        data += b"PING\r\nPONG\r\n"
        expected += [Ping(), Pong()]
    return bytes(data), expected


def test_many_messages_in_one_read():
    data, expected = stream_of(300)
    assert decode(data) == expected


def test_a_stream_split_at_every_point():
    data, expected = stream_of(3)
    for cut in range(len(data) + 1):
        parser = NatsParser()
        assert parser.feed(data[:cut]) + parser.feed(data[cut:]) == expected, cut
        assert parser.buffered == 0


@pytest.mark.parametrize("feeder", FEEDERS)
def test_a_stream_fed_three_ways(feeder):
    data, expected = stream_of(20)
    assert decode(data, feeder) == expected


@pytest.mark.parametrize("feeder", FEEDERS)
def test_on_message_takes_the_plain_messages_as_they_are_decoded(feeder):
    """With ``on_message``, a MSG without headers or reply subject is a call,
    not an event; the others are events as before, in their order."""
    data, expected = stream_of(20)
    called: list[Event] = []
    parser = NatsParser(on_message=lambda subject, sid, payload: called.append(
        Msg(subject, sid, None, payload)))
    events = feeder(parser, data)
    assert parser.buffered == 0
    plain = [e for e in expected if type(e) is Msg and e.headers is None and e.reply is None]
    assert called == plain
    assert events == [e for e in expected if not any(e is p for p in plain)]


def test_a_partial_message_stays_buffered():
    parser = NatsParser()
    assert parser.feed(b"MSG a 1 5\r\nhel") == []
    assert parser.buffered == 3  # the payload so far; the line is parsed, not kept
    assert parser.feed(b"lo") == []
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\nMSG b 2 1\r\nx\r\nPI") == [Msg("a", 1, None, b"hello"),
                                                    Msg("b", 2, None, b"x")]
    assert parser.buffered == 2
    assert parser.feed(b"NG\r\n") == [Ping()]


def test_a_large_payload_is_not_read_as_lines():
    """A payload longer than any control line, fed in pieces, is only
    counted: its bytes are never searched for a line end nor limited as one."""
    payload = bytes(range(256)) * 40  # 10240 bytes, with CR and LF here and there
    data = b"MSG big 1 %d\r\n%b\r\n" % (len(payload), payload)
    parser = NatsParser()
    events = []
    for start in range(0, len(data), 1000):
        events += parser.feed(data[start:start + 1000])
    assert events == [Msg("big", 1, None, payload)]


def test_a_bytearray_or_memoryview_gives_bytes():
    events = NatsParser().feed(bytearray(b"MSG a 1 2\r\nhi\r\n"))
    assert events == [Msg("a", 1, None, b"hi")] and type(events[0].payload) is bytes
    events = NatsParser().feed(memoryview(b"HMSG a 1 16 18\r\nNATS/1.0 503\r\n\r\nhi\r\n"))
    assert type(events[0].payload) is bytes and type(events[0].headers) is bytes


# ---------------------------------------------------------------- headers

def test_parse_headers():
    assert parse_headers(HEADERS) == {"Bmq-Qos": "1", "Nats-Msg-Id": "abc"}
    assert parse_status(HEADERS) is None
    assert parse_headers(b"NATS/1.0\r\nA:b\r\nA:  c \r\nB-c: x: y\r\n\r\n") == {
        "A": "b, c", "B-c": "x: y"}
    assert parse_headers(b"NATS/1.0\r\n\r\n") == {}


def test_parse_status():
    assert parse_status(b"NATS/1.0 503\r\n\r\n") == (NO_RESPONDERS, "")
    assert parse_status(b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n") == (
        408, "Request Timeout")
    assert parse_headers(b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n") == {
        "Nats-Pending-Messages": "1"}
    assert Msg("a", 1, None, b"", b"NATS/1.0 503\r\n\r\n").status == 503
    assert Msg("a", 1, None, b"", HEADERS).status is None
    assert Msg("a", 1, None, b"").status is None


@pytest.mark.parametrize("raw", [
    b"", b"NATS/1.0\r\n", b"HTTP/1.0\r\n\r\n", b"NATS/1.0x\r\n\r\n", b"NATS/1.0\r\nA\r\n\r\n",
    b"NATS/1.0\r\n: v\r\n\r\n", b"NATS/1.0\r\nA b: v\r\n\r\n", b"NATS/1.0\r\n\xff: v\r\n\r\n",
])
def test_malformed_headers(raw):
    with pytest.raises(WireError):
        parse_headers(raw)


@pytest.mark.parametrize("raw", [b"NATS/1.0 5\r\n\r\n", b"NATS/1.0 abc\r\n\r\n",
                                 b"NATS/1.0 5030\r\n\r\n"])
def test_malformed_status(raw):
    with pytest.raises(WireError):
        parse_status(raw)


# ---------------------------------------------------------------- strictness

@pytest.mark.parametrize("data", [
    pytest.param(b"\r\n", id="empty-line"),
    pytest.param(b"  \t\r\n", id="blank-line"),
    pytest.param(b"HELLO\r\n", id="unknown-verb"),
    pytest.param(b"PUB a 1\r\nx\r\n", id="client-verb"),
    pytest.param(b"MSG a 1\r\n", id="msg-too-few"),
    pytest.param(b"MSG a 1 r s 2\r\nhi\r\n", id="msg-too-many"),
    pytest.param(b"MSG a x 2\r\nhi\r\n", id="msg-sid-not-a-number"),
    pytest.param(b"MSG a 1 two\r\nhi\r\n", id="msg-size-not-a-number"),
    pytest.param(b"MSG a 1 -2\r\nhi\r\n", id="msg-negative-size"),
    pytest.param(b"MSG a 1 r -2\r\nhi\r\n", id="msg-reply-negative-size"),
    pytest.param(b"MSG \xff 1 2\r\nhi\r\n", id="msg-subject-not-utf8"),
    pytest.param(b"MSG a 1 \xff 2\r\nhi\r\n", id="msg-reply-not-utf8"),
    pytest.param(b"MSG a 1 2\r\nhiX\r\n", id="msg-longer-than-said"),
    pytest.param(b"MSG a 1 r 2\r\nhiX\r\n", id="msg-reply-longer-than-said"),
    pytest.param(b"HMSG a 1 2\r\nhi\r\n", id="hmsg-one-size"),
    pytest.param(b"HMSG a 1 18 16\r\nNATS/1.0 503\r\n\r\nhi\r\n", id="hmsg-header-over-total"),
    pytest.param(b"HMSG a 1 0 2\r\nhi\r\n", id="hmsg-no-header"),
    pytest.param(b"PING x\r\n", id="ping-argument"),
    pytest.param(b"+OK now\r\n", id="ok-argument"),
    pytest.param(b"INFO {\r\n", id="info-not-json"),
    pytest.param(b"INFO [1]\r\n", id="info-not-object"),
    pytest.param(b"INFO\r\n", id="info-empty"),
    pytest.param(b"INFO " + b"[" * 3000 + b"\r\n", id="info-deep"),
])
@pytest.mark.parametrize("feeder", [feed_whole, feed_bytewise])
def test_malformed(data, feeder):
    with pytest.raises(WireError):
        feeder(NatsParser(), data)


def test_the_events_before_an_error_come_with_it():
    with pytest.raises(WireError) as caught:
        NatsParser().feed(b"PING\r\nMSG a 1 2\r\nhi\r\nBOGUS\r\n")
    assert caught.value.events == [Ping(), Msg("a", 1, None, b"hi")]


def test_a_control_line_is_bounded():
    parser = NatsParser()
    parser.feed(b"MSG " + b"a" * (MAX_CONTROL_LINE - 10))
    with pytest.raises(WireError, match="longer than 4096"):
        for _ in range(20):
            parser.feed(b"a")
    # Refused as soon as it is too long, even within one read.
    with pytest.raises(WireError):
        NatsParser().feed(b"X" * (MAX_CONTROL_LINE + 1))
    with pytest.raises(WireError):
        NatsParser().feed(b"MSG " + b"a" * MAX_CONTROL_LINE + b" 1 2\r\nhi\r\n")


def test_info_may_be_longer_than_a_control_line():
    info = {"connect_urls": [f"10.0.0.{index}:4222" for index in range(500)]}
    data = b"INFO " + json.dumps(info).encode() + b"\r\n"
    assert len(data) > 2 * MAX_CONTROL_LINE
    assert decode(data, feed_bytewise) == [Info(info)]


def test_max_payload_comes_from_info():
    parser = NatsParser()
    assert parser.feed(b'INFO {"max_payload":8}\r\nMSG a 1 8\r\n12345678\r\n') == [
        Info({"max_payload": 8}), Msg("a", 1, None, b"12345678")]
    assert parser.max_payload == 8
    # Refused from the control line alone, before any of the body is buffered.
    with pytest.raises(WireError, match="9 bytes"):
        parser.feed(b"MSG a 1 9\r\n")
    with pytest.raises(WireError):
        NatsParser(max_payload=8).feed(b"HMSG a 1 5 9\r\n")
    # An INFO without a usable max_payload keeps the one there is.
    parser = NatsParser(max_payload=100)
    parser.feed(b'INFO {"max_payload":"x"}\r\n')
    assert parser.max_payload == 100


# ---------------------------------------------------------------- encoding

def test_encode_pub():
    assert wire.pub("a.b", b"hi") == b"PUB a.b 2\r\nhi\r\n"
    assert wire.pub("a.b", b"hi", reply="_INBOX.1") == b"PUB a.b _INBOX.1 2\r\nhi\r\n"
    assert wire.pub("a", b"") == b"PUB a 0\r\n\r\n"
    assert wire.pub("\u00e9", b"x\r\n") == b"PUB \xc3\xa9 3\r\nx\r\n\r\n"


def test_encode_hpub():
    block = b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n"  # 10 + 17 + 2 = 29
    assert encode_headers({"Nats-Msg-Id": "m1"}) == block
    assert wire.hpub("a.b", {"Nats-Msg-Id": "m1"}, b"hi") == (
        b"HPUB a.b 29 31\r\n" + block + b"hi\r\n")
    assert wire.hpub("a.b", block, b"hi", reply="r") == b"HPUB a.b r 29 31\r\n" + block + b"hi\r\n"
    assert wire.hpub("a", {}, b"") == b"HPUB a 12 12\r\nNATS/1.0\r\n\r\n\r\n"
    assert encode_headers({"A": "1", "B": "x y"}) == b"NATS/1.0\r\nA: 1\r\nB: x y\r\n\r\n"


def test_encode_sub_unsub_ping_pong():
    assert wire.sub("a.>", 5) == b"SUB a.> 5\r\n"
    assert wire.sub("a.*", 6, queue="workers") == b"SUB a.* workers 6\r\n"
    assert wire.unsub(5) == b"UNSUB 5\r\n"
    assert wire.unsub(5, max_msgs=10) == b"UNSUB 5 10\r\n"
    assert wire.ping() == b"PING\r\n"
    assert wire.pong() == b"PONG\r\n"


def test_encode_connect():
    command = wire.connect()
    assert command.startswith(b"CONNECT {") and command.endswith(b"}\r\n")
    assert command.count(b"\r\n") == 1
    options = json.loads(command[len(b"CONNECT "):])
    assert options["verbose"] is False and options["pedantic"] is False
    assert options["headers"] is True and options["no_responders"] is True
    assert options["protocol"] == 1 and options["echo"] is True
    assert not {"name", "user", "pass", "auth_token"} & options.keys()
    options = json.loads(wire.connect({"verbose": True, "tls_required": False}, name="node-1",
                                      echo=False, user="u", password="p", token="t")[8:])
    assert options["verbose"] is True and options["tls_required"] is False
    assert (options["name"], options["echo"], options["user"], options["pass"],
            options["auth_token"]) == ("node-1", False, "u", "p", "t")


@pytest.mark.parametrize("subject", ["", "a b", "a\tb", "a\r\nPUB x 1", "a\n", " a", "a\x0b"])
def test_a_subject_is_one_token(subject):
    with pytest.raises(WireError):
        wire.pub(subject, b"")
    with pytest.raises(WireError):
        wire.pub("a", b"", reply=subject)
    with pytest.raises(WireError):
        wire.hpub(subject, {}, b"")
    with pytest.raises(WireError):
        wire.sub(subject, 1)
    with pytest.raises(WireError):
        wire.sub("a", 1, queue=subject)


@pytest.mark.parametrize("headers", [{"": "v"}, {"A:B": "v"}, {"A B": "v"}, {"A": "v\r\nB: w"},
                                     {"A": "v\n"}, {"A\r\n": "v"}])
def test_a_header_cannot_break_its_block(headers):
    with pytest.raises(WireError):
        encode_headers(headers)


def test_what_hpub_sends_decodes_as_sent():
    command = wire.hpub("a.b", {"Nats-Msg-Id": "m1", "X": "y"}, b"payload", reply="r.1")
    # The server sends it back as HMSG with the same sizes after the sid.
    delivered = command.replace(b"HPUB a.b", b"HMSG a.b 4", 1)
    (msg,) = NatsParser().feed(delivered)
    assert (msg.subject, msg.sid, msg.reply, msg.payload) == ("a.b", 4, "r.1", b"payload")
    assert parse_headers(msg.headers) == {"Nats-Msg-Id": "m1", "X": "y"}


# ---------------------------------------------------------------- properties

TOKENS = st.sampled_from(["a", "b", "dev", "_INBOX", "$JS", "x1", "\u00e9", "*", ">"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=4).map(".".join)
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
SEPARATORS = st.sampled_from([" ", "\t", "  ", " \t "])


def verb_cases(verb: str) -> st.SearchStrategy[str]:
    return st.sampled_from([verb, verb.lower(), verb.title()])


@st.composite
def server_lines(draw) -> tuple[bytes, Event]:
    """One line (and body) as a server sends it, with the event it decodes to;
    verbs in any case, arguments split by any whitespace."""
    kind = draw(st.sampled_from(["MSG", "HMSG", "PING", "PONG", "+OK"]))
    if kind in ("PING", "PONG", "+OK"):
        event = {"PING": Ping(), "PONG": Pong(), "+OK": Ok()}[kind]
        return draw(verb_cases(kind)).encode() + b"\r\n", event
    subject = draw(SUBJECTS)
    sid = draw(st.integers(0, 2**40))
    reply = draw(st.none() | SUBJECTS)
    payload = draw(st.binary(max_size=40) | st.sampled_from([b"\r\n", b"MSG a 1 2\r\nhi\r\n"]))
    headers = None
    sizes = [str(len(payload))]
    if kind == "HMSG":
        if draw(st.booleans()):
            headers = b"NATS/1.0 503\r\n\r\n"
        else:
            fields = draw(st.dictionaries(st.sampled_from(["A", "Nats-Msg-Id", "X-y"]),
                                          HEADER_VALUES, max_size=3))
            headers = ("NATS/1.0\r\n" + "".join(f"{key}: {value}\r\n"
                                                 for key, value in fields.items())
                       + "\r\n").encode()
        sizes = [str(len(headers)), str(len(headers) + len(payload))]
    args = [draw(verb_cases(kind)), subject, str(sid)] + ([reply] if reply else []) + sizes
    line = "".join(arg + draw(SEPARATORS) for arg in args[:-1]) + args[-1]
    data = line.encode() + b"\r\n" + (headers or b"") + payload + b"\r\n"
    return data, Msg(subject, sid, reply, payload, headers)


def feed_in_pieces(parser: NatsParser, data: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    previous = 0
    for cut in sorted(cuts) + [len(data)]:
        events += parser.feed(data[previous:cut])
        previous = cut
    return events


@PROPERTY_TEST
@given(st.lists(server_lines(), max_size=12), st.data())
def test_any_stream_split_anywhere_decodes_the_same(lines, data):
    stream = b"".join(raw for raw, _ in lines)
    expected = [event for _, event in lines]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    parser = NatsParser()
    assert feed_in_pieces(parser, stream, cuts) == expected
    assert parser.buffered == 0
    assert NatsParser().feed(stream) == expected


#: Fragments of real lines, so that random input gets past the verb often.
FRAGMENTS = st.sampled_from([b"MSG", b"HMSG", b"INFO", b"PING", b"-ERR", b"+OK", b" ", b"\t",
                             b"\r\n", b"\r", b"\n", b"a.b", b"1", b"0", b"-1", b"16", b"99999",
                             b"{", b"}", b"[", b"NATS/1.0 503\r\n\r\n", b"\xff", b"_"])


@PROPERTY_TEST
@given(st.binary(max_size=300) | st.lists(FRAGMENTS, max_size=40).map(b"".join), st.data())
def test_random_bytes_raise_nothing_but_wire_error(garbage, data):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=8))
    parser = NatsParser()
    try:
        events = feed_in_pieces(parser, garbage, cuts)
    except WireError:
        return
    for event in events:
        if isinstance(event, Msg) and event.headers is not None:
            try:
                parse_headers(event.headers)
                parse_status(event.headers)
            except WireError:
                pass


# ---------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def nats(tmp_path_factory):
    """One nats-server with JetStream for the module's tests (streams are
    named per test)."""
    with NatsServer(tmp_path_factory.mktemp("nats"), "single", jetstream=True) as server:
        yield server


_CLIENT_IDS = itertools.count()


class Client:
    """A client connection on a blocking socket, decoded by NatsParser: the
    smallest thing that talks to nats-server through the codec."""

    def __init__(self, server: NatsServer, **connect: Any) -> None:
        self.sock = plain_socket(server.port)  # closed after the test (conftest)
        self.parser = NatsParser()
        self.events: list[Event] = []
        self.requests = 0
        # Each client its own inbox: a reply goes to every subscriber of its subject.
        self.inbox = f"_INBOX.test{next(_CLIENT_IDS)}"
        self.info = self.expect(Info).info
        self.send(wire.connect(name="test", **connect), wire.sub(f"{self.inbox}.*", 999))
        self.flush()

    def send(self, *commands: bytes) -> None:
        self.sock.sendall(b"".join(commands))

    def expect(self, match: type | Callable[[Event], bool], timeout: float = TIMEOUT) -> Any:
        """The first event (received or to come) that is a ``match`` or
        satisfies it, taken out of ``events``."""
        test = (lambda event: isinstance(event, match)) if isinstance(match, type) else match
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if test(event):
                    return self.events.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not received within {timeout} s; got {self.events}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"the server closed the connection; got {self.events}")
            self.events += self.parser.feed(data)

    def flush(self) -> list[Event]:
        """PING, and every event received before the PONG: once it is here,
        the server has handled (and delivered) all that was sent before."""
        self.send(wire.ping())
        self.expect(Pong)
        events, self.events = self.events, []
        return events

    def request(self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None,
                timeout: float = TIMEOUT) -> Msg:
        self.requests += 1
        inbox = f"{self.inbox}.{self.requests}"
        if headers is None:
            self.send(wire.pub(subject, payload, reply=inbox))
        else:
            self.send(wire.hpub(subject, headers, payload, reply=inbox))
        return self.expect(lambda event: isinstance(event, Msg) and event.subject == inbox,
                           timeout)

    def js(self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None,
           retry_503: bool = False) -> Any:
        """A request answered with JSON: the JetStream API and its PubAcks;
        with ``retry_503``, None when nothing listens (yet)."""
        reply = self.request(subject, payload, headers)
        if retry_503 and reply.status == NO_RESPONDERS:
            return None
        assert reply.status is None, reply
        return json.loads(reply.payload)


def test_connect_sub_pub_ping_over_a_socket(nats):
    sock = plain_socket(nats.port)
    parser = NatsParser()
    sock.sendall(wire.connect(name="raw") + wire.sub("greet.*", 1) +
                 wire.pub("greet.you", b"hello", reply="answer.here") + wire.ping())
    events: list[Event] = []
    while not events or not isinstance(events[-1], Pong):
        data = sock.recv(65536)
        assert data, events
        events += parser.feed(data)
    info, msg, pong = events
    assert isinstance(info, Info)
    assert info.info["port"] == nats.port and info.info["headers"] is True
    assert parser.max_payload == info.info["max_payload"] == 1024 * 1024
    assert msg == Msg("greet.you", 1, "answer.here", b"hello")
    assert pong == Pong()


def test_hpub_arrives_as_hmsg_with_its_headers(nats):
    client = Client(nats)
    headers = {"Bmq-Qos": "1", "Bmq-Topic": "a/b c", "Nats-Msg-Id": "x"}
    large = bytes(range(256)) * 1200  # 300 KB: many reads, one message
    client.send(wire.sub("hdr.>", 1), wire.hpub("hdr.a", headers, b"payload"),
                wire.hpub("hdr.b", headers, large, reply="r.1"), wire.pub("hdr.c", b"plain"))
    first, second, third = client.flush()
    assert first == Msg("hdr.a", 1, None, b"payload", encode_headers(headers))
    assert parse_headers(first.headers) == headers and first.status is None
    assert second == Msg("hdr.b", 1, "r.1", large, encode_headers(headers))
    assert third == Msg("hdr.c", 1, None, b"plain")


def test_a_queue_group_gets_each_message_once(nats):
    members = [Client(nats), Client(nats)]
    watcher = Client(nats)
    for member in members:
        member.send(wire.sub("work.*", 7, queue="workers"))
        member.flush()
    watcher.send(wire.sub("work.*", 8))
    watcher.flush()
    publisher = Client(nats)
    publisher.send(*(wire.pub(f"work.{index}", b"%d" % index) for index in range(40)))
    publisher.flush()
    received = [event for member in members for event in member.flush()]
    assert sorted(event.payload for event in received) == sorted(b"%d" % i for i in range(40))
    assert {event.sid for event in received} == {7}
    assert [event.payload for event in watcher.flush()] == [b"%d" % i for i in range(40)]


def test_a_request_without_responders_gets_503(nats):
    client = Client(nats)
    reply = client.request("nobody.listens", b"anyone?")
    assert reply.payload == b"" and reply.headers is not None
    assert reply.status == NO_RESPONDERS
    assert parse_status(reply.headers) == (503, "")


def test_unsub_stops_delivery(nats):
    client = Client(nats)
    client.send(wire.sub("gone", 3), wire.unsub(3, max_msgs=2),
                *(wire.pub("gone", b"x") for _ in range(3)))
    assert len(client.flush()) == 2
    client.send(wire.sub("gone", 4), wire.unsub(4), wire.pub("gone", b"x"))
    assert client.flush() == []


def test_too_large_a_publish_gets_an_err(nats):
    client = Client(nats)
    # The line alone: the server refuses it from its size, and closes; a
    # payload still on its way then would reset the connection.
    client.send(b"PUB big %d\r\n" % (client.info["max_payload"] + 1))
    assert client.expect(Err) == Err("Maximum Payload Violation")


def test_jetstream_acks_and_deduplicates(nats):
    client = Client(nats)
    created = client.js("$JS.API.STREAM.CREATE.ORDERS", json.dumps(
        {"name": "ORDERS", "subjects": ["orders.>"], "storage": "memory"}).encode())
    assert "error" not in created, created
    assert created["config"]["name"] == "ORDERS"
    ack = client.js("orders.new", b"first", {"Nats-Msg-Id": "order-1"})
    assert ack == {"stream": "ORDERS", "seq": 1}
    again = client.js("orders.new", b"first", {"Nats-Msg-Id": "order-1"})
    assert again == {"stream": "ORDERS", "seq": 1, "duplicate": True}
    assert client.js("orders.new", b"second", {"Nats-Msg-Id": "order-2"})["seq"] == 2
    info = client.js("$JS.API.STREAM.INFO.ORDERS")
    assert info["state"]["messages"] == 2


def test_a_three_server_cluster(tmp_path):
    with nats_cluster(tmp_path, 3) as servers:
        subscriber = Client(servers[0])
        publisher = Client(servers[2])
        subscriber.send(wire.sub("spread.>", 1))
        subscriber.flush()
        # Server 3 learns of the interest on server 1 over the route a
        # moment later: publish until a message gets through.
        sent = itertools.count(1)

        def delivered() -> list[Event]:
            publisher.send(wire.pub("spread.x", b"%d" % next(sent)))
            publisher.flush()
            return subscriber.flush()

        msg, *_ = poll(delivered, "a message from server 3 to a subscriber on server 1")
        assert msg.subject == "spread.x" and msg.sid == 1
        created = Client(servers[1]).js("$JS.API.STREAM.CREATE.R3", json.dumps(
            {"name": "R3", "subjects": ["r3.>"], "num_replicas": 3}).encode())
        assert "error" not in created, created
        assert created["config"]["num_replicas"] == 3
        assert len(created["cluster"]["replicas"]) == 2
        # Server 3 may not know yet that the stream listens on r3.>: until it
        # does, a publish there gets 503 (no responders).
        ack = poll(lambda: publisher.js("r3.a", b"kept", {"Nats-Msg-Id": "r3-1"}, retry_503=True),
                   "a PubAck from the R3 stream through server 3")
        assert ack == {"stream": "R3", "seq": 1}
