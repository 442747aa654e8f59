"""A client certificate forwarded by a TLS-terminating reverse proxy in a
header of the WebSocket upgrade request (``websocket.proxy_client_cert``).

The proxy ended the client's TLS and verified its certificate; it passes
the whole certificate on, and the broker takes it as the connection's
peer certificate exactly as if its own handshake had verified it: subject,
common name, SANs, fingerprints, the encoding itself. The broker does not
verify it again (the chain and the CA stayed at the proxy), so the header is
believed only from the proxies in ``trusted``: that list is the whole
security boundary.

Two formats:

- ``xfcc``: Envoy's ``X-Forwarded-Client-Cert``. Elements separated by
  ``,`` (one per proxy that handled the request, the first written by the
  proxy that received the client's connection), each ``;``-separated
  ``key=value`` pairs, values optionally double-quoted (with ``\\`` escaping
  inside quotes). The client's certificate is the ``Cert`` pair of the
  first element: URL-encoded PEM. A ``Hash`` pair beside it, when present,
  must be the certificate's SHA-256.
- ``pem_escaped``: nginx's ``$ssl_client_escaped_cert``, the URL-encoded PEM
  alone.

Everything here runs once per upgrade request, never per message. Nothing
of a header's value is put in an error message (they reach the logs).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import urllib.parse
from typing import Any

import attrs
from cryptography import x509

from bastionmq.broker.ports import PeerCertificate

from .certificates import facts_of
from .settings import ProxyClientCertOptions

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What nginx's $ssl_client_verify says of a certificate it verified.
VERIFIED = "SUCCESS"

_PEM = re.compile(r"\s*-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*)-----END CERTIFICATE-----\s*")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


class ForwardedCertError(ValueError):
    """A header from a trusted proxy that cannot be taken: the upgrade is
    refused with ``status`` (400 malformed, 403 not verified)."""

    def __init__(self, why: str, status: int = 400) -> None:
        super().__init__(why)
        self.status = status


@attrs.define(slots=True, frozen=True)
class ForwardedCertSettings:
    """A listener's proxy_client_cert block, ready for use at each upgrade."""

    #: Header names as h11 gives them: lowercase bytes; verify_header b"" when not read.
    header: bytes
    format: str
    verify_header: bytes
    trusted: tuple[Network, ...]

    @classmethod
    def of(cls, options: ProxyClientCertOptions) -> ForwardedCertSettings | None:
        """The settings, or None when the block is not enabled."""
        if not options.enable:
            return None
        return cls(options.header.lower().encode("ascii"), options.format,
                   options.verify_header.lower().encode("ascii"),
                   tuple(ipaddress.ip_network(item, strict=False) for item in options.trusted))

    def trusts(self, peername: Any) -> bool:
        """Whether a socket's peer name (the immediate peer: the proxy, not
        an address a header or the PROXY protocol reports) is trusted."""
        if not peername or not isinstance(peername, tuple):
            return False  # not an IP socket: nothing to compare
        try:
            address = ipaddress.ip_address(str(peername[0]).partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's IPv4 peer
        return any(address in network for network in self.trusted)

    def certificate(self, headers: list[tuple[bytes, bytes]]) -> PeerCertificate | None:
        """The certificate a trusted proxy's request carries; None when it
        carries none (the client sent none). Raises ForwardedCertError."""
        values = [value for name, value in headers if name == self.header]
        verdict = None
        if self.verify_header:
            verdicts = [value for name, value in headers if name == self.verify_header]
            if len(verdicts) > 1:
                raise ForwardedCertError(f"{len(verdicts)} {self.verify_header.decode()} headers")
            verdict = verdicts[0].decode("latin-1").strip() if verdicts else None
        if not values:
            if verdict == VERIFIED:
                raise ForwardedCertError(f"{self.verify_header.decode()} says SUCCESS but "
                                         f"there is no {self.header.decode()} header")
            return None
        if self.verify_header and verdict != VERIFIED:
            # A certificate the proxy did not verify (nginx's optional_no_ca
            # passes FAILED:...) must neither count nor leave the client to
            # carry on as someone without one.
            said = "no such header" if verdict is None else _verdict(verdict)
            raise ForwardedCertError(f"the proxy did not verify the client certificate "
                                     f"({self.verify_header.decode()}: {said})", 403)
        if self.format == "xfcc":
            # Several header lines are one list, in order (RFC 9110 5.3).
            text = ",".join(value.decode("latin-1") for value in values)
            return xfcc_certificate(text, self.header.decode())
        if len(values) > 1:
            raise ForwardedCertError(f"{len(values)} {self.header.decode()} headers")
        return escaped_pem_certificate(values[0].decode("latin-1"), self.header.decode())


def _verdict(text: str) -> str:
    # FAILED:<reason> is nginx's own text, but the header came over the network.
    return repr(text[:60]) + ("..." if len(text) > 60 else "")


def parse_xfcc(text: str) -> list[dict[str, list[str]]]:
    """The elements of an X-Forwarded-Client-Cert value, first first, each
    a mapping of lowercase keys to their values (a key may repeat: DNS,
    URI). Raises ForwardedCertError when it does not follow the grammar."""
    elements: list[dict[str, list[str]]] = []
    element: dict[str, list[str]] = {}
    position, end = 0, len(text)
    while True:
        while position < end and text[position] in " \t":
            position += 1
        match = _TOKEN.match(text, position)
        if match is None:
            raise ForwardedCertError(f"no key at character {position}")
        key = match.group().lower()
        position = match.end()
        if position >= end or text[position] != "=":
            raise ForwardedCertError(f"no '=' after a key at character {position}")
        position += 1
        if position < end and text[position] == '"':
            position += 1
            parts: list[str] = []
            while True:
                if position >= end:
                    raise ForwardedCertError("a quoted value is not closed")
                char = text[position]
                if char == "\\":
                    if position + 1 >= end:
                        raise ForwardedCertError("a quoted value is not closed")
                    parts.append(text[position + 1])
                    position += 2
                elif char == '"':
                    position += 1
                    break
                else:
                    parts.append(char)
                    position += 1
            value = "".join(parts)
        else:
            start = position
            while position < end and text[position] not in ';,"':
                position += 1
            value = text[start:position].strip(" \t")
        element.setdefault(key, []).append(value)
        while position < end and text[position] in " \t":
            position += 1
        if position >= end:
            elements.append(element)
            return elements
        separator = text[position]
        position += 1
        if separator == ",":
            elements.append(element)
            element = {}
        elif separator != ";":
            raise ForwardedCertError(f"unexpected {separator!r} at character {position - 1}")


def xfcc_certificate(text: str, header: str = "x-forwarded-client-cert") -> PeerCertificate:
    """The certificate in the Cert pair of the first element of an
    X-Forwarded-Client-Cert value. Raises ForwardedCertError."""
    try:
        first = parse_xfcc(text)[0]
    except ForwardedCertError as exc:
        raise ForwardedCertError(f"{header} is not valid ({exc}; {len(text)} characters)") \
            from None
    certs = first.get("cert", [])
    if len(certs) != 1:
        raise ForwardedCertError(
            f"{header}'s first element has {'no' if not certs else len(certs)} Cert "
            "(the proxy must pass the certificate itself: Envoy's "
            "set_current_client_cert_details { cert: true })")
    certificate = escaped_pem_certificate(certs[0], f"{header}'s Cert")
    hashes = first.get("hash", [])
    if hashes and any(value.lower() != certificate.sha256 for value in hashes):
        raise ForwardedCertError(f"{header}'s Hash is not the SHA-256 of its Cert")
    return certificate


def escaped_pem_certificate(text: str, header: str = "the header") -> PeerCertificate:
    """The certificate of a URL-encoded PEM text (one certificate).
    Raises ForwardedCertError."""
    try:
        pem = urllib.parse.unquote(text.strip(), errors="strict")
    except UnicodeDecodeError:
        raise ForwardedCertError(f"{header} is not URL-encoded UTF-8 "
                                 f"({len(text)} characters)") from None
    match = _PEM.fullmatch(pem)
    if match is None:
        raise ForwardedCertError(f"{header} is not one PEM certificate ({len(text)} characters)")
    try:
        der = base64.b64decode("".join(match.group(1).split()), validate=True)
        parsed = x509.load_der_x509_certificate(der)
        facts = facts_of(parsed, der)
    except (binascii.Error, ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        # Extensions are decoded as facts_of reads them: a broken one fails there.
        raise ForwardedCertError(f"{header} holds no valid certificate "
                                 f"({len(text)} characters)") from None
    return PeerCertificate.known(facts, der)
