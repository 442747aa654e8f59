"""WebSocket listeners: MQTT over WebSocket (``listeners.ws.<name>``) and
over WebSocket over TLS (``listeners.wss.<name>``).

The WebSocket layer stands between a lower byte transport and the core's
Connection, as TlsProtocol does for TLS: to the Connection it is the
transport (write, close, pause_reading, resume_reading, get_extra_info), and
it forwards the lower layer's callbacks (data_received, connection_lost,
pause_writing, resume_writing). The lower transport is anything with those
five calls: the socket's transport for ``ws``; for ``wss``, a TlsProtocol,
which offers exactly them, so TLS stacks under this layer without either
knowing the other (``WebSocketLayer.start(tls_protocol, tls_protocol.peer_info())``).

wsproto (python-hyper) does the protocol work without I/O: h11 reads the
HTTP upgrade, its frame decoder the client's frames. Binary messages are a
byte stream to the MQTT decoder, so packets split across frames and several
packets in one frame both just work ([MQTT-6.0.0-2]); all the
payload of one read pass reaches the Connection in one call, and the
Connection answers with one write per pass, which becomes one binary frame
(``mqtt_piggyback = multiple``) or one frame per packet (``single``).

Outgoing frames are built here rather than by wsproto: a server's frame is
unmasked, a 2 to 10 byte header before the payload, and written vectored
with it; wsproto would copy the payload twice per frame. With
permessage-deflate negotiated they go through wsproto, whose extension
compresses them.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import struct
import time
import zlib
from typing import Any

import attrs
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, RejectData, Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from bastionmq.broker.codec import read_varint
from bastionmq.broker.connection import Connection
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.logtext import endpoint
from bastionmq.broker.ports import PeerInfo

from .base import Listener, UpperLayer
from .forwarded_cert import ForwardedCertError, ForwardedCertSettings
from .proxy_protocol import ProxyHeader
from .settings import WebSocketOptions
from .tls import TlsListener, TlsProtocol

log = logging.getLogger("bastionmq.listener")

# Layer states.
#: LINGERING: closed by the broker, its Close frame and the write side's end
#: sent, what the client still sends read and discarded (Connection.close).
UPGRADING, OPEN, CLOSING, LINGERING = range(4)

_BINARY = 0x82  # FIN + binary opcode
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_REFUSAL_HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]


def frame_header(length: int) -> bytes:
    """The header of an unmasked, final binary frame of ``length`` bytes (RFC 6455 5.2)."""
    if length < 126:
        return bytes((_BINARY, length))
    if length < 65536:
        return _HEADER_16.pack(_BINARY, 126, length)
    return _HEADER_64.pack(_BINARY, 127, length)


def packet_frames(data: bytes) -> list[Any]:
    """Whole MQTT packets, as the core writes them, each behind its own frame
    header: the parts of one vectored write (``mqtt_piggyback = single``)."""
    view = memoryview(data)
    parts: list[Any] = []
    start, end = 0, len(data)
    while start < end:
        length, at = read_varint(data, start + 1, end)  # the Remaining Length
        stop = at + length
        parts.append(frame_header(stop - start))
        parts.append(view[start:stop])
        start = stop
    return parts


@attrs.define(slots=True, frozen=True)
class WebSocketSettings:
    """A listener's ``websocket`` options, made ready for per-connection use."""

    path: str
    subprotocols: frozenset[str]
    fail_if_no_subprotocol: bool
    #: Allowed origins (lowercase), or None when origins are not checked; an
    #: empty set allows the pages of this machine (LOCAL_ORIGIN).
    origins: frozenset[str] | None
    allow_origin_absence: bool
    #: Header names as h11 gives them (lowercase bytes); b"" when not read.
    address_header: bytes
    port_header: bytes
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_frame_size: int | None
    compress: bool
    #: Most bytes one frame may inflate to under permessage-deflate.
    inflate_limit: int
    one_packet_per_frame: bool
    #: The proxy_client_cert block, or None when not enabled.
    client_cert: ForwardedCertSettings | None = None

    @classmethod
    def from_options(cls, options: WebSocketOptions, max_packet_size: int) -> WebSocketSettings:
        return cls(
            path=options.mqtt_path,
            subprotocols=frozenset(options.supported_subprotocols),
            fail_if_no_subprotocol=options.fail_if_no_subprotocol,
            origins=frozenset(origin.lower().rstrip("/") for origin in options.allowed_origins)
            if options.check_origin_enable else None,
            allow_origin_absence=options.allow_origin_absence,
            address_header=options.proxy_address_header.lower().encode("ascii"),
            port_header=options.proxy_port_header.lower().encode("ascii"),
            trusted_proxies=tuple(ipaddress.ip_network(item, strict=False)
                                  for item in options.trusted_proxies),
            max_frame_size=options.max_frame_size,
            compress=options.compress,
            inflate_limit=options.max_frame_size or max_packet_size,
            one_packet_per_frame=options.mqtt_piggyback == "single",
            client_cert=ForwardedCertSettings.of(options.proxy_client_cert))

    def trusts(self, host: str) -> bool:
        """Whether ``host`` is one of the trusted proxies."""
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_proxies)


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate that refuses (1009) a frame inflating beyond a limit
    before inflating it whole: a few kilobytes of deflate data can otherwise
    become gigabytes in one call."""

    # None until a compressed message starts (and between messages without context
    # takeover), but read only inside one, which frame_inbound_header gave a
    # decompressor: typed as it is read, so the per-frame path needs no check.
    _decompressor: zlib._Decompress

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._inflated = 0

    def frame_inbound_header(self, proto: Any, opcode: Any, rsv: Any,
                             payload_length: int) -> Any:
        self._inflated = 0
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        try:
            inflated = self._decompressor.decompress(data, self._limit - self._inflated + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(inflated)
        if self._inflated > self._limit:
            return CloseReason.MESSAGE_TOO_BIG
        return inflated


#: Frames up to this size are gathered whole before they are read; larger
#: ones are read by wsproto as they arrive.
_WHOLE_FRAME_MAX = 64 * 1024


class WebSocketLayer(UpperLayer):
    """WebSocket over a lower transport; the core's Connection's transport.

    ``listener`` gives ``core``, ``id``, ``websocket`` (WebSocketSettings)
    and ``upgrade_refused``. ``start`` begins the HTTP upgrade over a lower
    transport already admitted by whoever owns it.
    """

    __slots__ = ("listener", "transport", "peer", "connection", "_state", "_handshake", "_ws",
                 "_timer", "_frame_bytes", "_deflate", "_vectored", "_pending",
                 "_in_message", "_passthrough")

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self.transport: Any = None
        self.peer: PeerInfo | None = None
        self.connection: Any = None
        self._state = CLOSING
        self._handshake: WSConnection | None = None
        self._ws: Any = None
        self._timer: asyncio.TimerHandle | None = None
        #: Payload bytes of the frame being received, for max_frame_size.
        self._frame_bytes = 0
        self._deflate: PerMessageDeflate | None = None
        #: Bytes of a frame not complete yet (the fast path below keeps
        #: wsproto fed with whole frames only).
        self._pending = b""
        #: wsproto is inside a fragmented message (it saw a data frame
        #: without FIN and not yet the last one).
        self._in_message = False
        #: Bytes of a large frame still owed to wsproto, which reads it as
        #: it arrives instead of it being buffered here whole.
        self._passthrough = 0
        self._vectored = False

    def start(self, lower: Any, peer: PeerInfo) -> None:
        core = self.listener.core
        self.transport = lower
        self.peer = peer
        self._state = UPGRADING
        self._handshake = WSConnection(ConnectionType.SERVER)
        self._vectored = hasattr(lower, "writelines")
        # The upgrade must come within the time a CONNECT is given after it.
        self._timer = core.loop.call_later(core.settings.idle_timeout, self._upgrade_timed_out)

    # from the lower transport ------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._state != OPEN:
            if self._state == UPGRADING:
                self._receive_upgrade(data)
            elif self._state == LINGERING and self.connection is not None:
                self.connection.data_received(data)  # counted there, and discarded
            return
        if self._deflate is None:
            return self._receive_frames(data)
        self._receive_wsproto(data, [])

    def _receive_frames(self, data: bytes) -> None:
        """Split the stream into whole frames; a whole unfragmented binary
        frame is unmasked here (what almost every client sends, a frame per
        packet), anything else goes to wsproto, which then always holds
        frame boundaries."""
        if self._passthrough:
            take = min(self._passthrough, len(data))
            self._passthrough -= take
            if not self._receive_wsproto(data[:take], []) or self._state != OPEN:
                return
            data = data[take:]
        if self._pending:
            data = self._pending + data
            self._pending = b""
        chunks: list[bytes | bytearray] = []
        limit = self.listener.websocket.max_frame_size
        position, end = 0, len(data)
        while end - position >= 2:
            first, second = data[position], data[position + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - position < 4:
                    break
                length = int.from_bytes(data[position + 2:position + 4], "big")
                header = 4
            elif length == 127:
                if end - position < 10:
                    break
                length = int.from_bytes(data[position + 2:position + 10], "big")
                header = 10
            if second & 0x80:
                header += 4
            if limit is not None and length > limit and first & 0x0F in (0x0, 0x1, 0x2):
                # Refused from its header alone, before any of it is read.
                self._deliver(chunks)
                self._fail(CloseReason.MESSAGE_TOO_BIG,
                           f"frame larger than max_frame_size ({limit} bytes)")
                return
            frame_end = position + header + length
            if frame_end > end:
                if length <= _WHOLE_FRAME_MAX:
                    break  # wait for the rest of a small frame
                # A large frame streams through wsproto as it arrives.
                self._deliver(chunks)
                if first & 0x0F in (0x0, 0x1, 0x2):
                    self._in_message = not first & 0x80
                self._passthrough = frame_end - end
                self._receive_wsproto(data[position:], [])
                return
            if first == 0x82 and second & 0x80 and not self._in_message:
                # FIN, binary, masked: the whole message, unmasked here.
                mask = data[frame_end - length - 4:frame_end - length]
                payload = data[frame_end - length:frame_end]
                key = (mask * (length // 4 + 1))[:length]
                chunks.append((int.from_bytes(payload, "little")
                               ^ int.from_bytes(key, "little")).to_bytes(length, "little"))
            else:
                opcode = first & 0x0F
                if opcode in (0x0, 0x1, 0x2):
                    self._in_message = not first & 0x80
                if not self._receive_wsproto(data[position:frame_end], chunks):
                    return
                chunks = []
                if self._state != OPEN:
                    return
            position = frame_end
        self._pending = data[position:]
        self._deliver(chunks)

    def _receive_wsproto(self, data: bytes, chunks: list[bytes | bytearray]) -> bool:
        """Let wsproto read ``data``; False once the connection is failing."""
        ws = self._ws
        ws.receive_data(data)
        limit = self.listener.websocket.max_frame_size
        for event in ws.events():
            if event.__class__ is BytesMessage:
                payload = event.data
                if limit is not None:
                    size = self._frame_bytes + len(payload)
                    if size > limit:
                        self._deliver(chunks)
                        self._fail(CloseReason.MESSAGE_TOO_BIG,
                                   f"frame larger than max_frame_size ({limit} bytes)")
                        return False
                    self._frame_bytes = 0 if event.frame_finished else size
                chunks.append(payload)
            else:
                self._deliver(chunks)
                chunks = []
                if self._state != OPEN or not self._control(event):
                    return False
        self._deliver(chunks)
        return True

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.transport = None
        self._state = CLOSING
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.connection_lost(exc)

    # the upgrade ---------------------------------------------------------------

    def _receive_upgrade(self, data: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None  # made by start(), dropped when the upgrade is done
        try:
            handshake.receive_data(data)
            for event in handshake.events():
                if isinstance(event, Request):
                    self._on_request(event)
                    return
        except RemoteProtocolError as exc:
            hint = exc.event_hint if isinstance(exc.event_hint, RejectConnection) \
                else RejectConnection(status_code=400)
            self._refuse(hint.status_code, str(exc), hint.headers)

    def _on_request(self, request: Request) -> None:
        settings = self.listener.websocket
        path = request.target.partition("?")[0]
        if path != settings.path:
            return self._refuse(404, f"no WebSocket endpoint at {path[:100]!r} "
                                     f"(MQTT is at {settings.path})")
        headers = request.extra_headers
        if settings.origins is not None:
            origin = _header(headers, b"origin")
            if origin is None:
                if not settings.allow_origin_absence:
                    return self._refuse(403, "no Origin header (allow_origin_absence = false)")
            else:
                origin_text = origin.decode("latin-1").lower().rstrip("/")
                if settings.origins:
                    if origin_text not in settings.origins:
                        return self._refuse(403, f"origin {origin[:100].decode('latin-1')!r} "
                                                 "is not in allowed_origins")
                elif not LOCAL_ORIGIN.fullmatch(origin_text):
                    return self._refuse(403, f"origin {origin[:100].decode('latin-1')!r} is not "
                                             "a page of this machine (allowed_origins is empty)")
        subprotocol = None
        if request.subprotocols:
            subprotocol = next((name for name in request.subprotocols
                                if name in settings.subprotocols), None)
            if subprotocol is None:
                return self._refuse(400, "none of the subprotocols asked for "
                                         f"({', '.join(request.subprotocols)[:100]}) is in "
                                         "supported_subprotocols")
        elif settings.fail_if_no_subprotocol:
            return self._refuse(400, "no subprotocol asked for (Sec-WebSocket-Protocol; "
                                     "fail_if_no_subprotocol = true)")
        peer = self.peer
        assert peer is not None  # set by start()
        if peer.address is not None and settings.trusts(peer.address[0]):
            peer = _forwarded(peer, headers, settings)
        if settings.client_cert is not None:
            try:
                peer = self._with_forwarded_certificate(peer, headers, settings.client_cert)
            except ForwardedCertError as exc:
                return self._refuse(exc.status, str(exc))
        handshake, self._handshake = self._handshake, None
        assert handshake is not None  # made by start(), dropped here
        deflate = BoundedDeflate(settings.inflate_limit) if settings.compress else None
        extensions: list[Extension] = [deflate] if deflate is not None else []
        self.transport.write(handshake.send(AcceptConnection(subprotocol=subprotocol,
                                                         extensions=extensions)))
        self._ws = handshake.connection
        if deflate is not None and deflate.enabled():
            self._deflate = deflate
        timer = self._timer
        assert timer is not None  # armed by start(); firing would have ended UPGRADING
        timer.cancel()
        self._timer = None
        self._state = OPEN
        # A client sends nothing more before reading the 101 (RFC 6455 4.1),
        # so no frame waits behind the request.
        self.connection = Connection(self.listener.core, self, peer)

    def _with_forwarded_certificate(self, peer: PeerInfo, headers: list[tuple[bytes, bytes]],
                                    options: ForwardedCertSettings) -> PeerInfo:
        """``peer`` with the client certificate a trusted reverse proxy
        forwards (websocket.proxy_client_cert). Trust is the immediate
        peer's, the socket's other end, which sent these very bytes: not an
        address a header or a PROXY protocol header names."""
        if not options.trusts(self.transport.get_extra_info("peername")):
            if _header(headers, options.header) is not None:
                self.listener.forwarded_certificate_ignored(
                    self.transport.get_extra_info("peername"), options.header)
            return peer  # a native wss client certificate stays what it is
        # From a trusted proxy the certificate is the forwarded one or none:
        # the proxy's own (its TLS client certificate to a wss listener) is
        # never a client's identity.
        certificate = options.certificate(headers)
        if certificate is None:
            return attrs.evolve(peer, certificate=None) if peer.certificate is not None else peer
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener %s: %s forwards the client certificate of %s", peer.listener,
                      endpoint(self.transport.get_extra_info("peername")), certificate.subject)
        # The client presented it over TLS, to the proxy; that connection's
        # version and cipher are not passed on, and the broker's own TLS (on
        # wss) is the proxy's.
        return attrs.evolve(peer, certificate=certificate, tls=True, tls_version=None,
                            cipher=None, psk_identity=None)

    def _refuse(self, status: int, why: str, headers: Any = ()) -> None:
        """Answer the upgrade request with an HTTP error and close."""
        self.listener.upgrade_refused(self.peer, status, why)
        handshake = self._handshake
        assert handshake is not None  # refusals answer the upgrade request, before it is done
        self._state = CLOSING
        body = f"{why}\n".encode()
        try:
            data = handshake.send(RejectConnection(
                status_code=status, has_body=True,
                headers=[*headers, *_REFUSAL_HEADERS, (b"content-length", b"%d" % len(body))]))
            data += handshake.send(RejectData(data=body))
        except LocalProtocolError:
            data = b""  # a request too broken for h11 to answer
        self.transport.write(data)
        self.transport.close()

    def _upgrade_timed_out(self) -> None:
        self._timer = None
        if self._state == UPGRADING and self.transport is not None:
            self.listener.upgrade_refused(self.peer, None, "no WebSocket upgrade within "
                                          f"{self.listener.core.settings.idle_timeout:g}s")
            self._state = CLOSING
            self.transport.close()

    # frames --------------------------------------------------------------------

    def _deliver(self, chunks: list[bytes | bytearray]) -> None:
        if chunks and self.connection is not None:
            self.connection.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _control(self, event: Any) -> bool:
        """Handle a frame other than binary data; False when the connection closes."""
        ws = self._ws
        if isinstance(event, Ping):
            self.transport.write(ws.send(event.response()))
            return True
        if isinstance(event, CloseConnection):
            # The client's close (echoed, as RFC 6455 5.5.1 asks), or wsproto's
            # verdict on a broken frame (code 1002, 1007...), sent to the client.
            if event.code not in (CloseReason.NORMAL_CLOSURE, CloseReason.GOING_AWAY,
                                  CloseReason.NO_STATUS_RCVD):
                self._log_close(event.code, event.reason)
            self._state = CLOSING
            self.transport.write(ws.send(event.response()))
            self.transport.close()
            return False
        if isinstance(event, TextMessage):  # [MQTT-6.0.0-1]
            self._fail(CloseReason.UNSUPPORTED_DATA, "text frame (MQTT needs binary frames)")
            return False
        return True  # Pong

    def _fail(self, code: int, why: str) -> None:
        if self._state != OPEN:
            return  # already closing (the Connection closed on what came before)
        self._log_close(code, why)
        self._state = CLOSING
        self.transport.write(self._ws.send(CloseConnection(code=code, reason=why)))
        self.transport.close()

    def _log_close(self, code: int, why: str | None) -> None:
        host = endpoint(self.peer.address if self.peer is not None else None)
        log.info("listener %s: closing the WebSocket of %s: %s (%d)", self.listener.id, host,
                 why, code)

    # the transport the core's Connection writes to (pause_reading, resume_reading
    # and get_extra_info pass through UpperLayer) ----------------------------------

    def write(self, data: bytes) -> None:
        if self._state != OPEN:
            return
        if self._deflate is not None:
            self._write_deflated(data)
        elif self.listener.websocket.one_packet_per_frame:
            parts = packet_frames(data)
            if self._vectored:
                self.transport.writelines(parts)
            else:
                self.transport.write(b"".join(parts))
        elif self._vectored:
            self.transport.writelines((frame_header(len(data)), data))
        else:
            self.transport.write(frame_header(len(data)) + data)

    def _write_deflated(self, data: bytes) -> None:
        ws = self._ws
        if self.listener.websocket.one_packet_per_frame:
            packets = packet_frames(data)[1::2]
        else:
            packets = [data]
        self.transport.write(b"".join(ws.send(BytesMessage(data=bytes(packet)))
                                  for packet in packets))

    def can_write_eof(self) -> bool:
        transport = self.transport
        return (self._state == OPEN and transport is not None
                and getattr(transport, "can_write_eof", None) is not None
                and transport.can_write_eof())

    def write_eof(self) -> None:
        """The half of a lingering close (see Connection.close): the Close
        frame, then the write side below shut; the client's frames are read
        and discarded until ``close``."""
        self.transport.write(self._ws.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE)))
        self._state = LINGERING
        self.transport.write_eof()

    def close(self) -> None:
        if self._state == CLOSING or self.transport is None:
            return
        if self._state == OPEN:
            self.transport.write(self._ws.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE)))
        self._state = CLOSING
        self.transport.close()


#: The Origin of a page served from this machine, any port: what an Origin
#: check with no allowed_origins lets in.
LOCAL_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """A request header's value, occurrences joined by commas (RFC 9110 5.3)."""
    values = [value for key, value in headers if key == name]
    return b", ".join(values) if values else None


def _forwarded(peer: PeerInfo, headers: list[tuple[bytes, bytes]],
               settings: WebSocketSettings) -> PeerInfo:
    """``peer`` with the address a trusted proxy reports, if it reports one."""
    assert peer.address is not None  # only a peer from a trusted proxy's address gets here
    host, port = peer.address
    forwarded_for = _header(headers, settings.address_header) if settings.address_header else None
    if forwarded_for is not None:
        # Each proxy appends the address it got the request from: the client
        # is the rightmost address that is not a trusted proxy (what lies
        # left of it was written by the client and proves nothing).
        entries = [entry.strip() for entry in forwarded_for.decode("latin-1").split(",")]
        for index in range(len(entries) - 1, -1, -1):
            address = _ip(entries[index])
            if address is None:
                break  # not an address: the header is not believed any further
            host = address
            if not settings.trusts(address):
                break
    forwarded_port = _header(headers, settings.port_header) if settings.port_header else None
    if forwarded_port is not None:
        text = forwarded_port.split(b",")[-1].strip()
        if text.isdigit() and 0 < int(text) < 65536:
            port = int(text)
    if (host, port) == peer.address:
        return peer
    log.debug("listener %s: %s:%s is a trusted proxy for %s:%s", peer.listener,
              peer.address[0], peer.address[1], host, port)
    return attrs.evolve(peer, address=(host, port))


def _ip(entry: str) -> str | None:
    """An X-Forwarded-For entry as an address: "192.0.2.1", "2001:db8::1",
    and the forms with a port, "192.0.2.1:4711" and "[2001:db8::1]:4711"."""
    if entry.startswith("["):
        entry = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:
        entry = entry.partition(":")[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


class WsProtocol(WebSocketLayer, asyncio.Protocol):
    """``ws``: the socket's transport is the lower layer."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.listener.admit(transport):
            self.begin(transport, None)

    def begin(self, transport: asyncio.Transport, proxy: ProxyHeader | None) -> None:
        """Serve an admitted connection (``proxy``: the header it began with)."""
        self.start(transport, self.listener.peer_info(transport, proxy))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.listener.connection_count -= 1
        super().connection_lost(exc)


#: Seconds between two log lines about ignored certificate headers.
IGNORED_LOG_INTERVAL = 60.0


class WebSocketServing:
    """What a listener serving WebSocket (ws, and wss over TLS) adds."""

    core: BrokerCore
    id: str
    websocket: WebSocketSettings
    refused_upgrades: collections.Counter[int | None]
    forwarded_certificates_ignored: int
    _ignored_logged_at: float | None

    def serve_websocket(self, options: WebSocketOptions) -> None:
        self.websocket = WebSocketSettings.from_options(options,
                                                        self.core.settings.max_packet_size)
        #: Refused upgrades by HTTP status (None: no upgrade request in time),
        #: for operators and metrics.
        self.refused_upgrades = collections.Counter()
        #: Upgrade requests carrying proxy_client_cert's header from an
        #: address not in its trusted list (the header was not read).
        self.forwarded_certificates_ignored = 0
        self._ignored_logged_at = None

    def forwarded_certificate_ignored(self, peername: Any, header: bytes) -> None:
        """Count an untrusted request's certificate header, and log it at
        most once per IGNORED_LOG_INTERVAL: anyone can send such requests,
        and as many as they like."""
        self.forwarded_certificates_ignored += 1
        now = time.monotonic()
        if self._ignored_logged_at is not None \
                and now - self._ignored_logged_at < IGNORED_LOG_INTERVAL:
            return
        self._ignored_logged_at = now
        log.warning("listener %s: ignoring the %s header of %s, which is not a trusted proxy "
                    "(proxy_client_cert.trusted); %d ignored so far, logged at most once "
                    "every %gs", self.id, header.decode("ascii"),
                    endpoint(peername), self.forwarded_certificates_ignored,
                    IGNORED_LOG_INTERVAL)

    def upgrade_refused(self, peer: PeerInfo | None, status: int | None, why: str) -> None:
        self.refused_upgrades[status] += 1
        host = endpoint(peer.address if peer is not None else None)
        log.info("listener %s: no WebSocket for %s: %s%s", self.id, host, why,
                 f" (HTTP {status})" if status else "")


class WsListener(WebSocketServing, Listener):
    kind = "ws"

    def __init__(self, name: str, host: str, port: int, core: BrokerCore, *,
                 options: WebSocketOptions, **socket_options: Any) -> None:
        super().__init__(name, host, port, core, **socket_options)
        self.serve_websocket(options)

    def protocol_factory(self) -> asyncio.Protocol:
        return WsProtocol(self)


class WssListener(WebSocketServing, TlsListener):
    """``wss``: a TlsListener whose admitted TLS connections get a
    WebSocketLayer over them, started with the TLS peer (its certificate
    included), instead of the core's Connection; the layer attaches that
    Connection after the upgrade. Everything TLS (handshake, identity, CRLs,
    reload, revocation, certificate lifetime) is the TlsListener's."""

    kind = "wss"

    def __init__(self, name: str, host: str, port: int, core: BrokerCore, *,
                 websocket: WebSocketOptions, **tls_options: Any) -> None:
        super().__init__(name, host, port, core, **tls_options)
        self.serve_websocket(websocket)

    def attach(self, protocol: TlsProtocol, peer: PeerInfo) -> WebSocketLayer:
        layer = WebSocketLayer(self)
        layer.start(protocol, peer)
        return layer
