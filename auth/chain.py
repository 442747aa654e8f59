"""The authentication chain.

Authenticators are asked in order; each answers allow, deny or ignore. When
every one ignores (or there are none) ``allow_anonymous`` decides, so access
without credentials is always an explicit setting, never a default. A client
certificate the listener verified, or a TLS-PSK identity, authenticates its
client.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Mapping

from bastionmq.broker.ports import ALLOW, AuthRequest, AuthResult
from bastionmq.broker.properties import Reason

log = logging.getLogger("bastionmq.auth")

DENY_ANONYMOUS = AuthResult(Reason.NOT_AUTHORIZED)


class AuthenticationChain:
    def __init__(self, allow_anonymous: bool) -> None:
        self.allow_anonymous = allow_anonymous

    def authenticate(self, request: AuthRequest) -> AuthResult | Awaitable[AuthResult]:
        peer = request.peer
        if peer.certificate is not None or peer.psk_identity is not None:
            # The listener verified this certificate against its CA (a peer
            # certificate is only kept with verify_peer), or the client proved
            # it holds a PSK identity's key: that is who it is.
            return ALLOW
        if self.allow_anonymous:
            return ALLOW
        log.info("refusing client %r from %s on %s: no authenticator accepted it and "
                 "anonymous access is off", request.client_id, request.peer.host,
                 request.peer.listener)
        return DENY_ANONYMOUS


class ListenerAuthenticators:
    """Routes each CONNECT to the chain of the listener it arrived on."""

    def __init__(self, chains: Mapping[str, AuthenticationChain]) -> None:
        self._chains = dict(chains)

    def authenticate(self, request: AuthRequest) -> AuthResult | Awaitable[AuthResult]:
        return self._chains[request.peer.listener].authenticate(request)
