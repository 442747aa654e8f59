"""The settings of authorization (EMQX's ``authorization``): its sources in
order, the decision cache, and what no rule and a denial mean."""

from __future__ import annotations

import attrs
from attrs import validators as v


ACL_SOURCE_TYPES = ("file", "mosquitto_acl", "built_in_database")


@attrs.define(slots=True, frozen=True, kw_only=True)
class AclSourceConfig:
    """One entry of ``authorization.sources``."""

    #: file (EMQX's acl.conf), mosquitto_acl (Mosquitto's acl_file) or
    #: built_in_database (rules kept by ``bastionmq acl``).
    type: str = attrs.field(validator=v.in_(ACL_SOURCE_TYPES))
    enable: bool = True
    #: The rules file, for file and mosquitto_acl.
    path: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.type != "built_in_database" and not self.path:
            raise ValueError(f"a {self.type} source needs a path")


@attrs.define(slots=True, frozen=True, kw_only=True)
class AuthzCacheConfig:
    """Each client's recent authorization decisions, kept to spare the rules."""

    enable: bool = True
    max_size: int = attrs.field(default=32, validator=[v.ge(1), v.le(1_000_000)])
    ttl: float = attrs.field(default=60.0, metadata={"unit": "duration"}, validator=v.gt(0))


@attrs.define(slots=True, frozen=True, kw_only=True)
class AuthorizationConfig:
    """Who may publish and subscribe to what (EMQX's ``authorization``)."""

    #: What happens when no source has a rule for the case.
    no_match: str = attrs.field(default="allow", validator=v.in_(("allow", "deny")))
    #: ignore: a denied PUBLISH or SUBSCRIBE is refused (reason 0x87) and the
    #: client stays; disconnect: the client is disconnected.
    deny_action: str = attrs.field(default="ignore", validator=v.in_(("ignore", "disconnect")))
    cache: AuthzCacheConfig = attrs.field(factory=AuthzCacheConfig)
    #: Consulted in order until one says allow or deny.
    sources: tuple[AclSourceConfig, ...] = ()

    @property
    def active(self) -> bool:
        """Whether anything can be denied at all."""
        return bool(self.sources) or self.no_match == "deny"
