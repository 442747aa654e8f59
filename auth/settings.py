"""The settings of authentication: each entry of an ``authentication`` chain,
and the ban after repeated failed logins (EMQX's names)."""

from __future__ import annotations

import attrs
from attrs import validators as v

from bastionmq.broker.settings import peer_cert_source

from .passwords import PasswordHash


AUTHN_MECHANISMS = ("password_based", "cert", "scram")
AUTHN_BACKENDS = ("built_in_database", "password_file")


@attrs.define(slots=True, frozen=True, kw_only=True)
class AuthenticatorConfig:
    """One entry of an ``authentication`` list (EMQX's names)."""

    #: password_based (username and password), cert (the verified client
    #: certificate) or scram (MQTT 5 enhanced authentication, SCRAM-SHA-256).
    mechanism: str = attrs.field(validator=v.in_(AUTHN_MECHANISMS))
    #: password_based: built_in_database (bastionmq users ...) or
    #: password_file (Mosquitto's); scram: built_in_database.
    backend: str | None = attrs.field(default=None, validator=v.optional(v.in_(AUTHN_BACKENDS)))
    enable: bool = True
    #: password_file: the file.
    path: str | None = None
    #: built_in_database: whether users are looked up by username or client id.
    user_id_type: str = attrs.field(default="username",
                                    validator=v.in_(("username", "clientid")))
    #: built_in_database: how new passwords are hashed.
    password_hash_algorithm: PasswordHash = attrs.field(factory=PasswordHash)
    #: cert: the certificate value compared when must_match is set.
    identity: str = attrs.field(default="cn", validator=peer_cert_source)
    #: cert: none, or username / clientid: the client must have sent the
    #: certificate's identity as that.
    must_match: str = attrs.field(default="none",
                                  validator=v.in_(("none", "username", "clientid")))
    #: scram: the hash (sha256) and the iterations for new credentials.
    algorithm: str = attrs.field(default="sha256", validator=v.in_(("sha256",)))
    iteration_count: int = attrs.field(default=4096, validator=[v.ge(4096), v.le(10_000_000)])

    def __attrs_post_init__(self) -> None:
        if self.mechanism == "password_based" and self.backend is None:
            raise ValueError("password_based needs a backend: built_in_database or password_file")
        if self.mechanism == "scram" and self.backend not in (None, "built_in_database"):
            raise ValueError("scram keeps its credentials in built_in_database")
        if self.mechanism == "cert" and self.backend is not None:
            raise ValueError("cert takes no backend")
        if self.backend == "password_file" and not self.path:
            raise ValueError("backend = password_file needs a path")


@attrs.define(slots=True, frozen=True, kw_only=True)
class AuthnBanConfig:
    """A short ban after repeated failed logins (brute-force protection)."""

    enable: bool = True
    #: Failed logins within window that trigger a ban.
    max_failures: int = attrs.field(default=5, validator=v.ge(1))
    window: float = attrs.field(default=60.0, metadata={"unit": "duration"}, validator=v.gt(0))
    #: How long a ban lasts.
    ban_time: float = attrs.field(default=300.0, metadata={"unit": "duration"},
                                  validator=v.gt(0))
    #: What failures are counted by: clientid, username, peerhost (an
    #: address may be a whole network behind NAT, hence not by default).
    by: tuple[str, ...] = attrs.field(default=("clientid", "username"),
                                      validator=v.deep_iterable(
                                          v.in_(("clientid", "username", "peerhost"))))
