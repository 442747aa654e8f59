"""Sans-IO codec for the NATS client protocol: the nodes' data plane.

Why not nats-py for this: its reader puts every MSG it parses on an
``asyncio.Queue`` and a task per subscription gets it back out, so each
message delivered between nodes costs a queue put, a queue get and a hop
through the event loop before the broker sees it. Routing every MQTT publish
through that would cost more than the routing itself. This module is the
data plane without that: in the style of h11 and of ``broker/codec.py``,
bytes in, events out, and back; no sockets and no asyncio here, so the
caller decodes a whole read in one ``feed`` call inside its own
``data_received`` and hands the messages straight to the broker.

It covers what a client connection carries, in the client's direction:

- decoding what a server sends: INFO, MSG, HMSG (headers kept raw, with
  ``parse_headers`` and ``parse_status`` for the status line of a
  no-responders 503 or a JetStream 408), PING, PONG, +OK and -ERR;
- encoding what a client sends: CONNECT (headers and no-responders on,
  verbose and pedantic off), PUB, HPUB, SUB, UNSUB, PING and PONG.

The protocol is https://docs.nats.io/reference/reference-protocols/nats-protocol.
JetStream needs nothing more: its API is requests (PUB with a reply subject)
carrying JSON, and its acknowledgements are replies.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Union

import attrs

from bastionmq.version import __version__

#: The longest control line accepted without its CRLF: the server's own
#: default max_control_line, and what nats.go allows. A peer that sends more
#: without a line end is not speaking NATS; buffering on would only use memory.
MAX_CONTROL_LINE = 4096
#: INFO alone may be longer: in a large cluster it lists every server's
#: client URL (connect_urls), and it is one line.
MAX_INFO_LINE = 1 << 20
#: The bound on a message (headers and payload) until the server's INFO gives
#: its max_payload: nats-server refuses a max_payload above 64 MB.
MAX_PAYLOAD_LIMIT = 64 * 1024 * 1024
#: Status of the empty HMSG a server answers a request with when nothing is
#: subscribed to its subject (CONNECT with headers and no_responders).
NO_RESPONDERS = 503

_CRLF = b"\r\n"
_HEADER_VERSION = "NATS/1.0"


class WireError(Exception):
    """The bytes break the protocol; the connection must be closed (the
    parser's state after one is undefined). ``events`` are the complete
    events decoded from the same ``feed`` before the error, which are valid
    and should still be handled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.events: list[Event] = []


def _shown(raw: bytes | bytearray) -> str:
    # Error messages quote the offending bytes, never more than a line's worth.
    return repr(bytes(raw[:120])) + ("..." if len(raw) > 120 else "")


# ---------------------------------------------------------------- events

@attrs.define(slots=True)
class Info:
    """INFO: the server's JSON, sent first and again when the cluster changes."""

    info: dict[str, Any]


@attrs.define(slots=True)
class Msg:
    """MSG or HMSG: a message for subscription ``sid``. ``headers`` is the
    raw header block of an HMSG (``NATS/1.0...\\r\\n\\r\\n``), None for MSG."""

    subject: str
    sid: int
    reply: str | None
    payload: bytes
    headers: bytes | None = None

    @property
    def status(self) -> int | None:
        """The status code of the header block (503 for no responders), if any."""
        if self.headers is None:
            return None
        status = parse_status(self.headers)
        return None if status is None else status[0]


@attrs.define(slots=True)
class Ping:
    pass


@attrs.define(slots=True)
class Pong:
    pass


@attrs.define(slots=True)
class Ok:
    """+OK: only sent to a client that asked for verbose mode."""


@attrs.define(slots=True)
class Err:
    """-ERR: the server's message without its quotes. Most close the
    connection (authorization, parser errors); a few do not (permissions)."""

    message: str


Event = Union[Info, Msg, Ping, Pong, Ok, Err]

# The events without fields are shared: PING and PONG come every few seconds
# on every connection, and equal events compare equal anyway.
_PING = Ping()
_PONG = Pong()
_OK = Ok()

# Verbs are case-insensitive: the upper-case ones the server sends are looked
# up as they are, any other after upper-casing.
_MESSAGE_VERBS = (b"MSG", b"HMSG")
_MSG, _PING_VERB, _PONG_VERB, _OK_VERB, _ERR, _INFO = range(6)
_VERBS = {b"MSG": _MSG, b"HMSG": _MSG, b"PING": _PING_VERB, b"PONG": _PONG_VERB,
          b"+OK": _OK_VERB, b"-ERR": _ERR, b"INFO": _INFO}


# ---------------------------------------------------------------- decoding

class NatsParser:
    """Incremental decoder for what one server sends on one client connection.

    ``feed`` takes bytes split at any boundary and returns the list of every
    event they complete. A control line is searched for its CRLF once: a read
    that does not end it is only appended, and the search resumes where it
    stopped. Once a MSG's control line is read, its size is known, and reads
    are only appended until the whole body is there; the line is not parsed
    again. Messages larger than ``max_payload`` are refused from their control
    line, before their body is buffered; INFO's max_payload replaces it.
    """

    __slots__ = ("_buffer", "_scan", "_pending", "_needed", "max_payload",
                 "max_control_line", "on_message")

    def __init__(self, max_payload: int = MAX_PAYLOAD_LIMIT,
                 max_control_line: int = MAX_CONTROL_LINE,
                 on_message: Callable[[str, int, bytes], Any] | None = None) -> None:
        #: Bytes held back: a control line without its CRLF yet, or the body
        #: of the message in ``_pending``.
        self._buffer = bytearray()
        #: Where the search for the CRLF of the buffered line resumes.
        self._scan = 0
        #: A message whose control line is parsed and whose body is not all
        #: there: (subject, sid, reply, header size); its body needs
        #: ``_needed`` bytes (with the CRLF after it).
        self._pending: tuple[str, int, str | None, int] | None = None
        self._needed = 0
        self.max_payload = max_payload
        self.max_control_line = max_control_line
        #: Called as ``on_message(subject, sid, payload)`` for each MSG with
        #: neither headers nor a reply subject, as it is decoded, instead of
        #: an event: a node's data plane receives thousands per read, and a
        #: call costs a fraction of an event made, listed and dispatched.
        self.on_message = on_message

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a line or a message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Event]:
        """Every event ``data`` completes, in order (a list: a read of many
        messages is decoded in one call). Raises WireError, carrying the
        events decoded before the bad bytes."""
        events: list[Event] = []
        buffer = self._buffer
        start = 0
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray's slices would be bytearrays
        if self._pending is not None:
            # The body of a message: append until it is complete.
            missing = self._needed - len(buffer)
            if len(data) < missing:
                buffer += data
                return events
            buffer += memoryview(data)[:missing]
            self._finish_pending(events)
            if len(data) == missing:
                return events
            data = data[missing:]
        elif buffer:
            # A control line without its CRLF: only the new bytes (and the
            # last old one, which may be the CR) are searched.
            buffer += data
            start = buffer.find(_CRLF, self._scan)
            if start < 0:
                self._check_open_line(buffer, 0, len(buffer))
                self._scan = len(buffer) - 1
                return events
            data = bytes(buffer)
            buffer.clear()
        try:
            self._decode(data, start, events)
        except WireError as exc:
            exc.events = events
            raise
        return events

    def _decode(self, data: bytes, start: int, events: list[Event]) -> None:
        # The hot path: a read holding many MSGs and HMSGs, decoded inline;
        # the other lines go to _control. ``start`` is where the CRLF search
        # begins (past the bytes a previous feed searched already).
        append = events.append
        on_message = self.on_message
        find = data.find
        end = len(data)
        max_line = self.max_control_line
        max_payload = self.max_payload
        pos = 0
        while pos < end:
            eol = find(_CRLF, start)
            if eol < 0:
                self._check_open_line(data, pos, end)
                self._buffer += memoryview(data)[pos:]
                self._scan = max(end - pos - 1, 0)
                return
            if eol - pos > max_line:
                self._check_open_line(data, pos, eol)
            args = data[pos:eol].split()
            count = len(args)
            verb = args[0] if count else b""
            if verb == b"MSG" or verb == b"HMSG" or (count > 3 and verb.upper() in _MESSAGE_VERBS):
                # MSG <subject> <sid> [reply] <size>
                # HMSG <subject> <sid> [reply] <header size> <total size>
                headed = len(verb) == 4
                try:
                    if headed:
                        count -= 1
                    if count == 4:
                        reply = None
                    elif count == 5:
                        reply = args[3].decode()
                    else:
                        raise ValueError
                    size = int(args[-1])
                    hsize = int(args[-2]) if headed else 0
                    sid = int(args[2])
                    subject = args[1].decode()
                except ValueError:  # UnicodeDecodeError included
                    raise WireError(f"malformed {_shown(data[pos:eol])}") from None
                if size < 0 or size > max_payload:
                    raise self._too_large(size, data[pos:eol])
                if headed and not 0 < hsize <= size:
                    raise WireError(f"header size out of range: {_shown(data[pos:eol])}")
                body = eol + 2
                stop = body + size
                if stop + 2 > end:
                    # The body is not all there: keep what is, the line parsed.
                    self._pending = (subject, sid, reply, hsize)
                    self._needed = size + 2
                    self._buffer += memoryview(data)[body:]
                    return
                if data[stop] != 13 or data[stop + 1] != 10:
                    raise WireError(f"no CRLF after the {size} bytes of {_shown(data[pos:eol])}")
                if hsize:
                    append(Msg(subject, sid, reply, data[body + hsize:stop],
                               data[body:body + hsize]))
                elif on_message is not None and reply is None:
                    on_message(subject, sid, data[body:stop])
                else:
                    append(Msg(subject, sid, reply, data[body:stop]))
                pos = start = stop + 2
                continue
            append(self._control(args, data, pos, eol))
            pos = start = eol + 2
            max_payload = self.max_payload  # INFO may have changed it
        self._scan = 0

    def _too_large(self, size: int, line: bytes) -> WireError:
        return WireError(f"message of {size} bytes, the limit is {self.max_payload}: "
                         f"{_shown(line)}")

    def _control(self, args: list[bytes], data: bytes, pos: int, eol: int) -> Event:
        if not args:
            raise WireError("empty control line")
        verb = _VERBS.get(args[0])
        if verb is None:
            verb = _VERBS.get(args[0].upper())
        if verb == _MSG:
            # Only a MSG or HMSG with too few arguments comes here.
            raise WireError(f"malformed {_shown(data[pos:eol])}")
        if verb == _PING_VERB or verb == _PONG_VERB or verb == _OK_VERB:
            if len(args) != 1:
                raise WireError(f"arguments after the verb: {_shown(data[pos:eol])}")
            return _PING if verb == _PING_VERB else _PONG if verb == _PONG_VERB else _OK
        # INFO's JSON and -ERR's message contain spaces: take the rest of the line.
        rest = data[pos:eol].split(None, 1)[1:]
        text = rest[0].strip() if rest else b""
        if verb == _INFO:
            try:
                info = json.loads(text)
            except (ValueError, RecursionError):
                raise WireError(f"INFO that is not JSON: {_shown(text)}") from None
            if not isinstance(info, dict):
                raise WireError(f"INFO that is not a JSON object: {_shown(text)}")
            max_payload = info.get("max_payload")
            if type(max_payload) is int and max_payload > 0:
                # The server sends no message larger than it accepts.
                self.max_payload = max_payload
            return Info(info)
        if verb == _ERR:
            message = text.decode("utf-8", "replace")
            if len(message) >= 2 and message[0] == message[-1] == "'":
                message = message[1:-1]
            return Err(message)
        raise WireError(f"unknown operation {_shown(data[pos:eol])}")

    def _finish_pending(self, events: list[Event]) -> None:
        # The buffer holds exactly the pending message's body and its CRLF:
        # the payload is the one copy made out of it.
        buffer = self._buffer
        pending = self._pending
        assert pending is not None
        subject, sid, reply, hsize = pending
        self._pending = None
        self._needed = 0
        if buffer[-2:] != _CRLF:
            raise WireError(f"no CRLF after the {len(buffer) - 2} bytes of a message "
                            f"to {subject!r}")
        del buffer[-2:]
        headers = None
        if hsize:
            headers = bytes(buffer[:hsize])
            del buffer[:hsize]  # from the front of a bytearray: no copy
        payload = bytes(buffer)
        buffer.clear()
        if headers is None and reply is None and self.on_message is not None:
            self.on_message(subject, sid, payload)
        else:
            events.append(Msg(subject, sid, reply, payload, headers))

    def _check_open_line(self, data: bytes | bytearray, pos: int, end: int) -> None:
        """The bytes from ``pos`` are a line without its CRLF yet: refuse it
        once it is longer than any line may be."""
        if end - pos > self.max_control_line:
            if data[pos:pos + 4].upper() != b"INFO" or end - pos > MAX_INFO_LINE:
                raise WireError(f"control line longer than {self.max_control_line} "
                                f"bytes: {_shown(data[pos:end])}")


# ---------------------------------------------------------------- headers

def parse_headers(raw: bytes) -> dict[str, str]:
    """The fields of an HMSG's header block, keys as sent (NATS header names
    are case-sensitive). A key sent more than once gets its values joined
    with ", ", as HTTP combines repeated fields. The status line is
    ``parse_status``'s."""
    lines = _header_lines(raw)
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if not sep or key.split() != [key]:  # a name is one token
            raise WireError(f"malformed header line {line!r}")
        value = value.strip()
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    return fields


def parse_status(raw: bytes) -> tuple[int, str] | None:
    """The status code and description of a header block's first line
    (``NATS/1.0 503`` gives (503, ""), ``NATS/1.0 408 Request Timeout`` gives
    (408, "Request Timeout")), or None when it has none."""
    first = _header_lines(raw)[0]
    rest = first[len(_HEADER_VERSION):].strip()
    if not rest:
        return None
    code, _, description = rest.partition(" ")
    if len(code) != 3 or not code.isdigit():
        raise WireError(f"malformed status line {first!r}")
    return int(code), description.strip()


def _header_lines(raw: bytes) -> list[str]:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise WireError(f"header block that is not UTF-8: {_shown(raw)}") from None
    if not text.endswith("\r\n\r\n"):
        raise WireError(f"header block without its blank line: {_shown(raw)}")
    lines = text[:-4].split("\r\n")
    first = lines[0]
    if not first.startswith(_HEADER_VERSION) or first[len(_HEADER_VERSION):][:1] not in ("", " "):
        raise WireError(f"header block without {_HEADER_VERSION}: {_shown(raw)}")
    return lines


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """A header block for HPUB: ``NATS/1.0\\r\\n``, a ``Key: Value`` line each, a blank line."""
    lines = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        # A line end in either would end the block early (and what follows
        # would be read as payload); a key is one token without a colon.
        if ":" in key or key.split() != [key] or "\r" in value or "\n" in value:
            raise WireError(f"header {key!r}: {value!r} cannot be sent")
        lines.append(f"{key}: {value}\r\n".encode())
    lines.append(_CRLF)
    return b"".join(lines)


# ---------------------------------------------------------------- encoding
#
# Each encoder returns the whole command as one bytes object, built in one
# %-format (measured faster than b"".join of the parts for small payloads);
# a caller batching commands appends them to one bytearray and writes it once.

PING = b"PING\r\n"
PONG = b"PONG\r\n"


def _token(text: str, what: str) -> bytes:
    # Subjects, reply subjects and queue groups are one token of the control
    # line: a space, tab or line end in one would split it, and what follows
    # would be read as another argument or another command.
    # A bytes without whitespace splits into a list of itself, and comparing
    # that list checks identity first: measured faster than four ``in`` tests.
    raw = text.encode()
    if raw.split() != [raw]:
        raise WireError(f"{what} {text!r} is not one token (empty or with whitespace)")
    return raw


def connect(options: Mapping[str, Any] | None = None, *, name: str | None = None,
            echo: bool = True, user: str | None = None, password: str | None = None,
            token: str | None = None) -> bytes:
    """CONNECT with headers and no_responders on (a request to a subject with
    no subscriber gets a 503 at once, not a timeout), verbose off (no +OK
    after every command) and pedantic off. ``echo`` false stops the server
    delivering a connection's own publishes back to it. ``options`` (the
    protocol's field names) are added last and win."""
    fields: dict[str, Any] = {
        "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
        "protocol": 1, "echo": echo, "lang": "python", "version": __version__,
    }
    if name is not None:
        fields["name"] = name
    if user is not None:
        fields["user"] = user
    if password is not None:
        fields["pass"] = password
    if token is not None:
        fields["auth_token"] = token
    if options:
        fields.update(options)
    return b"CONNECT %b\r\n" % json.dumps(fields, separators=(",", ":")).encode()


def pub(subject: str, payload: bytes, reply: str | None = None) -> bytes:
    """PUB: ``payload`` to ``subject``, answers (if any) to ``reply``."""
    if reply is None:
        return b"PUB %b %d\r\n%b\r\n" % (_token(subject, "subject"), len(payload), payload)
    return b"PUB %b %b %d\r\n%b\r\n" % (_token(subject, "subject"), _token(reply, "reply subject"),
                                        len(payload), payload)


def hpub(subject: str, headers: Mapping[str, str] | bytes, payload: bytes,
         reply: str | None = None) -> bytes:
    """HPUB: ``payload`` with ``headers`` (a mapping, or a block already
    encoded); the two sizes are the header block's and headers plus payload."""
    block = headers if isinstance(headers, bytes) else encode_headers(headers)
    hsize = len(block)
    if reply is None:
        return b"HPUB %b %d %d\r\n%b%b\r\n" % (_token(subject, "subject"), hsize,
                                               hsize + len(payload), block, payload)
    return b"HPUB %b %b %d %d\r\n%b%b\r\n" % (_token(subject, "subject"),
                                              _token(reply, "reply subject"), hsize,
                                              hsize + len(payload), block, payload)


def sub(subject: str, sid: int, queue: str | None = None) -> bytes:
    """SUB: deliver ``subject`` (wildcards allowed) as subscription ``sid``;
    with ``queue``, only one member of the queue group gets each message."""
    if queue is None:
        return b"SUB %b %d\r\n" % (_token(subject, "subject"), sid)
    return b"SUB %b %b %d\r\n" % (_token(subject, "subject"), _token(queue, "queue group"), sid)


def unsub(sid: int, max_msgs: int | None = None) -> bytes:
    """UNSUB: end subscription ``sid`` now, or after ``max_msgs`` messages in all."""
    if max_msgs is None:
        return b"UNSUB %d\r\n" % sid
    return b"UNSUB %d %d\r\n" % (sid, max_msgs)


def ping() -> bytes:
    return PING


def pong() -> bytes:
    return PONG
