"""The authentication mechanisms an ``authentication`` list names, each an
authenticator of the chain (auth.chain): ``cert`` (the verified client
certificate) and ``password_based`` with its backends ``password_file``
(Mosquitto's) and ``built_in_database`` (``bastionmq users``).
SCRAM runs as an enhanced authentication method instead (auth.scram).
"""

from __future__ import annotations

from typing import Any, Awaitable

from bastionmq.broker.ports import ALLOW, AuthRequest, AuthResult
from bastionmq.broker.properties import Reason

from .identity import NoIdentity, certificate_value
from .mosquitto_passwd import load_password_file


class CertAuthenticator:
    """``mechanism = cert``: a verified client certificate authenticates its
    client; optionally its identity must equal the username or client id
    sent. No verified certificate: denied."""

    name = "cert"
    source = "cert"

    def __init__(self, identity: str = "cn", must_match: str = "none") -> None:
        self.identity = identity
        self.must_match = must_match

    def authenticate(self, request: AuthRequest) -> AuthResult | None:
        certificate = request.peer.certificate
        if certificate is None:
            return AuthResult(Reason.NOT_AUTHORIZED)
        if self.must_match == "none":
            return ALLOW
        try:
            value = certificate_value(certificate, self.identity)
        except NoIdentity:
            return AuthResult(Reason.NOT_AUTHORIZED)
        if self.must_match == "username" and request.username != value:
            return AuthResult(Reason.BAD_USER_NAME_OR_PASSWORD)
        if self.must_match == "clientid" and request.client_id != value:
            return AuthResult(Reason.CLIENT_IDENTIFIER_NOT_VALID)
        return ALLOW


class PasswordFileAuthenticator:
    """``mechanism = password_based, backend = password_file``: Mosquitto's
    password_file. An unknown user (or no username) is passed on."""

    name = "password_file"
    source = "password_based:password_file"

    def __init__(self, path: str) -> None:
        self.path = path
        self.passwords = load_password_file(path)

    def reload(self) -> None:
        self.passwords = load_password_file(self.path)

    def authenticate(self, request: AuthRequest) -> AuthResult | None:
        username = request.username
        if username is None or username not in self.passwords:
            return None
        if self.passwords.verify(username, request.password):
            return ALLOW
        return AuthResult(Reason.BAD_USER_NAME_OR_PASSWORD)


class BuiltinPasswordAuthenticator:
    """``mechanism = password_based, backend = built_in_database``: users kept
    with ``bastionmq users``. An unknown user is passed on; the check (a
    database read, a hash that may take milliseconds) never blocks the loop."""

    name = "built_in_database"
    source = "password_based:built_in_database"

    def __init__(self, database: Any, user_id_type: str) -> None:
        self.database = database
        self.user_id_type = user_id_type

    def authenticate(self, request: AuthRequest) -> Awaitable[AuthResult | None] | None:
        user_id = request.username if self.user_id_type == "username" else request.client_id
        if not user_id:
            return None
        return self._check(user_id, request.password)

    async def _check(self, user_id: str, password: bytes | None) -> AuthResult | None:
        from .builtin_db import CheckOutcome
        checked = await self.database.check_password(user_id, self.user_id_type, password)
        if checked.outcome is CheckOutcome.UNKNOWN_USER:
            return None
        if checked.outcome is CheckOutcome.BAD_PASSWORD:
            return AuthResult(Reason.BAD_USER_NAME_OR_PASSWORD)
        return AuthResult(superuser=checked.user.is_superuser)
