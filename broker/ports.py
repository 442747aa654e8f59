"""What the core exchanges with the outside world.

Listeners describe each connection with a ``PeerInfo``; the application hands
the core an ``Authenticator``. The core imports no listener, authenticator or
store: it only knows these shapes.
"""

from __future__ import annotations

from typing import Any, Awaitable, Mapping, Protocol

import attrs


@attrs.define(slots=True, frozen=True, kw_only=True)
class PeerInfo:
    """Facts about one network connection, gathered by its listener."""

    #: "tcp:default", "ssl:default": the listener's kind and name, as EMQX writes them.
    listener: str
    #: (host, port) of the remote end, when the transport knows it.
    address: tuple[str, int] | None = None
    #: Whether the connection is protected by TLS.
    tls: bool = False

    @property
    def host(self) -> str:
        return self.address[0] if self.address else ""


@attrs.define(slots=True, frozen=True, kw_only=True)
class AuthRequest:
    client_id: str
    username: str | None
    password: bytes | None
    peer: PeerInfo
    protocol_level: int
    properties: Mapping[str, Any]


@attrs.define(slots=True, frozen=True)
class AuthResult:
    """An authentication decision; reason_code 0 means allowed."""

    reason_code: int = 0
    superuser: bool = False

    @property
    def allowed(self) -> bool:
        return self.reason_code == 0


ALLOW = AuthResult()


class Authenticator(Protocol):
    """Decides whether a CONNECT may proceed.

    May answer at once or with an awaitable (a database look-up); the core
    holds the connection's later packets until the answer comes.
    """

    def authenticate(self, request: AuthRequest) -> AuthResult | Awaitable[AuthResult]: ...
