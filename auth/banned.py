"""The operator's ban list (EMQX's "banned"): client ids, usernames and
peer addresses refused at CONNECT, before any authenticator is asked.

Unlike the short bans after failed logins (auth/ban.py), these are set by
an operator through the management API, kept in the built-in database so
that they survive a restart, and apply to every listener and to clients
with a verified certificate too. Setting one disconnects the clients it
names.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Iterable

from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import AuthRequest, AuthResult

from .builtin_db import Ban
from .chain import BANNED

log = logging.getLogger("bastionmq.auth")


class OperatorBans:
    """The bans in force, indexed by (kind, value)."""

    def __init__(self, bans: Iterable[Ban] = (), clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._bans: dict[tuple[str, str], Ban] = {}
        for ban in bans:
            self.add(ban)

    def add(self, ban: Ban) -> None:
        self._bans[ban.kind, ban.value] = ban

    def remove(self, kind: str, value: str) -> Ban | None:
        return self._bans.pop((kind, value), None)

    def __iter__(self) -> Any:
        self._drop_ended()
        return iter(sorted(self._bans.values(), key=lambda ban: (ban.kind, ban.value)))

    def __len__(self) -> int:
        return len(self._bans)

    def ban_of(self, client_id: str | None, username: str | None, host: str) -> Ban | None:
        """The ban that refuses a client with these names, if one is in force."""
        bans = self._bans
        if not bans:
            return None
        for kind, value in (("clientid", client_id), ("username", username), ("peerhost", host)):
            if not value:
                continue
            ban = bans.get((kind, value))
            if ban is not None:
                if ban.until is None or ban.until > self.clock():
                    return ban
                del bans[kind, value]
        return None

    def _drop_ended(self) -> None:
        now = self.clock()
        for key, ban in list(self._bans.items()):
            if ban.until is not None and ban.until <= now:
                del self._bans[key]


class BannedFirst:
    """The broker's authenticator with the operator's bans checked first."""

    def __init__(self, inner: Any, bans: OperatorBans, refused: Callable[[], None]) -> None:
        self.inner = inner
        self.bans = bans
        #: Counts a refusal where the chains count theirs.
        self._refused = refused

    def _refuse(self, request: AuthRequest) -> AuthResult | None:
        ban = self.bans.ban_of(request.client_id, request.username, request.peer.host)
        if ban is None:
            return None
        self._refused()
        log.info("refusing client %s from %s on %s: %s %s is banned%s",
                 shown(request.client_id), request.peer.host, request.peer.listener, ban.kind,
                 shown(ban.value), f" ({ban.reason})" if ban.reason else "")
        return BANNED

    def authenticate(self, request: AuthRequest) -> AuthResult | Awaitable[AuthResult]:
        refused = self._refuse(request)
        return refused if refused is not None else self.inner.authenticate(request)

    def admit_method(self, request: AuthRequest, method: str) -> AuthResult | None:
        refused = self._refuse(request)
        return refused if refused is not None else self.inner.admit_method(request, method)

    def method_finished(self, request: AuthRequest, result: AuthResult) -> AuthResult:
        return self.inner.method_finished(request, result)
