"""Authorization as the core applies it: the authorizer's decisions, cached
per client.

The authorizer (the acl/ chain) is handed in by the application. The cache
keeps a client's recent decisions (EMQX's ``authorization.cache``) so that a
client publishing to the same topics pays one dictionary lookup per
message, not a walk through its rules.

A source may answer later (an embedding application's async authorize
hook): ``permits`` then returns a ``Pending`` decision, which is false, so
that a caller not written for it denies. The callers that can wait make what
depends on the decision wait for it: a client's PUBLISH or SUBSCRIBE (its
packets are held, as for an async authentication), a delivery to a
subscriber (held with the later messages of the same topic, so their order
is kept), a will. The answer is kept for ``cache_ttl``, and at least
ASYNC_ANSWER_SECONDS, so that the question asked again when what waited
goes on finds it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Protocol

from .ports import PUBLISH_ACTION, SUBSCRIBE_ACTION, AccessRequest, ClientInfo

log = logging.getLogger("bastionmq.access")

#: Seconds an answer that came later is kept, at the least.
ASYNC_ANSWER_SECONDS = 30.0

#: Answers that came later kept at once, at most (the oldest go first).
ASYNC_ANSWERS_LIMIT = 100_000


class Pending:
    """A decision under way. False, so that a caller that does not wait
    denies; ``then(callback)`` calls ``callback(allowed)`` when it is made,
    in the order the callbacks were given."""

    __slots__ = ("callbacks", "allowed")

    def __init__(self) -> None:
        self.callbacks: list[Callable[[bool], Any]] = []
        self.allowed: bool | None = None

    def __bool__(self) -> bool:
        return False

    def then(self, callback: Callable[[bool], Any]) -> None:
        if self.allowed is None:
            self.callbacks.append(callback)
        else:
            callback(self.allowed)

    def decided(self, allowed: bool) -> None:
        self.allowed = allowed
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            try:
                callback(allowed)
            except Exception:
                log.exception("acting on an authorization decision failed")

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
    # ``decide`` may return an awaitable of that pair instead (a source that
    # answers later).


class AccessControl:
    __slots__ = ("authorizer", "loop", "max_size", "ttl", "cache_hits", "superuser",
                 "decided", "_decide", "pending", "answers")

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
        #: Decisions under way, and answers that came later with the time
        #: they expire, by (id of the client, action, topic, qos, retain);
        #: the client is kept with them so that its id is not reused meanwhile.
        self.pending: dict[tuple, tuple[ClientInfo, Pending]] = {}
        self.answers: dict[tuple, tuple[ClientInfo, bool, float]] = {}
        self.use(authorizer)

    def use(self, authorizer: Authorizer) -> None:
        """Decide with ``authorizer`` from now on (a reload); the caller
        clears the caches."""
        self.authorizer = authorizer
        self._decide = getattr(authorizer, "decide", None)
        self.answers.clear()  # given by sources that may be gone
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
                qos: int = 0, retain: bool = False) -> bool | Pending:
        """Whether ``client`` may do ``action`` on ``topic``: True, False,
        or a Pending decision (false) when a source answers later."""
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
        if self.answers or self.pending:
            asked = (id(client), *key)
            answer = self.answers.get(asked)
            if answer is not None and answer[0] is client:
                if answer[2] > self.loop.time():
                    return answer[1]
                del self.answers[asked]
            waiting = self.pending.get(asked)
            if waiting is not None and waiting[0] is client:
                return waiting[1]
        request = AccessRequest(client=client, action=action, topic=topic, qos=qos,
                                retain=retain)
        if self._decide is not None:
            decision = self._decide(request)
            if type(decision) is not tuple:
                return self._later(client, key, decision)
            allowed, source = decision
        else:
            allowed, source = self.authorizer.authorize(request), "authorizer"
        self._count(action, allowed, source)
        if cache is not None:
            if len(cache) >= self.max_size:
                del cache[next(iter(cache))]  # the oldest entry
            cache[key] = (allowed, self.loop.time() + self.ttl,
                          2 * ACTIONS.index(action) + allowed)
        return allowed

    def _count(self, action: str, allowed: bool, source: str) -> None:
        decided = (action, allowed, source)
        self.decided[decided] = self.decided.get(decided, 0) + 1

    def _later(self, client: ClientInfo, key: tuple, decision: Awaitable[tuple[bool, str]]
               ) -> Pending:
        """Wait for a decision a source makes later, in a task of its own;
        what depends on it waits on the Pending returned."""
        pending = Pending()
        asked = (id(client), *key)
        self.pending[asked] = (client, pending)
        self.loop.create_task(self._decide_later(client, key, asked, pending, decision),
                              name="bastionmq authorization")
        return pending

    async def _decide_later(self, client: ClientInfo, key: tuple, asked: tuple,
                            pending: Pending, decision: Awaitable[tuple[bool, str]]) -> None:
        try:
            allowed, source = await decision
        except Exception:  # the chain's sources log their own failures
            log.exception("authorization of %s failed; denied", client.client_id)
            allowed, source = False, "error"
        self._count(key[0], allowed, source)
        if self.pending.get(asked, (None, None))[1] is pending:
            del self.pending[asked]
        answers = self.answers
        if len(answers) >= ASYNC_ANSWERS_LIMIT:
            del answers[next(iter(answers))]
        answers[asked] = (client, allowed,
                          self.loop.time() + max(self.ttl, ASYNC_ANSWER_SECONDS))
        pending.decided(allowed)
