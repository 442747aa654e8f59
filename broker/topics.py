"""Topic names and filters: validation, and the subscription trie.

The trie holds one node per filter level, with '+' and '#' as ordinary child
keys. A publish walks it once per topic, and the result is cached per topic
name until a subscribe or unsubscribe changes the trie, so a busy topic costs
one dictionary lookup.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, Iterator, TypeVar

S = TypeVar("S", bound=Hashable)

#: Cached match results kept at most; beyond it the cache starts afresh,
#: which bounds its memory whatever topics clients invent.
MATCH_CACHE_SIZE = 65536
#: ... and topic characters it holds (16 MiB), at most.
MATCH_CACHE_BYTES = 16 * 1024 * 1024


class InvalidTopic(ValueError):
    """A topic name or filter breaks the rules of 4.7."""


def validate_filter(topic_filter: str, max_levels: int = 65535) -> None:
    if not topic_filter:
        raise InvalidTopic("empty topic filter")  # [MQTT-4.7.3-1]
    levels = topic_filter.split("/")
    if len(levels) > max_levels:
        raise InvalidTopic(f"more than {max_levels} topic levels")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise InvalidTopic("'#' must be the last level on its own")  # [MQTT-4.7.1-2]
        if "+" in level and level != "+":
            raise InvalidTopic("'+' must occupy a whole level")  # [MQTT-4.7.1-3]


def validate_topic_name(topic: str, max_levels: int = 65535) -> None:
    """Every rule a topic name of a PUBLISH obeys (4.7, 1.5.4)."""
    if not topic:
        raise InvalidTopic("empty topic name")  # [MQTT-4.7.3-1]
    if "+" in topic or "#" in topic:
        raise InvalidTopic("wildcard in a topic name")  # [MQTT-4.7.1-1]
    if "\x00" in topic:
        raise InvalidTopic("U+0000 in a topic name")  # [MQTT-1.5.4-2]
    try:
        encoded = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTopic("a topic name must be valid Unicode (no lone surrogates)") from None
    if len(encoded) > 65535:
        raise InvalidTopic("topic name longer than 65535 bytes")  # 1.5.4
    if topic.count("/") >= max_levels:
        raise InvalidTopic(f"more than {max_levels} topic levels")


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether one filter matches one topic name (for retained lookups,
    authorizing a PUBLISH, and tests): a name has no wildcards, so this is
    ``filter_covers`` on a name."""
    return filter_covers(topic_filter, topic)


def filter_covers(rule: str, subscription: str) -> bool:
    """Whether every topic ``subscription`` can match is matched by ``rule``,
    for authorizing a SUBSCRIBE: a wildcard in the subscription must meet an
    equal or wider wildcard in the rule ('+' by '+' or '#', '#' only by '#').
    A topic name without wildcards is covered exactly when ``rule`` matches it.
    """
    if subscription.startswith("$") and rule[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    rule_levels = rule.split("/")
    sub_levels = subscription.split("/")
    for index, level in enumerate(rule_levels):
        if level == "#":
            return True
        if index >= len(sub_levels):
            return False
        wanted = sub_levels[index]
        if wanted == "#":
            return False  # only a '#' in the rule covers a '#'
        if level == "+":
            continue
        if level != wanted:
            return False
    return len(rule_levels) == len(sub_levels)


def find_path(root: Any, topic: str) -> tuple[list[tuple[Any, str]], Any] | None:
    """The (parent, level) pairs from ``root`` down to the node of ``topic``, and
    that node; None when the tree has no such node. Nodes keep ``children``."""
    path = []
    node = root
    for level in topic.split("/"):
        child = node.children.get(level)
        if child is None:
            return None
        path.append((node, level))
        node = child
    return path, node


def prune(path: list[tuple[Any, str]], node: Any, is_empty: Callable[[Any], bool]) -> None:
    """Remove the nodes at the end of ``path`` that hold nothing any more, so
    that a tree does not keep dead branches."""
    while path and not node.children and is_empty(node):
        parent, level = path.pop()
        del parent.children[level]
        node = parent


class _Node:
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscribers: dict[Any, Any] = {}


class SubscriptionTrie(Generic[S]):
    """Maps filters to subscribers; ``match`` returns every subscriber of a topic.

    A subscriber is any hashable key (the core uses its sessions) with a value
    (the subscription's options); one key holds at most one value per filter.
    """

    __slots__ = ("_root", "_cache", "_cache_bytes", "_count", "_merge")

    def __init__(self, merge: Callable[[list[tuple[S, Any]], str], list] | None = None) -> None:
        self._root = _Node()
        self._cache: dict[str, list] = {}
        #: Characters of the topics cached: the cache is bounded by this too,
        #: since a topic name may be 65,535 bytes long.
        self._cache_bytes = 0
        self._count = 0
        #: Turns the raw matches of a topic into what ``match`` returns (and caches).
        self._merge = merge

    def __len__(self) -> int:
        return self._count

    def add(self, topic_filter: str, subscriber: S, value: Any) -> bool:
        """Subscribe; returns False when it replaced an existing subscription."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        is_new = subscriber not in node.subscribers
        node.subscribers[subscriber] = value
        self._count += is_new
        self.forget_matches()
        return is_new

    def remove(self, topic_filter: str, subscriber: S) -> bool:
        """Unsubscribe; returns False when there was no such subscription."""
        found = find_path(self._root, topic_filter)
        if found is None or subscriber not in found[1].subscribers:
            return False
        path, node = found
        del node.subscribers[subscriber]
        self._count -= 1
        self.forget_matches()
        prune(path, node, lambda n: not n.subscribers)
        return True

    def forget_matches(self) -> None:
        """Drop the cached matches (on a change of the subscriptions, or of
        something else that what ``merge`` made of them depends on)."""
        self._cache.clear()
        self._cache_bytes = 0

    def forget_match(self, topic: str) -> None:
        """Drop the cached match of one topic."""
        if self._cache.pop(topic, None) is not None:
            self._cache_bytes -= len(topic)

    def match(self, topic: str) -> list:
        """Every (subscriber, value) whose filter matches ``topic``, passed
        through ``merge`` when one was given (a subscriber with several matching
        filters appears once per filter before merging).
        """
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: list[tuple[S, Any]] = []
        levels = topic.split("/")
        self._collect(self._root, levels, 0, found, topic.startswith("$"))
        if self._merge is not None and found:
            found = self._merge(found, topic)
        if len(self._cache) >= MATCH_CACHE_SIZE or self._cache_bytes >= MATCH_CACHE_BYTES:
            self.forget_matches()
        self._cache[topic] = found
        self._cache_bytes += len(topic)
        return found

    def _collect(self, node: _Node, levels: list[str], index: int,
                 found: list, dollar: bool) -> None:
        children = node.children
        # '$' topics are not matched by a wildcard in the first level [MQTT-4.7.2-1].
        wildcards_ok = not (dollar and index == 0)
        if wildcards_ok:
            multi = children.get("#")
            if multi is not None:
                found.extend(multi.subscribers.items())
        if index == len(levels):
            found.extend(node.subscribers.items())
            return
        child = children.get(levels[index])
        if child is not None:
            self._collect(child, levels, index + 1, found, dollar)
        if wildcards_ok:
            single = children.get("+")
            if single is not None:
                self._collect(single, levels, index + 1, found, dollar)

    def filters(self) -> Iterator[tuple[str, S, Any]]:
        """Every (filter, subscriber, value); for diagnostics and tests."""
        stack = [(self._root, "")]
        while stack:
            node, prefix = stack.pop()
            for subscriber, value in node.subscribers.items():
                yield prefix, subscriber, value
            for level, child in node.children.items():
                stack.append((child, f"{prefix}/{level}" if prefix or node is not self._root else level))
