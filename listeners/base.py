"""What every listener shares: opening, counting and closing connections.

A listener's job ends when it hands the core a transport and a PeerInfo; the
protocol object below only forwards the transport's callbacks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import sys
from typing import Any

from bastionmq.broker.connection import Connection
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.ports import PeerInfo

from .proxied import ProxyLayer, ProxySettings, proxied_peer
from .proxy_protocol import ProxyHeader

log = logging.getLogger("bastionmq.listener")


class Listener:
    """A server socket feeding the core. Subclasses say how a transport is made."""

    kind = "tcp"

    def __init__(self, name: str, host: str, port: int, core: BrokerCore, *,
                 max_connections: int | None = None, backlog: int = 1024,
                 nodelay: bool = True, high_watermark: int = 1024 * 1024,
                 proxy: ProxySettings | None = None, reuse_port: bool = False) -> None:
        self.name = name
        #: "tcp:default": made once, since every connection's PeerInfo keeps it.
        self.id = f"{self.kind}:{name}"
        self.host = host
        self.port = port
        self.core = core
        self.max_connections = max_connections
        self.backlog = backlog
        self.nodelay = nodelay
        self.high_watermark = high_watermark
        #: Bound with SO_REUSEPORT, beside the other workers of node.workers.
        self.reuse_port = reuse_port
        self.connection_count = 0
        self.refused_over_limit = 0
        #: With proxy_protocol: every connection starts with a ProxyLayer.
        self.proxy = proxy
        #: Connections closed for their PROXY protocol header (or its
        #: absence), by reason (listeners.proxied).
        self.proxy_refusals: collections.Counter[str] = collections.Counter()
        self._server: asyncio.base_events.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when 0 was asked for."""
        if self._server is None or not self._server.sockets:
            return (self.host, self.port)
        return self._server.sockets[0].getsockname()[:2]

    @property
    def accepting(self) -> bool:
        """Whether it is bound and accepts connections."""
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Chosen once here, so that a listener without the PROXY protocol
        # makes its protocols exactly as before.
        factory = self.protocol_factory if self.proxy is None else self._proxy_layer
        try:
            self._server = await loop.create_server(
                factory, self.host or None, self.port,
                backlog=self.backlog, reuse_address=True,
                reuse_port=self.reuse_port or None, **self.server_options())
        except OSError as exc:
            raise OSError(exc.errno, f"listener {self.id} cannot bind {self.host}:{self.port}: "
                                     f"{exc.strerror}") from None
        host, port = self.address
        log.info("listener %s listening on %s", self.id,
                 f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    def server_options(self) -> dict[str, Any]:
        return {}

    def protocol_factory(self) -> asyncio.Protocol:
        """The protocol of an accepted connection (after its PROXY protocol
        header, with proxy_protocol): each has ``begin(transport, header)``."""
        return ListenerProtocol(self)

    def _proxy_layer(self) -> asyncio.Protocol:
        return ProxyLayer(self)

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection and set up its socket; False (and the
        connection dropped) when the listener is at max_connections."""
        self.core.stats.sockets_opened += 1  # accepted, whatever follows (Mosquitto's count)
        if self.max_connections is not None and self.connection_count >= self.max_connections:
            self.refused_over_limit += 1
            if self.refused_over_limit == 1 or self.refused_over_limit % 1000 == 0:
                log.warning("listener %s is at max_connections (%d): refusing connections "
                            "(%d so far)", self.id, self.max_connections, self.refused_over_limit)
            transport.abort()
            return False
        self.connection_count += 1
        if not self.nodelay:
            # asyncio and uvloop set TCP_NODELAY on every TCP connection
            # themselves; asking for the socket object only to undo it keeps
            # one wrapper object (72 bytes) per connection off the others.
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        transport.set_write_buffer_limits(high=self.high_watermark)
        return True

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting and release what the listener holds for its
        lifetime (a TLS listener: its CRL fetching); connections stay."""
        self.stop_accepting()

    def peer_info(self, transport: asyncio.Transport,
                  proxy: ProxyHeader | None = None) -> PeerInfo:
        """The peer of ``transport``; as ``proxy`` (its PROXY protocol header) says."""
        peername = transport.get_extra_info("peername")
        # One string per client address, not per connection (many clients
        # share an address behind a NAT or a load balancer).
        address = (sys.intern(peername[0]), peername[1]) if peername else None
        peer = PeerInfo(listener=self.id, address=address)
        return peer if proxy is None else proxied_peer(peer, proxy)


class UpperLayer:
    """What every layer between the socket and the core's Connection (TLS,
    WebSocket) passes on unchanged: flow control, both ways, and the facts of
    the transport below. ``transport`` is the layer below, ``connection``
    what reads from this one; either is None before it exists and after the
    connection is lost. Layers stack: one layer can be another's transport."""

    __slots__ = ()
    transport: Any
    connection: Any

    # from the transport below, to the Connection
    def pause_writing(self) -> None:
        if self.connection is not None:
            self.connection.pause_writing()

    def resume_writing(self) -> None:
        if self.connection is not None:
            self.connection.resume_writing()

    # from the Connection, to the transport below
    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport else default

    def innermost(self) -> Any:
        """The core's Connection at the top of the layers stacked on this
        one; None while there is none (before it exists, after it is lost)."""
        connection = self.connection
        while isinstance(connection, UpperLayer):
            connection = connection.connection
        return connection


class ListenerProtocol(asyncio.Protocol):
    __slots__ = ("listener", "connection")

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        # The core's Connection once admitted; None before that and after the loss, when
        # the transport makes no call. Any, like UpperLayer.connection: the hot callbacks
        # below use it without a check, which an Optional type would ask for.
        self.connection: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.listener.admit(transport):
            self.begin(transport, None)

    def begin(self, transport: asyncio.Transport, proxy: ProxyHeader | None) -> None:
        """Serve an admitted connection (``proxy``: the header it began with)."""
        listener = self.listener
        self.connection = Connection(listener.core, transport, listener.peer_info(transport, proxy))

    def data_received(self, data: bytes) -> None:
        self.connection.data_received(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.listener.connection_count -= 1
            self.connection.connection_lost(exc)
            self.connection = None

    def pause_writing(self) -> None:
        self.connection.pause_writing()

    def resume_writing(self) -> None:
        self.connection.resume_writing()
