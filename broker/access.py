"""Authorization as the core applies it: the authorizer's decisions, cached
per client.

The authorizer (the acl/ chain) is handed in by the application. The cache
keeps a client's recent decisions (EMQX's ``authorization.cache``) so that a
client publishing to the same topics pays one dictionary lookup per
message, not a walk through its rules.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .ports import PUBLISH_ACTION, SUBSCRIBE_ACTION, AccessRequest, ClientInfo

#: The actions the authorizer is asked about, in the order of the counters.
ACTIONS = (PUBLISH_ACTION, SUBSCRIBE_ACTION)


class Authorizer(Protocol):
    """Decides whether a client may publish or subscribe."""

    #: "ignore" answers a denied PUBLISH with a refusal; "disconnect" closes.
    deny_action: str
    #: Decisions cached per client (0: no cache) and for how long, seconds.
    cache_max_size: int
    cache_ttl: float

    def authorize(self, request: AccessRequest) -> bool: ...

    # An authorizer may also have ``decide(request) -> (allowed, source)``,
    # which says what decided (acl.chain: a source's type, or "no_match");
    # the decisions are counted by it. Without one they count as "authorizer".


class AccessControl:
    __slots__ = ("authorizer", "loop", "max_size", "ttl", "cache_hits", "superuser",
                 "decided", "_decide")

    def __init__(self, authorizer: Authorizer, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Decisions the caches answered, at ``2 * (index in ACTIONS) +
        #: allowed``: each cache entry keeps its index, so counting a hit is
        #: one addition (what the authorizer decides counts in ``decided``).
        self.cache_hits = [0] * (2 * len(ACTIONS))
        #: Requests of superusers, let through without asking, by action.
        self.superuser = dict.fromkeys(ACTIONS, 0)
        #: What the authorizer decided, by (action, allowed, source); kept
        #: here so that the counts go on across a reload's new authorizer.
        self.decided: dict[tuple[str, bool, str], int] = {}
        self.use(authorizer)

    def use(self, authorizer: Authorizer) -> None:
        """Decide with ``authorizer`` from now on (a reload); the caller
        clears the caches."""
        self.authorizer = authorizer
        self._decide = getattr(authorizer, "decide", None)
        self.max_size = authorizer.cache_max_size
        self.ttl = authorizer.cache_ttl

    @property
    def disconnect_on_deny(self) -> bool:
        return self.authorizer.deny_action == "disconnect"

    def new_cache(self) -> dict | None:
        return {} if self.max_size else None

    def cache_decisions(self) -> dict[tuple[str, bool], int]:
        """The decisions the caches answered, by (action, allowed)."""
        return {(action, bool(allowed)): self.cache_hits[2 * index + allowed]
                for index, action in enumerate(ACTIONS) for allowed in (0, 1)}

    def permits(self, client: ClientInfo, cache: dict | None, action: str, topic: str,
                qos: int = 0, retain: bool = False) -> bool:
        if client.superuser:
            self.superuser[action] += 1
            return True
        key = (action, topic, qos, retain)
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                if hit[1] > self.loop.time():
                    self.cache_hits[hit[2]] += 1
                    return hit[0]
                del cache[key]
        request = AccessRequest(client=client, action=action, topic=topic, qos=qos,
                                retain=retain)
        if self._decide is not None:
            allowed, source = self._decide(request)
        else:
            allowed, source = self.authorizer.authorize(request), "authorizer"
        decided = (action, allowed, source)
        self.decided[decided] = self.decided.get(decided, 0) + 1
        if cache is not None:
            if len(cache) >= self.max_size:
                del cache[next(iter(cache))]  # the oldest entry
            cache[key] = (allowed, self.loop.time() + self.ttl,
                          2 * ACTIONS.index(action) + allowed)
        return allowed
