"""SCRAM-SHA-256 as an MQTT 5.0 enhanced authentication method (RFC 7804 / 5802).

The exchange, carried in Authentication Data:

    CONNECT  client-first   ->
             <- AUTH 0x18   server-first (salt, iterations, nonce)
    AUTH 0x18 client-final  ->
             <- CONNACK     server-final (the server's proof)

Re-authentication (AUTH 0x19) runs the same exchange on an open connection
and ends with AUTH 0x00. The message arithmetic is the ``scramp`` package's,
which also serves PostgreSQL drivers; this module adapts it to the broker's
AuthMethod interface and fetches credentials, possibly asynchronously.

Credentials are stored as SCRAM keeps them (salt, iterations, StoredKey,
ServerKey), never as passwords.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable

import attrs
from scramp import ScramException, ScramMechanism

from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import AuthRequest, AuthResult, AuthStep
from bastionmq.broker.properties import Reason

log = logging.getLogger("bastionmq.auth")

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
#: RFC 7677 asks for at least 4096 iterations of SCRAM-SHA-256.
MIN_ITERATIONS = 4096

_FAILED = AuthResult(Reason.BAD_USER_NAME_OR_PASSWORD)
_MALFORMED = AuthResult(Reason.NOT_AUTHORIZED)


@attrs.define(slots=True, frozen=True)
class ScramCredentials:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int
    superuser: bool = False

    @classmethod
    def from_password(cls, password: str, iterations: int = DEFAULT_ITERATIONS,
                      superuser: bool = False) -> ScramCredentials:
        # Checked here, not left to scramp: its older releases accept fewer.
        if iterations < MIN_ITERATIONS:
            raise ScramException(f"at least {MIN_ITERATIONS} iterations are needed "
                                 f"(RFC 7677), not {iterations}")
        salt, stored_key, server_key, iterations = ScramMechanism(MECHANISM).make_auth_info(
            password, iteration_count=iterations)
        return cls(salt, stored_key, server_key, iterations, superuser)


#: Looks up a user's credentials: None for an unknown user; may be a coroutine.
CredentialLookup = Callable[[str], "ScramCredentials | None | Awaitable[ScramCredentials | None]"]


class ScramUsers:
    """Credentials held in memory, for embedding applications and tests."""

    def __init__(self) -> None:
        self._users: dict[str, ScramCredentials] = {}

    def add(self, username: str, password: str, iterations: int = DEFAULT_ITERATIONS,
            superuser: bool = False) -> None:
        self._users[username] = ScramCredentials.from_password(password, iterations, superuser)

    def remove(self, username: str) -> None:
        self._users.pop(username, None)

    def lookup(self, username: str) -> ScramCredentials | None:
        return self._users.get(username)


class ScramSha256:
    """The SCRAM-SHA-256 authentication method.

    ``credentials`` is a ScramUsers or any callable that answers a username
    with its ScramCredentials (or None), directly or as an awaitable.
    """

    name = MECHANISM

    def __init__(self, credentials: ScramUsers | CredentialLookup) -> None:
        self._lookup = credentials.lookup if isinstance(credentials, ScramUsers) else credentials
        self._mechanism = ScramMechanism(MECHANISM)

    def begin(self, request: AuthRequest) -> _Conversation:
        return _Conversation(self, request)


class _Conversation:
    __slots__ = ("_method", "_request", "_server", "_username", "_superuser")

    def __init__(self, method: ScramSha256, request: AuthRequest) -> None:
        self._method = method
        self._request = request
        self._server: Any = None
        self._username = ""
        self._superuser = False

    def step(self, data: bytes | None) -> AuthStep | Awaitable[AuthStep]:
        if self._server is None:
            return self._client_first(data)
        return self._client_final(data)

    def _client_first(self, data: bytes | None) -> AuthStep | Awaitable[AuthStep]:
        try:
            message = (data or b"").decode("utf-8")
            username = _username_of(message)
        except ValueError as exc:
            return self._refuse(_MALFORMED, f"malformed client-first message: {exc}")
        found = self._method._lookup(username)
        if inspect.isawaitable(found):
            return self._client_first_async(message, username, found)
        return self._server_first(message, username, found)

    async def _client_first_async(self, message: str, username: str, pending) -> AuthStep:
        return self._server_first(message, username, await pending)

    def _server_first(self, message: str, username: str,
                      credentials: ScramCredentials | None) -> AuthStep:
        if credentials is None:
            return self._refuse(_FAILED, f"unknown user {shown(username)}")
        self._username = username
        self._superuser = credentials.superuser
        info = (credentials.salt, credentials.stored_key, credentials.server_key,
                credentials.iterations)
        self._server = self._method._mechanism.make_server(lambda _name: info)
        try:
            self._server.set_client_first(message)
            return AuthStep(data=self._server.get_server_first().encode("utf-8"))
        except ScramException as exc:
            return self._refuse(_MALFORMED, f"client-first refused: {exc}")

    def _client_final(self, data: bytes | None) -> AuthStep:
        server = self._server
        try:
            server.set_client_final((data or b"").decode("utf-8"))
        except (ScramException, UnicodeDecodeError) as exc:
            # A known user with a wrong proof: counted against that user.
            return self._refuse(attrs.evolve(_FAILED, identity=self._username),
                                f"client-final refused for {shown(self._username)}: {exc}")
        result = AuthResult(superuser=self._superuser, identity=self._username)
        return AuthStep(data=server.get_server_final().encode("utf-8"), result=result)

    def _refuse(self, result: AuthResult, why: str) -> AuthStep:
        peer = self._request.peer
        log.info("SCRAM authentication of client %s from %s on %s failed: %s",
                 shown(self._request.client_id), peer.host, peer.listener, why)
        return AuthStep(result=result)


def _username_of(client_first: str) -> str:
    """The user name of a client-first message ("n,,n=user,r=nonce"), with
    RFC 5802's escapes (=2C for ',' and =3D for '=') undone."""
    parts = client_first.split(",", 3)
    if len(parts) < 4 or not parts[2].startswith("n="):
        raise ValueError("expected a GS2 header, then n=<user>,r=<nonce>")
    name = parts[2][2:]
    if not name:
        raise ValueError("empty user name")
    return name.replace("=2C", ",").replace("=3D", "=")
