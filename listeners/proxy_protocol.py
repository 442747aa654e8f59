"""The PROXY protocol header (versions 1 and 2) that a load balancer puts in
front of a connection it passes on: who the client really is, and in
version 2 what the balancer learnt of it (TLS, SNI, a connection id).

No I/O here: ``parse_header`` takes the bytes received so far and answers a
``ProxyHeader`` (its ``length`` says where the client's own bytes start),
None when more bytes are needed to decide, or raises ProxyProtocolError.
The specification is HAProxy's proxy-protocol.txt; section numbers below
are its sections.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

#: Version 1 starts with this; version 2 with SIGNATURE_V2 (2.2).
PREFIX_V1 = b"PROXY "
SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest version 1 line, CRLF included (2.1: 107 bytes).
MAX_V1_LENGTH = 107
_V2_FIXED = struct.Struct("!12sBBH")
_V2_LENGTH = 16

#: Version 2 commands (2.2): LOCAL is the balancer's own connection (a
#: health check), whose addresses are the socket's; PROXY relays a client.
COMMAND_LOCAL = 0x0
COMMAND_PROXY = 0x1

#: Address families and protocols by their byte (2.2), and the size of
#: their address block.
_FAMILIES = {
    0x00: ("UNSPEC", 0), 0x11: ("TCP4", 12), 0x12: ("UDP4", 12),
    0x21: ("TCP6", 36), 0x22: ("UDP6", 36), 0x31: ("UNIX", 216), 0x32: ("UNIX_DGRAM", 216),
}
_IPV4_ADDRESSES = struct.Struct("!4s4sHH")
_IPV6_ADDRESSES = struct.Struct("!16s16sHH")

#: TLV types (2.2.1 to 2.2.7).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
#: The client flags of PP2_TYPE_SSL (2.2.5).
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
#: A unique id is at most this long (2.2.6).
MAX_UNIQUE_ID = 128
_TLV = struct.Struct("!BH")
_SSL_FIXED = struct.Struct("!BI")


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says why."""


@attrs.define(slots=True, frozen=True, kw_only=True)
class SslInfo:
    """PP2_TYPE_SSL: the client's TLS connection to the balancer."""

    #: PP2_CLIENT_* flags.
    client: int
    #: 0 when the client's certificate verified (2.2.5); anything else did not.
    verify: int
    version: str | None = None
    #: The subject's common name of the client's certificate.
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None

    @property
    def over_tls(self) -> bool:
        """Whether the client reached the balancer over TLS."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def certificate_verified(self) -> bool:
        """Whether the client presented a certificate (on this connection or
        the TLS session it resumed) and the balancer verified it."""
        return (self.over_tls and self.verify == 0
                and bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)))


@attrs.define(slots=True, frozen=True, kw_only=True)
class ProxyHeader:
    """One parsed header."""

    version: int
    #: Bytes the header takes; what follows is the client's.
    length: int
    #: False for a version 2 LOCAL command: nothing is relayed, the
    #: connection's own addresses stand.
    relayed: bool = True
    #: TCP4, TCP6, UNKNOWN (version 1), or a version 2 family's name.
    family: str = "UNKNOWN"
    #: (host, port) of the client and of the address it connected to; None
    #: when the header names none (UNKNOWN, UNSPEC, UNIX, LOCAL).
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    #: PP2_TYPE_AUTHORITY: the host name the client asked for (SNI).
    authority: str | None = None
    #: PP2_TYPE_UNIQUE_ID: the balancer's id of the connection.
    unique_id: bytes | None = None
    #: PP2_TYPE_ALPN: the protocol the client negotiated.
    alpn: bytes | None = None
    ssl: SslInfo | None = None
    #: Every TLV as (type, value), those above included, in order.
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``; None while ``data`` is a prefix
    of one that may still be valid. Raises ProxyProtocolError."""
    data = bytes(data[:_V2_LENGTH + 65535]) if not isinstance(data, bytes) else data
    if data[:12] == SIGNATURE_V2[:len(data)] and len(data) < 12:
        return None  # could still become either version: both start differently
    if data.startswith(SIGNATURE_V2):
        return _parse_v2(data)
    if data[:6] == PREFIX_V1[:len(data)]:
        return _parse_v1(data) if len(data) >= 6 else None
    raise ProxyProtocolError("no PROXY protocol header (the connection starts with "
                             f"{data[:16]!r})")


# version 1 -----------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"version 1 header without CRLF in its first "
                                     f"{MAX_V1_LENGTH} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("version 1 header with a line end other than CRLF")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("version 1 header that is not ASCII") from None
    parts = line.split(" ")
    length = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # 2.1: the rest of the line is to be ignored; the socket's addresses stand.
        return ProxyHeader(version=1, length=length, family="UNKNOWN")
    if len(parts) != 6:
        raise ProxyProtocolError(f"version 1 header {line!r} is not "
                                 "PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT")
    _, family, source, destination, sport, dport = parts
    if family == "TCP4":
        kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif family == "TCP6":
        kind = ipaddress.IPv6Address
    else:
        raise ProxyProtocolError(f"version 1 header with protocol {family!r} "
                                 "(allowed: TCP4, TCP6, UNKNOWN)")
    return ProxyHeader(version=1, length=length, family=family,
                       source=(_v1_address(source, kind), _v1_port(sport)),
                       destination=(_v1_address(destination, kind), _v1_port(dport)))


def _v1_address(text: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
                ) -> str:
    try:
        return str(kind(text))
    except ValueError:
        raise ProxyProtocolError(f"version 1 header with an invalid address {text!r}") from None


def _v1_port(text: str) -> int:
    # 2.1: decimal without leading zeroes, 0 to 65535.
    if not text.isascii() or not text.isdigit() or len(text) > 5 \
            or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyProtocolError(f"version 1 header with an invalid port {text!r}")
    return int(text)


# version 2 -----------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_LENGTH:
        return None
    _, version_command, family_byte, size = _V2_FIXED.unpack_from(data)
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"version 2 signature with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (COMMAND_LOCAL, COMMAND_PROXY):
        raise ProxyProtocolError(f"version 2 header with an unknown command {command}")
    length = _V2_LENGTH + size
    if len(data) < length:
        return None
    body = memoryview(data)[_V2_LENGTH:length]
    known = _FAMILIES.get(family_byte)
    if known is None:
        raise ProxyProtocolError(f"version 2 header with an unknown family 0x{family_byte:02x}")
    family, address_size = known
    if size < address_size:
        raise ProxyProtocolError(f"version 2 {family} header of {size} bytes, shorter than "
                                 f"its addresses ({address_size})")
    tlvs = _tlvs(body[address_size:], "TLV")
    fields = _known_tlvs(tlvs)
    if command == COMMAND_LOCAL:
        # 2.2: the receiver must use the connection's real addresses and
        # ignore those of the header.
        return ProxyHeader(version=2, length=length, relayed=False, family=family,
                           tlvs=tlvs, **fields)
    if family in ("UDP4", "UDP6", "UNIX_DGRAM"):
        raise ProxyProtocolError(f"version 2 header relays a datagram protocol ({family}) "
                                 "to a stream listener")
    source = destination = None
    if family == "TCP4":
        src, dst, sport, dport = _IPV4_ADDRESSES.unpack_from(body)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family == "TCP6":
        src, dst, sport, dport = _IPV6_ADDRESSES.unpack_from(body)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    return ProxyHeader(version=2, length=length, family=family, source=source,
                       destination=destination, tlvs=tlvs, **fields)


def _tlvs(data: memoryview, what: str) -> tuple[tuple[int, bytes], ...]:
    found = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _TLV.size:
            raise ProxyProtocolError(f"version 2 header with a truncated {what} "
                                     f"({len(data) - offset} bytes left)")
        kind, size = _TLV.unpack_from(data, offset)
        offset += _TLV.size
        if offset + size > len(data):
            raise ProxyProtocolError(f"version 2 header with {what} 0x{kind:02x} of {size} "
                                     f"bytes, past the header's end")
        found.append((kind, bytes(data[offset:offset + size])))
        offset += size
    return tuple(found)


def _known_tlvs(tlvs: tuple[tuple[int, bytes], ...]) -> dict:
    fields: dict = {}
    for kind, value in tlvs:
        if kind == PP2_TYPE_AUTHORITY:
            fields["authority"] = _text(value, "PP2_TYPE_AUTHORITY")
        elif kind == PP2_TYPE_UNIQUE_ID:
            if len(value) > MAX_UNIQUE_ID:
                raise ProxyProtocolError(f"version 2 header with a unique id of {len(value)} "
                                         f"bytes (at most {MAX_UNIQUE_ID})")
            fields["unique_id"] = value
        elif kind == PP2_TYPE_ALPN:
            fields["alpn"] = value
        elif kind == PP2_TYPE_SSL:
            fields["ssl"] = _ssl(value)
        # CRC32C, NOOP, NETNS and the custom ranges are not needed here: kept
        # in ``tlvs`` only. (A CRC32C would only catch corruption that TCP's
        # own checksum and the balancer's hop already make unlikely.)
    return fields


def _ssl(value: bytes) -> SslInfo:
    if len(value) < _SSL_FIXED.size:
        raise ProxyProtocolError(f"version 2 header with a PP2_TYPE_SSL of {len(value)} bytes "
                                 f"(at least {_SSL_FIXED.size})")
    client, verify = _SSL_FIXED.unpack_from(value)
    fields: dict = {}
    names = {PP2_SUBTYPE_SSL_VERSION: "version", PP2_SUBTYPE_SSL_CN: "cn",
             PP2_SUBTYPE_SSL_CIPHER: "cipher", PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
             PP2_SUBTYPE_SSL_KEY_ALG: "key_alg"}
    for kind, data in _tlvs(memoryview(value)[_SSL_FIXED.size:], "PP2_TYPE_SSL sub-TLV"):
        name = names.get(kind)
        if name is not None:
            fields[name] = _text(data, f"PP2_SUBTYPE_SSL_{name.upper()}")
    return SslInfo(client=client, verify=verify, **fields)


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"version 2 header with a {what} that is not UTF-8") from None


# building headers: for tests and tools that stand in for a balancer --------


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A version 1 header relaying a TCP connection from ``source``."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None,
              tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """A version 2 header relaying a TCP connection from ``source``, or a
    LOCAL one when ``source`` is None; ``tlvs`` as (type, value)."""
    extra = b"".join(_TLV.pack(kind, len(value)) + value for kind, value in tlvs)
    if source is None:
        return SIGNATURE_V2 + bytes((0x20, 0x00)) + struct.pack("!H", len(extra)) + extra
    if destination is None:
        destination = ("::", 0) if ":" in source[0] else ("0.0.0.0", 0)
    if ":" in source[0]:
        family, addresses = 0x21, _IPV6_ADDRESSES.pack(
            ipaddress.IPv6Address(source[0]).packed, ipaddress.IPv6Address(destination[0]).packed,
            source[1], destination[1])
    else:
        family, addresses = 0x11, _IPV4_ADDRESSES.pack(
            ipaddress.IPv4Address(source[0]).packed, ipaddress.IPv4Address(destination[0]).packed,
            source[1], destination[1])
    body = addresses + extra
    return SIGNATURE_V2 + bytes((0x21, family)) + struct.pack("!H", len(body)) + body


def ssl_tlv(client: int, verify: int = 0, *, version: str | None = None,
            cn: str | None = None, cipher: str | None = None, sig_alg: str | None = None,
            key_alg: str | None = None) -> tuple[int, bytes]:
    """A PP2_TYPE_SSL TLV for ``v2_header``."""
    subs = b""
    for kind, text in ((PP2_SUBTYPE_SSL_VERSION, version), (PP2_SUBTYPE_SSL_CN, cn),
                       (PP2_SUBTYPE_SSL_CIPHER, cipher), (PP2_SUBTYPE_SSL_SIG_ALG, sig_alg),
                       (PP2_SUBTYPE_SSL_KEY_ALG, key_alg)):
        if text is not None:
            encoded = text.encode("utf-8")
            subs += _TLV.pack(kind, len(encoded)) + encoded
    return PP2_TYPE_SSL, _SSL_FIXED.pack(client, verify) + subs
