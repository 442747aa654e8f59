"""The built-in database's authorization rules as an ACL source
(``authorization.sources``, ``type = built_in_database``).

The rules are kept, with the users, in the database of auth/builtin_db.py
(which tells their form and the order they are tried in); this module gives
them their meaning: each rule compiled once (placeholders, ``eq`` topics,
QoS and retain conditions), a source that answers allow, deny or no match,
and ``check_rule``, which the database is given to refuse a rule that could
never be checked.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import attrs

from bastionmq.auth.builtin_db import ACTIONS, ALL_QOS, PERMISSIONS, WHO_TYPES, AclRule
from bastionmq.broker.ports import PUBLISH_ACTION, SUBSCRIBE_ACTION, AccessRequest, ClientInfo
from bastionmq.broker.topics import InvalidTopic, filter_covers, filter_matches, validate_filter

from .templates import PLACEHOLDER_VALUES, TopicTemplate


def check_rule(rule: AclRule) -> None:
    """Raise ValueError for a rule that could never be checked."""
    _compile(rule)


_PLACEHOLDER = re.compile(r"\$\{(\$|[A-Za-z0-9._]+)\}")
# A topic filter in one of three forms: the exact string of an ``eq`` topic,
# a plain filter, or the parts of one with placeholders.
_EXACT, _FILTER, _TEMPLATE = 0, 1, 2


@attrs.define(slots=True, frozen=True)
class _CompiledRule:
    permission: str
    #: QoS levels for publishes and for subscribes; None where the action
    #: does not cover that kind of request.
    publish_qos: frozenset[int] | None
    subscribe_qos: frozenset[int] | None
    retain: bool | None
    form: int
    #: The string for _EXACT and _FILTER, the parts for _TEMPLATE.
    topic: Any

    def decides(self, request: AccessRequest, is_publish: bool) -> bool:
        levels = self.publish_qos if is_publish else self.subscribe_qos
        if levels is None or request.qos not in levels:
            return False
        if is_publish and self.retain is not None and self.retain != request.retain:
            return False
        if self.form == _EXACT:
            return request.topic == self.topic
        topic_filter = self.topic if self.form == _FILTER else self.topic.render(request.client)
        if topic_filter is None:
            return False
        matches = filter_matches if is_publish else filter_covers
        return matches(topic_filter, request.topic)


def _compile(rule: AclRule) -> _CompiledRule:
    """The rule ready to check; ValueError (for an operator) when it is not valid."""
    if rule.who_type not in WHO_TYPES:
        raise ValueError(f"a rule is for a username, a clientid or all, not {rule.who_type!r}")
    if (rule.who_type == "all") != (rule.who is None):
        raise ValueError("a rule for all names nobody; one for a username or clientid names it")
    if rule.who is not None and not rule.who:
        raise ValueError(f"the {rule.who_type} of a rule must not be empty")
    if rule.permission not in PERMISSIONS:
        raise ValueError(f"permission {rule.permission!r} is not allow or deny")
    if rule.action not in ACTIONS:
        raise ValueError(f"action {rule.action!r} is not publish, subscribe or all")
    if rule.qos is not None and (not rule.qos or any(level not in ALL_QOS for level in rule.qos)):
        raise ValueError(f"qos {list(rule.qos)} must list levels from 0, 1 and 2")
    if rule.retain is not None and rule.action == SUBSCRIBE_ACTION:
        raise ValueError("retain applies to publish (and all), not subscribe")
    levels = frozenset(rule.qos if rule.qos is not None else ALL_QOS)
    form, topic = _compile_topic(rule.topic)
    return _CompiledRule(
        permission=rule.permission,
        publish_qos=levels if rule.action != SUBSCRIBE_ACTION else None,
        subscribe_qos=levels if rule.action != PUBLISH_ACTION else None,
        retain=rule.retain, form=form, topic=topic)


def _compile_topic(topic: str) -> tuple[int, Any]:
    if topic.startswith("eq "):
        _valid_filter(topic[3:], topic)
        return _EXACT, topic[3:]
    parts: list[str | Callable[[ClientInfo], str | None]] = []
    literal: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(topic):
        literal.append(topic[position:match.start()])
        position = match.end()
        name = match.group(1)
        if name == "$":
            literal.append("$")
            continue
        if name not in PLACEHOLDER_VALUES:
            known = ", ".join(f"${{{known}}}" for known in PLACEHOLDER_VALUES)
            raise ValueError(f"unknown placeholder ${{{name}}} in topic {topic!r} (known: "
                             f"{known}; write ${{$}} for a literal '$')")
        parts += ["".join(literal), PLACEHOLDER_VALUES[name]]
        literal = []
    literal.append(topic[position:])
    if not parts:
        _valid_filter("".join(literal), topic)
        return _FILTER, "".join(literal)
    parts.append("".join(literal))
    # Values never hold '/', '+' or '#': one stand-in shows whether every
    # rendering is a valid filter.
    _valid_filter("".join(part if isinstance(part, str) else "x" for part in parts), topic)
    return _TEMPLATE, TopicTemplate(tuple(part for part in parts if part != ""))


def _valid_filter(topic_filter: str, spelling: str) -> None:
    try:
        validate_filter(topic_filter)
    except InvalidTopic as exc:
        raise ValueError(f"invalid topic filter {spelling!r}: {exc}") from None


class BuiltinAclSource:
    """The built-in database's rules, held in memory (an AclSource).

    Build it from ``await db.all_rules()`` (or ``read_rules(path)``); build a
    new one to take changes in.
    """

    def __init__(self, rules: Iterable[AclRule]) -> None:
        self._clientid: dict[str, list[_CompiledRule]] = {}
        self._username: dict[str, list[_CompiledRule]] = {}
        self._all: list[_CompiledRule] = []
        count = 0
        for rule in sorted(rules, key=lambda rule: (rule.position, rule.id)):
            compiled = _compile(rule)
            if rule.who_type == "all":
                self._all.append(compiled)
            else:
                owners = self._clientid if rule.who_type == "clientid" else self._username
                assert rule.who is not None  # _compile refuses a rule for nobody but "all"
                owners.setdefault(rule.who, []).append(compiled)
            count += 1
        self.count = count

    def __repr__(self) -> str:
        return f"<BuiltinAclSource ({self.count} rules)>"

    def check(self, request: AccessRequest) -> str | None:
        """ALLOW_ACCESS or DENY_ACCESS from the first matching rule among the
        client id's, the username's, then all's; None when none matches."""
        if request.action == PUBLISH_ACTION:
            is_publish = True
        elif request.action == SUBSCRIBE_ACTION:
            is_publish = False
        else:
            return None
        client = request.client
        for rules in (self._clientid.get(client.client_id, ()),
                      self._username.get(client.username, ()) if client.username is not None
                      else (),
                      self._all):
            for rule in rules:
                if rule.decides(request, is_publish):
                    return rule.permission
        return None
