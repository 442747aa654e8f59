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

from .ports import AccessRequest, ClientInfo


class Authorizer(Protocol):
    """Decides whether a client may publish or subscribe."""

    #: "ignore" answers a denied PUBLISH with a refusal; "disconnect" closes.
    deny_action: str
    #: Decisions cached per client (0: no cache) and for how long, seconds.
    cache_max_size: int
    cache_ttl: float

    def authorize(self, request: AccessRequest) -> bool: ...


class AccessControl:
    __slots__ = ("authorizer", "loop", "max_size", "ttl")

    def __init__(self, authorizer: Authorizer, loop: asyncio.AbstractEventLoop) -> None:
        self.authorizer = authorizer
        self.loop = loop
        self.max_size = authorizer.cache_max_size
        self.ttl = authorizer.cache_ttl

    @property
    def disconnect_on_deny(self) -> bool:
        return self.authorizer.deny_action == "disconnect"

    def new_cache(self) -> dict | None:
        return {} if self.max_size else None

    def permits(self, client: ClientInfo, cache: dict | None, action: str, topic: str,
                qos: int = 0, retain: bool = False) -> bool:
        if client.superuser:
            return True
        key = (action, topic, qos, retain)
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                if hit[1] > self.loop.time():
                    return hit[0]
                del cache[key]
        allowed = self.authorizer.authorize(
            AccessRequest(client=client, action=action, topic=topic, qos=qos, retain=retain))
        if cache is not None:
            if len(cache) >= self.max_size:
                del cache[next(iter(cache))]  # the oldest entry
            cache[key] = (allowed, self.loop.time() + self.ttl)
        return allowed
