"""Retained messages: one per topic, found by the filters of new subscriptions.

Stored in a tree of topic levels so that a wildcard subscription visits only
the branches its filter can match, not every retained message.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .topics import find_path, prune

M = TypeVar("M")


class _Level(Generic[M]):
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Level[M]] = {}
        self.message: M | None = None


class RetainedStore(Generic[M]):
    __slots__ = ("_root", "_count")

    def __init__(self) -> None:
        self._root: _Level[M] = _Level()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def set(self, topic: str, message: M) -> None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Level()
            node = child
        if node.message is None:
            self._count += 1
        node.message = message

    def get(self, topic: str) -> M | None:
        node: _Level[M] | None  # None once the topic leads nowhere
        node = self._root
        for level in topic.split("/"):
            node = node.children.get(level)
            if node is None:
                return None
        return node.message

    def delete(self, topic: str) -> bool:
        found = find_path(self._root, topic)
        if found is None or found[1].message is None:
            return False
        path, node = found
        node.message = None
        self._count -= 1
        prune(path, node, lambda n: n.message is None)
        return True

    def match(self, topic_filter: str) -> list[M]:
        """Every retained message whose topic ``topic_filter`` matches."""
        found: list[M] = []
        self._walk(self._root, topic_filter.split("/"), 0, found)
        return found

    def _walk(self, node: _Level[M], levels: list[str], index: int, found: list[M]) -> None:
        if index == len(levels):
            if node.message is not None:
                found.append(node.message)
            return
        level = levels[index]
        if level == "#":
            # '#' also matches the parent level itself ("a/#" matches "a").
            if node.message is not None and node is not self._root:
                found.append(node.message)
            self._collect_all(node, found, skip_dollar=index == 0)
        elif level == "+":
            for name, child in node.children.items():
                if index == 0 and name.startswith("$"):
                    continue  # [MQTT-4.7.2-1]
                self._walk(child, levels, index + 1, found)
        else:
            exact = node.children.get(level)
            if exact is not None:
                self._walk(exact, levels, index + 1, found)

    def _collect_all(self, node: _Level[M], found: list[M], skip_dollar: bool) -> None:
        stack = [child for name, child in node.children.items()
                 if not (skip_dollar and name.startswith("$"))]
        while stack:
            current = stack.pop()
            if current.message is not None:
                found.append(current.message)
            stack.extend(current.children.values())

    def __iter__(self) -> Iterator[M]:
        found: list[M] = []
        self._collect_all(self._root, found, skip_dollar=False)
        return iter(found)
