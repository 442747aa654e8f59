"""Listeners behind a load balancer that speaks the PROXY protocol
(``proxy_protocol = true``): the first layer on the raw socket, before TLS
and before the WebSocket upgrade.

``ProxyLayer`` is the socket's protocol only until the header is read. Then
it makes the listener's usual protocol, hands the socket's transport to it
(``transport.set_protocol``) with the header, and is gone: every later read
goes from the transport to that protocol directly, as on a listener without
the PROXY protocol. The header's facts reach the core in the connection's
PeerInfo, made by ``proxied_peer``.

A connection from an address outside ``proxy_protocol_trusted``, one that
does not start with a valid header, and one whose header is not complete
within ``proxy_protocol_timeout`` are closed, logged and counted (by
reason, ``Listener.proxy_refusals``); nothing else is disturbed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import attrs

from bastionmq.broker.logtext import endpoint
from bastionmq.broker.ports import CertificateFacts, PeerCertificate, PeerInfo

from .proxy_protocol import ProxyHeader, ProxyProtocolError, parse_header

if TYPE_CHECKING:
    from .base import Listener

log = logging.getLogger("bastionmq.listener")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Refusal reasons, as counted and as the metrics label them.
UNTRUSTED, MALFORMED, TIMEOUT = "untrusted", "malformed", "timeout"


@attrs.define(slots=True, frozen=True)
class ProxySettings:
    """A listener's proxy_protocol keys, ready for use."""

    #: Seconds a connection has to send its whole header.
    timeout: float
    #: The balancers' addresses: only connections from these are read.
    trusted: tuple[Network, ...]

    @classmethod
    def of(cls, timeout: float, trusted: tuple[str, ...]) -> ProxySettings:
        return cls(timeout, tuple(ipaddress.ip_network(item, strict=False) for item in trusted))

    def trusts(self, peername: Any) -> bool:
        """Whether a socket's peer name is one of the trusted balancers."""
        if not peername or not isinstance(peername, tuple):
            return False  # not an IP socket: nothing to compare
        try:
            address = ipaddress.ip_address(peername[0].partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's IPv4 peer
        return any(address in network for network in self.trusted)


def proxied_peer(peer: PeerInfo, header: ProxyHeader) -> PeerInfo:
    """``peer`` (what the listener saw: the balancer) as the header says the
    client is. Its address becomes the client's. A PP2_TYPE_SSL TLV
    describes the client's own TLS connection, to the balancer, and
    replaces the listener's TLS facts (which, on an ssl listener, are the
    balancer's); a certificate it says the balancer verified is the peer's
    certificate, with its common name as the only fact known."""
    changes: dict[str, Any] = {}
    if header.source is not None:
        changes["address"] = header.source
    ssl = header.ssl
    if ssl is not None:
        changes.update(
            tls=ssl.over_tls, tls_version=ssl.version if ssl.over_tls else None,
            cipher=ssl.cipher if ssl.over_tls else None,
            certificate=(common_name_certificate(ssl.cn)
                         if ssl.certificate_verified and ssl.cn else None),
            sni=header.authority if ssl.over_tls else None, psk_identity=None)
    elif header.authority is not None and peer.sni is None:
        changes["sni"] = header.authority
    return attrs.evolve(peer, **changes) if changes else peer


def common_name_certificate(common_name: str) -> PeerCertificate:
    """A certificate verified elsewhere, of which only the subject's common
    name was passed on: no encoding, subject, SANs or validity."""
    return PeerCertificate.known(CertificateFacts(subject=None, common_name=common_name))


class ProxyLayer(asyncio.Protocol):
    """Reads the PROXY protocol header of one connection, then gives the
    connection to the listener's protocol (see the module's text)."""

    __slots__ = ("listener", "transport", "_buffer", "_timer", "_closing")

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        listener = self.listener
        if not listener.admit(transport):
            return
        self.transport = transport
        settings = listener.proxy
        assert settings is not None  # the listener makes this layer only with its settings
        peername = transport.get_extra_info("peername")
        if peername is None:
            # Gone before it was accepted (a balancer's connect-only health
            # check): no one to refuse.
            transport.abort()
            return
        if not settings.trusts(peername):
            self._refuse(UNTRUSTED, "not a trusted source (proxy_protocol_trusted)")
            return
        self._timer = asyncio.get_running_loop().call_later(settings.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        buffer = self._buffer + data if self._buffer else data
        try:
            header = parse_header(buffer)
        except ProxyProtocolError as exc:
            self._refuse(MALFORMED, str(exc))
            return
        if header is None:
            self._buffer = buffer
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self._buffer = b""
        listener = self.listener
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener %s: PROXY v%d from %s for %s%s", listener.id, header.version,
                      endpoint(transport.get_extra_info("peername")),
                      endpoint(header.source) if header.source else "itself",
                      f" (CN {header.ssl.cn!r})" if header.ssl and header.ssl.cn else "")
        # From here on the transport calls the next protocol itself.
        protocol = listener.protocol_factory()
        transport.set_protocol(protocol)
        protocol.begin(transport, header)  # type: ignore[attr-defined]
        rest = buffer[header.length:]
        if rest and not transport.is_closing():
            protocol.data_received(rest)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused over max_connections, or handed on
        self.transport = None
        self.listener.connection_count -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(TIMEOUT, f"no complete PROXY protocol header within "
                              f"{self.listener.proxy.timeout:g}s"  # type: ignore[union-attr]
                              f" ({len(self._buffer)} bytes received)")

    def _refuse(self, reason: str, why: str) -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        self._closing = True
        listener = self.listener
        listener.proxy_refusals[reason] += 1
        host = endpoint(transport.get_extra_info("peername"))
        log.info("listener %s: closing the connection of %s: %s", listener.id, host, why,
                 extra={"event": "proxy_protocol_refused", "listener": listener.id,
                        "peer": host, "reason": reason})
        transport.abort()
