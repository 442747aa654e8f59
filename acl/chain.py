"""The authorization chain (EMQX's ``authorization`` block).

Sources are asked in order; the first that says allow or deny decides. When
none has a rule for the case, ``no_match`` decides. Superusers are never
asked about (broker.access lets them through before the chain). A source
may answer with an awaitable (an async authorize hook): the chain's
decision is then an awaitable too, and the sources after it are asked once
it has answered "ignore".
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable, Sequence

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
        """Whether ``request`` is allowed now: a source that would answer
        later denies here (broker.access, which can wait, uses ``decide``)."""
        decision = self.decide(request)
        if isinstance(decision, tuple):
            return decision[0]
        if inspect.iscoroutine(decision):
            decision.close()  # never awaited: no warning about it
        return False

    def decide(self, request: AccessRequest, first: int = 0
               ) -> tuple[bool, str] | Awaitable[tuple[bool, str]]:
        """Whether ``request`` is allowed, and what decided: the type of the
        source whose rule matched (``file``, ``mosquitto_acl``,
        ``built_in_database``, ``hook``), or ``no_match``; an awaitable of
        that when a source answers later."""
        sources = self.sources
        for index in range(first, len(sources)):
            description, source = sources[index]
            decision = source.check(request)
            if decision is not None:
                if type(decision) is not str and inspect.isawaitable(decision):
                    return self._decide_later(request, index, decision)
                return decision == ALLOW_ACCESS, description.partition(" ")[0]
        return self.no_match_allows, "no_match"

    async def _decide_later(self, request: AccessRequest, index: int,
                            answer: Awaitable[str | None]) -> tuple[bool, str]:
        decision = await answer
        if decision is None:
            later = self.decide(request, index + 1)
            return await later if not isinstance(later, tuple) else later
        return decision == ALLOW_ACCESS, self.sources[index][0].partition(" ")[0]
