"""The authorization chain (EMQX's ``authorization`` block).

Sources are asked in order; the first that says allow or deny decides. When
none has a rule for the case, ``no_match`` decides. Superusers are never
asked about (broker.access lets them through before the chain).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from bastionmq.broker.ports import ALLOW_ACCESS, AccessRequest, AclSource
from bastionmq.broker.settings import SettingError

log = logging.getLogger("bastionmq.acl")


class AclLoadError(SettingError):
    """A source that cannot be loaded: its key is its place in ``sources``
    and the field at fault."""

    def __init__(self, index: int, key: str, message: str) -> None:
        super().__init__(f"{index}.{key}", message)


def load_sources(configs: Sequence[Any], loaders: dict[str, Callable[[Any], AclSource]]
                 ) -> list[tuple[str, AclSource]]:
    """(description, source) for each enabled source config, in order."""
    sources = []
    for index, config in enumerate(configs):
        if not config.enable:
            continue
        try:
            source = loaders[config.type](config)
        except (OSError, ValueError) as exc:
            raise AclLoadError(index, "path", str(exc)) from None
        sources.append((f"{config.type}" + (f" {config.path}" if config.path else ""), source))
    return sources


class AuthorizationChain:
    def __init__(self, sources: list[tuple[str, AclSource]], *, no_match: str,
                 deny_action: str, cache_max_size: int, cache_ttl: float) -> None:
        self.sources = sources
        self.no_match_allows = no_match == "allow"
        self.deny_action = deny_action
        self.cache_max_size = cache_max_size
        self.cache_ttl = cache_ttl

    def authorize(self, request: AccessRequest) -> bool:
        return self.decide(request)[0]

    def decide(self, request: AccessRequest) -> tuple[bool, str]:
        """Whether ``request`` is allowed, and what decided: the type of the
        source whose rule matched (``file``, ``mosquitto_acl``,
        ``built_in_database``), or ``no_match``."""
        for description, source in self.sources:
            decision = source.check(request)
            if decision is not None:
                return decision == ALLOW_ACCESS, description.partition(" ")[0]
        return self.no_match_allows, "no_match"
