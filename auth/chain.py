"""The authentication chain (EMQX's ``authentication = [...]``).

Authenticators are asked in order; each answers allow, deny or ignore (None:
pass to the next). When every one ignores (or there are none)
``allow_anonymous`` decides, so access without credentials is always an
explicit setting, never a default. An authenticator may answer later (a
database look-up); the chain then continues asynchronously.

A client that proved a TLS-PSK identity is authenticated by its key. On a
listener without a configured chain, a client certificate the listener
verified authenticates its client too; where a chain is configured, say so
with a ``mechanism = cert`` entry.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Mapping, Protocol, Sequence

import attrs

from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import ALLOW, AuthRequest, AuthResult
from bastionmq.broker.properties import Reason
from bastionmq.broker.settings import SettingError

from .ban import LoginBans
from .mechanisms import CertAuthenticator, PasswordFileAuthenticator

log = logging.getLogger("bastionmq.auth")

DENY_ANONYMOUS = AuthResult(Reason.NOT_AUTHORIZED)
#: A username no authenticator knows gets the answer of a wrong password, so
#: that refusals do not tell which usernames exist (``hide_unknown_users``).
DENY_UNKNOWN = AuthResult(Reason.BAD_USER_NAME_OR_PASSWORD)
BANNED = AuthResult(Reason.BANNED)


class ChainAuthenticator(Protocol):
    """One entry of the chain: a decision, or None to pass to the next.
    One may also have ``source``, what its decisions count as in the
    metrics (``password_based:built_in_database``); else its name is."""

    name: str

    def authenticate(self, request: AuthRequest) -> AuthResult | None | Awaitable[AuthResult | None]: ...


#: What decided, for the decisions no authenticator of the chain made: a
#: listener with authentication off, a TLS-PSK identity, a certificate the
#: listener verified (no chain configured), a ban after failed logins, and
#: ``allow_anonymous`` when no authenticator decided.
DISABLED, PSK, PEER_CERTIFICATE, BAN, ANONYMOUS = (
    "disabled", "psk", "peer_certificate", "ban", "anonymous")
#: Enhanced authentication (4.12) counts as this and the method's name.
ENHANCED = "enhanced_auth:"


@attrs.define(slots=True)
class AuthStats:
    """Authentication outcomes, for operators and metrics: in all, and by
    (what decided, ``allowed`` or ``denied``)."""

    allowed: int = 0
    denied: int = 0
    by_source: dict[tuple[str, str], int] = attrs.field(factory=dict)

    def count(self, source: str, allowed: bool) -> None:
        """One decision, made by ``source``."""
        if allowed:
            self.allowed += 1
        else:
            self.denied += 1
        key = (source, "allowed" if allowed else "denied")
        self.by_source[key] = self.by_source.get(key, 0) + 1


class AuthenticationChain:
    def __init__(self, allow_anonymous: bool,
                 authenticators: Sequence[ChainAuthenticator] | None = None,
                 enabled: bool = True, stats: AuthStats | None = None,
                 bans: LoginBans | None = None, methods: frozenset[str] | None = None,
                 hide_unknown_users: bool = True,
                 first: Sequence[ChainAuthenticator] = ()) -> None:
        self.allow_anonymous = allow_anonymous
        self.hide_unknown_users = hide_unknown_users
        #: Enhanced authentication methods clients of this listener may use;
        #: None: any the broker has.
        self.methods = methods
        #: Repeated failures ban a client id / username / address for a while.
        self.bans = bans
        #: None: no chain configured for the listener (a verified certificate
        #: then authenticates); a list, possibly empty: exactly these.
        self.authenticators = authenticators
        #: Who is asked, in order: ``first`` (an embedding application's
        #: hooks, bastionmq.hooks), then the configured authenticators. When
        #: all of them ignore, a verified certificate (no chain configured)
        #: or ``allow_anonymous`` decides, as without ``first``.
        self.asked = [*first, *(authenticators or ())]
        #: What each one's decisions count as (see ChainAuthenticator).
        self.sources = [getattr(authenticator, "source", authenticator.name)
                        for authenticator in self.asked]
        self.enabled = enabled
        self.stats = stats if stats is not None else AuthStats()

    def authenticate(self, request: AuthRequest) -> AuthResult | Awaitable[AuthResult]:
        peer = request.peer
        if not self.enabled or peer.psk_identity is not None:
            return self._allowed(request, ALLOW, DISABLED if not self.enabled else PSK)
        banned = self._ban_of(request)
        if banned is not None:
            self.stats.count(BAN, False)
            log.info("refusing client %s from %s on %s: %s %s is banned after failed logins",
                     shown(request.client_id), peer.host, peer.listener, banned[0],
                     shown(banned[1]))
            return BANNED
        return self._run(request, 0)

    def admit_method(self, request: AuthRequest, method: str) -> AuthResult | None:
        """Whether an enhanced authentication may start: the method must be
        this listener's, and the client not banned."""
        if self.methods is not None and method not in self.methods:
            return AuthResult(Reason.BAD_AUTHENTICATION_METHOD)
        if self._ban_of(request) is not None:
            self.stats.count(BAN, False)
            return BANNED
        return None

    def _ban_of(self, request: AuthRequest,
                identity: str | None = None) -> tuple[str, str] | None:
        """The (kind, value) a ban refuses this client by, if any. A
        certificate the listener verified is never banned: failed logins of
        others with its client id or username must not lock it out."""
        if self.bans is None or request.peer.certificate is not None:
            return None
        return self.bans.banned(request, identity)

    def method_finished(self, request: AuthRequest, result: AuthResult) -> AuthResult:
        """An enhanced authentication (at CONNECT or a re-authentication)
        ended with ``result``. A failure counts against the user it was for
        (``result.identity``, the SCRAM user, when the method knew it; not
        against the client id when it did not); a success of a user banned
        meanwhile is refused, unless a verified certificate vouches for the
        client."""
        if result.allowed:
            if self._ban_of(request, result.identity) is not None:
                self.stats.count(BAN, False)
                log.info("refusing client %s on %s: user %s is banned after failed logins",
                         shown(request.client_id), request.peer.listener,
                         shown(result.identity))
                return BANNED
            self.stats.count(self._method_source(request), True)
            return result
        self.stats.count(self._method_source(request), False)
        if self.bans is not None:
            self.bans.failed(request, result.identity, known=result.identity is not None)
        return result

    @staticmethod
    def _method_source(request: AuthRequest) -> str:
        return ENHANCED + str(request.properties.get("authentication_method", ""))

    def _run(self, request: AuthRequest, start: int) -> AuthResult | Awaitable[AuthResult]:
        authenticators = self.asked
        for index in range(start, len(authenticators)):
            answer = authenticators[index].authenticate(request)
            if inspect.isawaitable(answer):
                return self._continue(request, index, answer)
            if answer is not None:
                return self._decided(request, index, answer)
        if self.authenticators is None and request.peer.certificate is not None:
            # The listener verified this certificate against its CA (a peer
            # certificate is only kept with verify_peer): that is who it is.
            return self._allowed(request, ALLOW, PEER_CERTIFICATE)
        return self._fall_through(request)

    async def _continue(self, request: AuthRequest, index: int, pending) -> AuthResult:
        answer = await pending
        if answer is not None:
            return self._decided(request, index, answer)
        result = self._run(request, index + 1)
        return await result if inspect.isawaitable(result) else result

    def _decided(self, request: AuthRequest, index: int, answer: AuthResult) -> AuthResult:
        """The authenticator at ``index`` decided."""
        if answer.allowed:
            return self._allowed(request, answer, self.sources[index])
        self.stats.count(self.sources[index], False)
        if self.bans is not None:
            self.bans.failed(request)
        authenticators = self.asked
        log.info("refusing client %s (user %s) from %s on %s: %s denied it (%s)",
                 shown(request.client_id), shown(request.username), request.peer.host, request.peer.listener,
                 authenticators[index].name,
                 Reason(answer.reason_code).name.lower().replace("_", " "))
        return answer

    def _allowed(self, request: AuthRequest, result: AuthResult, source: str) -> AuthResult:
        self.stats.count(source, True)
        return result

    def _fall_through(self, request: AuthRequest) -> AuthResult:
        if self.allow_anonymous:
            return self._allowed(request, ALLOW, ANONYMOUS)
        self.stats.count(ANONYMOUS, False)
        log.info("refusing client %s from %s on %s: no authenticator accepted it and "
                 "anonymous access is off", shown(request.client_id), request.peer.host,
                 request.peer.listener)
        if self.hide_unknown_users and request.username is not None:
            return DENY_UNKNOWN
        return DENY_ANONYMOUS


class ListenerAuthenticators:
    """Routes each CONNECT to the chain of the listener it arrived on."""

    def __init__(self, chains: Mapping[str, AuthenticationChain]) -> None:
        self._chains = dict(chains)

    def authenticate(self, request: AuthRequest) -> AuthResult | Awaitable[AuthResult]:
        return self._chains[request.peer.listener].authenticate(request)

    def admit_method(self, request: AuthRequest, method: str) -> AuthResult | None:
        return self._chains[request.peer.listener].admit_method(request, method)

    def method_finished(self, request: AuthRequest, result: AuthResult) -> AuthResult:
        return self._chains[request.peer.listener].method_finished(request, result)


class AuthnLoadError(SettingError):
    """An authenticator that cannot be set up; its key is its place in the list."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(str(index), message)


def build_authenticators(configs: Sequence[Any], extra: Mapping[tuple, Any] | None = None
                         ) -> list[ChainAuthenticator]:
    """Authenticators for the enabled entries of an ``authentication`` list.
    ``extra`` maps a (mechanism, backend) pair to a factory, for backends
    that need the application's resources (the built-in database)."""
    built = []
    for index, config in enumerate(configs):
        if not config.enable or config.mechanism == "scram":
            continue  # SCRAM runs as an enhanced authentication method, not here
        key = (config.mechanism, config.backend)
        try:
            if extra and key in extra:
                built.append(extra[key](config))
            elif config.mechanism == "cert":
                built.append(CertAuthenticator(config.identity, config.must_match))
            elif key == ("password_based", "password_file"):
                built.append(PasswordFileAuthenticator(config.path))
            else:
                raise ValueError(f"{config.mechanism} with backend {config.backend} is not "
                                 "available here")
        except (OSError, ValueError) as exc:
            raise AuthnLoadError(index, str(exc)) from None
    return built
