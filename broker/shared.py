"""Shared subscriptions: ``$share/{group}/{filter}`` (4.8.2).

Each shared subscription (a share name together with a filter) is a group;
every message matching the filter goes to one member of the group, chosen by
the broker's strategy. The core keeps groups in their own trie, keyed by the
group, so joining or leaving a group does not invalidate the match cache.

Members that are connected and able to take output are preferred, then any
connected member, then (so that nothing is lost while every member is away)
a member whose session waits offline.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from .topics import InvalidTopic

SHARE_PREFIX = "$share/"

#: Strategy names, as EMQX spells them (``mqtt.shared_subscription_strategy``).
STRATEGIES = ("round_robin", "random", "hash_clientid", "hash_topic", "sticky")


def split_shared(topic_filter: str) -> tuple[str, str] | None:
    """(share name, filter) of a ``$share`` filter; None for an ordinary one.

    Raises InvalidTopic when the share name or the filter is missing, or the
    name holds a wildcard ([MQTT-4.8.2-1], [MQTT-4.8.2-2]).
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    name, slash, inner = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not name:
        raise InvalidTopic("a $share filter needs a share name")
    if "+" in name or "#" in name:
        raise InvalidTopic("a share name may not hold '+' or '#'")
    if not slash or not inner:
        raise InvalidTopic("a $share filter needs a topic filter after the share name")
    return name, inner


def shared_inner(topic_filter: str) -> str:
    """The filter a (validated) subscription matches topics with: without
    its ``$share/{group}/`` prefix."""
    shared = split_shared(topic_filter)
    return shared[1] if shared else topic_filter


def _available(session: Any) -> bool:
    outbox = session.outbox
    return outbox is not None and not outbox.paused


def _connected(session: Any) -> bool:
    return session.connection is not None


class SharedGroup:
    """The members of one shared subscription and the state its strategy keeps."""

    __slots__ = ("name", "filter", "members", "_order", "_next", "_sticky")

    def __init__(self, name: str, topic_filter: str) -> None:
        self.name = name
        self.filter = topic_filter
        #: session -> its SubscriptionEntry for this group.
        self.members: dict[Any, Any] = {}
        self._order: list[Any] = []
        self._next = 0
        self._sticky: Any = None

    def __repr__(self) -> str:
        return f"<SharedGroup {self.share_filter} ({len(self.members)} members)>"

    @property
    def share_filter(self) -> str:
        """The filter its members subscribed with: ``$share/{name}/{filter}``."""
        return f"{SHARE_PREFIX}{self.name}/{self.filter}"

    def add(self, session: Any, entry: Any) -> None:
        if session not in self.members:
            self._order.append(session)
        self.members[session] = entry

    def remove(self, session: Any) -> None:
        if self.members.pop(session, None) is not None:
            self._order.remove(session)
            if self._sticky is session:
                self._sticky = None

    def pick(self, strategy: str, topic: str, publisher: str,
             exclude: Any = None) -> Any:
        """The member session that gets the next message, or None if there is none."""
        order = self._order
        if exclude is not None:
            order = [s for s in order if s is not exclude]
        if not order:
            return None
        if strategy == "round_robin":
            return self._round_robin(order)
        for usable in (_available, _connected):
            candidates = [s for s in order if usable(s)]
            if candidates:
                break
        else:
            candidates = order
        if strategy == "random":
            return random.choice(candidates)
        if strategy == "hash_clientid":
            return candidates[zlib.crc32(publisher.encode()) % len(candidates)]
        if strategy == "hash_topic":
            return candidates[zlib.crc32(topic.encode()) % len(candidates)]
        # sticky: keep the member until it is no longer among the candidates.
        sticky = self._sticky
        if sticky is None or sticky not in candidates:
            sticky = self._sticky = random.choice(candidates)
        return sticky

    def _round_robin(self, order: list[Any]) -> Any:
        count = len(order)
        start = self._next
        for usable in (_available, _connected):
            for step in range(count):
                session = order[(start + step) % count]
                if usable(session):
                    self._next = (start + step + 1) % count
                    return session
        self._next = (start + 1) % count
        return order[start % count]
