"""EMQX's acl.conf (file-based authorization) as an authorization source.

The file is a sequence of Erlang terms, each a rule ending with ``.``; ``%``
starts a comment. Rules are tried in file order and the first that matches
decides; when none matches the source has no answer (None) and the chain
goes on. As in EMQX::

    {allow, {username, {re, "^dashboard$"}}, subscribe, ["$SYS/#"]}.
    {allow, {ipaddr, "127.0.0.1"}, all, ["$SYS/#", "#"]}.
    {deny, all, subscribe, ["$SYS/#", {eq, "#"}]}.
    {allow, all}.

Rule        ``{Permission, Who, Action, Topics}``, ``{Permission, all}``
            (every client, action and topic, ``$SYS/...`` included as in
            EMQX 6; EMQX 5 read it as the filter "#", which leaves them out).
Permission  ``allow`` | ``deny``.
Who         ``all``; ``{username, "u"}`` (alias ``user``), ``{clientid, "c"}``
            (alias ``client``), either with ``{re, "regex"}`` in place of the
            value; ``{listener, "ssl:default"}`` or ``{listener, {re, ...}}``
            (EMQX 6);
            ``{ipaddr, "10.0.0.0/8"}`` and ``{ipaddrs, ["::1", ...]}`` (an
            address or a CIDR network, IPv4 or IPv6; host bits are ignored as
            EMQX ignores them); ``{'and', [Who, ...]}`` and ``{'or', [Who, ...]}``.
            A client without a username never matches a username condition.
Action      ``publish`` | ``subscribe`` | ``all``, or one of them with
            qualifiers: ``{publish, [{qos, 1}, {retain, false}]}``,
            ``{subscribe, [{qos, [1, 2]}]}``, ``{all, [{qos, 0}]}``. ``qos`` is
            0..2 or a list of them (repeated entries add up); ``retain`` is
            ``true``, ``false`` or ``all`` and concerns publishes only (with
            ``all`` it restricts the publish half). An absent qualifier allows
            any value. The single-qualifier form of EMQX's documentation,
            ``{publish, {retain, true}}``, is read as a one-element list.
Topics      ``all`` (EMQX 6), or a list of: a topic filter ``"t/#"`` (may hold
            placeholders); ``{eq, "t/#"}`` or ``"eq t/#"``, the literal filter,
            never interpolated.

Strings are Erlang strings (``"..."``, adjacent ones concatenated, escapes as
in Erlang: ``"\\\\d"`` is a backslash and a d, ``"\\d"`` is DEL) or binaries
(``<<"...">>``, ``<<"é"/utf8>>``). Regular expressions are searched anywhere
in the value (``re:run`` without anchoring) with Python's ``re``, which
reads the PCRE syntax EMQX documents except for a few PCRE-only constructs.
A final ``$`` matches only at the very end of the value, not before a
trailing newline as in PCRE and Python.

Matching: a publish matches a rule's filter when the filter matches the
topic name; a subscribe when the rule's filter covers every topic the
subscribed filter can match (``filter_covers``: "a/+" covers "a/b" and "a/+",
not "a/#"; EMQX lets "a/+" authorize "a/#"). ``{eq, F}`` matches exactly the
string F. The subscribed filter arrives without its ``$share/group/``.

Placeholders in topic filters: ``${username}``, ``${clientid}``,
``${cert_common_name}`` (as in EMQX 5 and later), and ``${cert_subject}`` (the
certificate's RFC 4514 subject) and ``${peerhost}`` (the client's IP address),
which EMQX's file source leaves uninterpolated. ``${$}`` stands for a literal
``$``. A placeholder's value is never a wildcard: a filter whose value is
absent or empty, contains '/', '+', '#' or a control character, or starts the
filter with '$' (turning it into a system topic) does not match, and the
rule's other filters are still tried. This is EMQX 6's default
(``authorization.topic_template_allow`` all false, legacy profile) plus the
empty and '$' cases; EMQX 5 interpolated values as they came, so a username
"+" turned ``${username}/#`` into ``+/#``.

Stricter than EMQX: an unknown placeholder, an unknown qualifier, ``retain``
on a subscribe action, a topic that is not a valid filter and an unsupported
condition are load errors, not warnings or silently ignored entries. Left out:
the ``zone``, ``client_attr`` and ``security_profile`` conditions and the
``${zone}`` and ``${client_attrs.NAME}`` placeholders (bastionmq has no
zones, client attributes or security profiles), and Erlang terms no rule
uses (floats, maps, list tails, ``$c`` characters).
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import os
import re
from typing import Any, Callable, Iterator

import attrs

from bastionmq.broker.ports import (
    ALLOW_ACCESS, DENY_ACCESS, PUBLISH_ACTION, SUBSCRIBE_ACTION, AccessRequest, ClientInfo,
)
from bastionmq.broker.topics import InvalidTopic, filter_covers, filter_matches, validate_filter
from .files import read_utf8
from .templates import PLACEHOLDER_VALUES, TopicTemplate

__all__ = ["AclParseError", "EmqxAclFile", "EmqxAclRule", "parse_acl_file", "parse_acl_text"]

ALL_QOS = frozenset((0, 1, 2))
#: Rule texts in error messages are cut to this many characters.
SHOWN_TEXT = 160


class AclParseError(ValueError):
    """An acl.conf that cannot be loaded. ``errors`` holds one line per
    problem found, in file order: ``path:line: what in {the rule}``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = tuple(errors)


# ------------------------------------------------------------------ reading Erlang terms


@attrs.define(slots=True, frozen=True)
class _Token:
    kind: str  # atom var string int punct dot error eof
    value: Any
    start: int
    end: int


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>%[^\n]*)
  | (?P<dot>\.(?=\s|%|\Z))
  | (?P<glued_dot>\.)
  | (?P<float>\d+\.\d+(?:[eE][-+]?\d+)?)
  | (?P<int>\d+(?:\#[0-9A-Za-z]+)?)
  | (?P<atom>[a-z][A-Za-z0-9_@]*)
  | (?P<var>[A-Z_][A-Za-z0-9_@]*)
  | (?P<punct><<|>>|[{}\[\],|/\-])
  | (?P<quote>["'])
""", re.VERBOSE)

_ESCAPES = {"b": "\b", "d": "\x7f", "e": "\x1b", "f": "\f", "n": "\n", "r": "\r",
            "s": " ", "t": "\t", "v": "\v"}
_OCTAL = re.compile(r"[0-7]{1,3}")
_HEX = re.compile(r"x(?:([0-9A-Fa-f]{2})|\{([0-9A-Fa-f]+)\})")


class _LexError(Exception):
    def __init__(self, message: str, position: int) -> None:
        self.message = message
        self.position = position


def _scan_quoted(text: str, start: int) -> tuple[str, int]:
    """The value of the string or quoted atom opening at ``start``, and where it ends."""
    quote = text[start]
    chars = []
    position = start + 1
    while True:
        end = text.find(quote, position)
        slash = text.find("\\", position, end if end >= 0 else len(text))
        if end < 0 and slash < 0:
            kind = "string" if quote == '"' else "quoted atom"
            raise _LexError(f"{kind} never closed", start)
        if slash < 0:
            chars.append(text[position:end])
            return "".join(chars), end + 1
        chars.append(text[position:slash])
        position = _escape(text, slash + 1, chars)


def _escape(text: str, position: int, chars: list[str]) -> int:
    """Append the character the escape after a backslash stands for; return what follows."""
    if position >= len(text):
        raise _LexError("a backslash ends the file", position - 1)
    char = text[position]
    if char in _ESCAPES:
        chars.append(_ESCAPES[char])
        return position + 1
    octal = _OCTAL.match(text, position)
    if octal:
        chars.append(chr(int(octal.group(), 8)))
        return octal.end()
    if char == "x":
        hexa = _HEX.match(text, position)
        if not hexa:
            raise _LexError("\\x needs two hex digits or {hex digits}", position - 1)
        code = int(hexa.group(1) or hexa.group(2), 16)
        if code > 0x10FFFF:
            raise _LexError(f"\\x{{{hexa.group(2)}}} is beyond Unicode", position - 1)
        chars.append(chr(code))
        return hexa.end()
    if char == "^" and position + 1 < len(text) and text[position + 1].isascii() \
            and text[position + 1].isalpha():
        chars.append(chr(ord(text[position + 1]) % 32))  # \^a is control-A
        return position + 2
    chars.append(char)  # \" \' \\ and, as in Erlang, any other character itself
    return position + 1


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            tokens.append(_Token("error", f"unexpected character {text[position]!r}",
                                 position, position + 1))
            position += 1
            continue
        kind = match.lastgroup
        assert kind is not None  # every alternative of _TOKEN is a named group
        end = match.end()
        if kind == "quote":
            try:
                value, end = _scan_quoted(text, position)
            except _LexError as exc:
                tokens.append(_Token("error", exc.message, exc.position, len(text)))
                break  # the rest of the file is inside the string: nothing to resume
            tokens.append(_Token("string" if text[position] == '"' else "atom", value,
                                 position, end))
        elif kind == "int":
            tokens.append(_integer_token(match.group(), position, end))
        elif kind == "float":
            tokens.append(_Token("error", "floats are not allowed here", position, end))
        elif kind == "glued_dot":
            tokens.append(_Token("error", "the '.' ending a rule must be followed by a space"
                                 " or a line end", position, end))
        elif kind not in ("space", "comment"):
            tokens.append(_Token(kind, match.group(), position, end))
        position = end
    tokens.append(_Token("eof", None, len(text), len(text)))
    return tokens


def _integer_token(spelling: str, start: int, end: int) -> _Token:
    base, _, digits = spelling.rpartition("#")
    try:
        value = int(digits, int(base)) if base else int(digits)
    except ValueError:
        return _Token("error", f"invalid integer {spelling}", start, end)
    return _Token("int", value, start, end)


@attrs.define(slots=True, frozen=True)
class _Node:
    """One Erlang term; ``first`` and ``last`` index its tokens."""

    kind: str  # atom text int tuple list
    value: Any
    first: int
    last: int


class _Syntax(Exception):
    def __init__(self, message: str, token: int) -> None:
        self.message = message
        self.token = token


_CLOSERS = {"{": "}", "[": "]"}


class _Reader:
    """Reads the terms of one file; ``rules`` yields (node, first, last token)
    or (error, first, last) for each term, resuming after a syntax error at
    the term's ending dot."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self._line_starts = [0] + [match.end() for match in re.finditer("\n", text)]

    def line(self, token: int) -> int:
        return bisect.bisect_right(self._line_starts, self.tokens[token].start)

    def show(self, first: int, last: int) -> str:
        """The source of tokens first..last, each run of space or comments as one space."""
        parts = []
        for index in range(first, last + 1):
            token = self.tokens[index]
            if token.kind == "eof":
                break
            if index > first and token.start > self.tokens[index - 1].end:
                parts.append(" ")
            parts.append(self.text[token.start:token.end])
        shown = "".join(parts)
        return shown if len(shown) <= SHOWN_TEXT else shown[:SHOWN_TEXT - 1] + "…"

    def rules(self) -> Iterator[tuple[_Node | _Syntax, int, int]]:
        while self.tokens[self.index].kind != "eof":
            first = self.index
            try:
                node = self._term()
                end = self._next()
                if end.kind == "error":
                    raise _Syntax(end.value, self.index - 1)
                if end.kind != "dot":
                    raise _Syntax("expected '.' to end the rule", self.index - 1)
                yield node, first, self.index - 2
            except _Syntax as error:
                stop = max(error.token, first)
                while self.tokens[stop].kind not in ("dot", "eof"):
                    stop += 1
                self.index = stop + (self.tokens[stop].kind == "dot")
                yield error, first, max(stop - 1, first)

    def _next(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "eof":
            self.index += 1
        return token

    def _peek(self, kind: str, value: Any = None) -> bool:
        token = self.tokens[self.index]
        return token.kind == kind and (value is None or token.value == value)

    def _describe(self, token: _Token) -> str:
        if token.kind == "eof":
            return "the end of the file"
        if token.kind == "dot":
            return "'.'"
        return repr(self.text[token.start:token.end])

    def _term(self) -> _Node:
        first = self.index
        token = self._next()
        kind, value = token.kind, token.value
        if kind == "atom":
            return _Node("atom", value, first, first)
        if kind == "string":
            while self._peek("string"):  # "a" "b" is "ab", as in Erlang
                value += self._next().value
            return _Node("text", value, first, self.index - 1)
        if kind == "int":
            return _Node("int", value, first, first)
        if kind == "punct" and value == "-" and self._peek("int"):
            return _Node("int", -self._next().value, first, self.index - 1)
        if kind == "punct" and value in _CLOSERS:
            items = self._sequence(_CLOSERS[value])
            return _Node("tuple" if value == "{" else "list", tuple(items), first, self.index - 1)
        if kind == "punct" and value == "<<":
            return self._binary(first)
        if kind == "var":
            raise _Syntax(f"{value} is a variable; atoms start with a lowercase letter"
                          " (or are quoted: 'Name')", first)
        if kind == "error":
            raise _Syntax(value, first)
        raise _Syntax(f"expected a term, found {self._describe(token)}", first)

    def _sequence(self, closer: str) -> list[_Node]:
        items: list[_Node] = []
        if self._peek("punct", closer):
            self._next()
            return items
        while True:
            items.append(self._term())
            token = self._next()
            if token.kind == "punct" and token.value == ",":
                continue
            if token.kind == "punct" and token.value == closer:
                return items
            if token.kind == "punct" and token.value == "|" and closer == "]":
                raise _Syntax("list tails ([H | T]) are not supported", self.index - 1)
            raise _Syntax(f"expected ',' or '{closer}', found {self._describe(token)}",
                          self.index - 1)

    def _binary(self, first: int) -> _Node:
        data = bytearray()
        while not self._peek("punct", ">>"):
            if self.index > first + 1:  # after the first segment
                token = self._next()
                if not (token.kind == "punct" and token.value == ","):
                    raise _Syntax(f"expected ',' or '>>', found {self._describe(token)}",
                                  self.index - 1)
            data += self._segment()
        self._next()
        try:
            return _Node("text", data.decode("utf-8"), first, self.index - 1)
        except UnicodeDecodeError:
            raise _Syntax("the binary is not UTF-8 text; write <<\"...\"/utf8>> for"
                          " text beyond ASCII", first) from None

    def _segment(self) -> bytes:
        segment = self._term()
        utf8 = False
        if self._peek("punct", "/"):
            self._next()
            kind = self._next()
            if kind.kind != "atom" or kind.value != "utf8":
                raise _Syntax("the only binary segment type understood is /utf8", self.index - 1)
            utf8 = True
        if segment.kind == "text":
            if utf8:
                return segment.value.encode("utf-8")
            if any(ord(char) > 255 for char in segment.value):
                raise _Syntax("a character beyond Latin-1 in a binary; add /utf8", segment.first)
            return segment.value.encode("latin-1")
        if segment.kind == "int" and 0 <= segment.value <= 255 and not utf8:
            return bytes((segment.value,))
        raise _Syntax("a binary segment is a string or a byte (0..255)", segment.first)


# ------------------------------------------------------------------ compiling rules


class _RuleError(Exception):
    def __init__(self, message: str, node: _Node) -> None:
        self.message = message
        self.node = node


Predicate = Callable[[ClientInfo], bool]

_PLACEHOLDER = re.compile(r"\$\{(?:\.?([A-Za-z0-9._]*)|(\$))\}")
_UNSUPPORTED_CONDITIONS = {"zone": "zones", "client_attr": "client attributes",
                           "security_profile": "security profiles"}
_NOT_HERE = {"zone": "bastionmq has no zones",
             "cn": "write ${cert_common_name}", "dn": "write ${cert_subject}"}


@attrs.define(slots=True, frozen=True, eq=False)
class EmqxAclRule:
    """One compiled rule: its ``permission`` (ALLOW_ACCESS or DENY_ACCESS), the
    ``line`` it starts on and its ``text``; the rest is how it matches."""

    permission: str
    line: int
    text: str
    #: None for every client.
    who: Predicate | None
    #: QoS levels of the publishes (and subscribes) the rule applies to; None
    #: when it does not apply to that action. ``publish_retain`` None: either.
    publish_qos: frozenset[int] | None
    publish_retain: bool | None
    subscribe_qos: frozenset[int] | None
    any_topic: bool
    #: Filters without wildcards and {eq, F} filters: matched by equality.
    exact: frozenset[str]
    wildcard: tuple[str, ...]
    templates: tuple[TopicTemplate, ...]

    def matches_topic(self, topic: str, client: ClientInfo,
                      matches: Callable[[str, str], bool]) -> bool:
        if self.any_topic or topic in self.exact:
            return True
        for topic_filter in self.wildcard:
            if matches(topic_filter, topic):
                return True
        for template in self.templates:
            rendered = template.render(client)
            if rendered is not None and matches(rendered, topic):
                return True
        return False


def _atom(node: _Node) -> str | None:
    return node.value if node.kind == "atom" else None


def _tagged(node: _Node) -> tuple[str | None, tuple[_Node, ...]]:
    """(tag, arguments) of a tuple whose first element is an atom."""
    if node.kind == "tuple" and node.value and node.value[0].kind == "atom":
        return node.value[0].value, node.value[1:]
    return None, ()


def _text(node: _Node, what: str) -> str:
    if node.kind != "text":
        raise _RuleError(f"{what} must be a string (\"...\" or <<\"...\">>)", node)
    return node.value


def _list(node: _Node, what: str) -> tuple[_Node, ...]:
    if node.kind != "list":
        raise _RuleError(f"{what} must be a list [...]", node)
    return node.value


class _Compiler:
    def __init__(self, reader: _Reader) -> None:
        self.reader = reader

    def show(self, node: _Node) -> str:
        """A term as written; an atom in quotes, as Erlang prints a surprising one."""
        return f"'{node.value}'" if node.kind == "atom" else self.reader.show(node.first, node.last)

    def rule(self, node: _Node, first: int, last: int) -> EmqxAclRule:
        if node.kind != "tuple" or len(node.value) not in (2, 4):
            raise _RuleError("a rule is {Permission, Who, Action, Topics} or {Permission, all}",
                             node)
        permission, *arguments = node.value
        action: tuple[frozenset[int] | None, bool | None, frozenset[int] | None]
        if _atom(permission) not in ("allow", "deny"):
            raise _RuleError(f"unknown permission {self.show(permission)} (allow or deny)",
                             permission)
        if len(arguments) == 1:
            if _atom(arguments[0]) != "all":
                self.who(arguments[0])  # names an unsupported condition, if that is the fault
                raise _RuleError("a two-element rule is {allow, all} or {deny, all}", arguments[0])
            who, action, topics = None, (ALL_QOS, None, ALL_QOS), None
        else:
            who = self.who(arguments[0])
            action = self.action(arguments[1])
            topics = arguments[2]
        publish_qos, publish_retain, subscribe_qos = action
        exact, wildcard, templates = self.topics(topics) if topics is not None else ((), (), ())
        return EmqxAclRule(
            permission=ALLOW_ACCESS if permission.value == "allow" else DENY_ACCESS,
            line=self.reader.line(first), text=self.reader.show(first, last), who=who,
            publish_qos=publish_qos, publish_retain=publish_retain, subscribe_qos=subscribe_qos,
            any_topic=topics is None or _atom(topics) == "all", exact=frozenset(exact),
            wildcard=tuple(wildcard), templates=tuple(templates))

    # ---------------------------------------------------------------- who

    def who(self, node: _Node) -> Predicate | None:
        if _atom(node) == "all":
            return None
        tag, arguments = _tagged(node)
        if tag in ("and", "or") and len(arguments) == 1:
            parts = [self.who(part) for part in _list(arguments[0], f"'{tag}'")]
            return _all_of(parts) if tag == "and" else _any_of(parts)
        if tag in ("username", "user", "clientid", "client", "listener") and len(arguments) == 1:
            field = {"user": "username", "client": "clientid"}.get(tag, tag)
            return self.value_condition(field, arguments[0])
        if tag in ("ipaddr", "ipaddrs") and len(arguments) == 1:
            values = [arguments[0]] if tag == "ipaddr" else _list(arguments[0], "ipaddrs")
            return _from_networks(tuple(self.network(value) for value in values))
        if tag in _UNSUPPORTED_CONDITIONS:
            raise _RuleError(f"the {tag} condition is not supported: bastionmq has no "
                             f"{_UNSUPPORTED_CONDITIONS[tag]}", node)
        raise _RuleError(f"unknown client condition {self.show(node)}", node)

    def value_condition(self, field: str, node: _Node) -> Predicate:
        read = {"username": lambda client: client.username,
                "clientid": lambda client: client.client_id,
                "listener": lambda client: client.peer.listener}[field]
        tag, arguments = _tagged(node)
        if tag == "re" and len(arguments) == 1:
            pattern = _text(arguments[0], "a regular expression")
            try:
                search = re.compile(_anchored_end(pattern)).search
            except re.error as exc:
                raise _RuleError(f"invalid regular expression {pattern!r}: {exc}",
                                 arguments[0]) from None

            def matches(client: ClientInfo) -> bool:
                value = read(client)
                return value is not None and search(value) is not None
            return matches
        wanted = _text(node, f"the {field}")
        return lambda client: read(client) == wanted

    def network(self, node: _Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        spelling = _text(node, "an address")
        try:
            return ipaddress.ip_network(spelling, strict=False)
        except ValueError:
            raise _RuleError(f"invalid address or network {spelling!r}", node) from None

    # ---------------------------------------------------------------- action

    def action(self, node: _Node) -> tuple[frozenset[int] | None, bool | None,
                                           frozenset[int] | None]:
        """(publish QoS levels, publish retain flag, subscribe QoS levels)."""
        name = _atom(node)
        options: tuple[_Node, ...] = ()
        if name is None:
            name, arguments = _tagged(node)
            if name not in ("publish", "subscribe", "all") or len(arguments) != 1:
                raise _RuleError(f"invalid action {self.show(node)}", node)
            options = arguments[0].value if arguments[0].kind == "list" else arguments
        if name not in ("publish", "subscribe", "all"):
            hint = " (EMQX 5 calls it all)" if name == "pubsub" else ""
            raise _RuleError(f"unknown action '{name}'{hint}", node)
        qos, retain = self.options(options, name)
        return (qos if name != "subscribe" else None, retain,
                qos if name != "publish" else None)

    def options(self, options: tuple[_Node, ...], action: str
                ) -> tuple[frozenset[int], bool | None]:
        levels: set[int] = set()
        retain: bool | None = None
        seen_retain = False
        for option in options:
            tag, arguments = _tagged(option)
            if _atom(option) == "retain":  # a bare atom in a proplist means {retain, true}
                tag, arguments = "retain", (_Node("atom", "true", option.first, option.last),)
            if tag == "qos" and len(arguments) == 1:
                values = arguments[0].value if arguments[0].kind == "list" else arguments
                for value in values:
                    if value.kind != "int" or value.value not in ALL_QOS:
                        raise _RuleError(f"invalid qos {self.show(value)} (0, 1 or 2)", value)
                    levels.add(value.value)
            elif tag == "retain" and len(arguments) == 1:
                if action == "subscribe":
                    raise _RuleError("retain applies to publish (and all), not subscribe", option)
                if seen_retain:
                    raise _RuleError("retain is given twice", option)
                flag = _atom(arguments[0])
                if flag not in ("true", "false", "all"):
                    raise _RuleError(f"invalid retain {self.show(arguments[0])}"
                                     " (true, false or all)", arguments[0])
                retain = None if flag == "all" else flag == "true"
                seen_retain = True
            else:
                raise _RuleError(f"unknown {action} qualifier {self.show(option)}"
                                 " ({qos, ...} or {retain, ...})", option)
        return frozenset(levels) if levels else ALL_QOS, retain

    # ---------------------------------------------------------------- topics

    def topics(self, node: _Node) -> tuple[list[str], list[str], list[TopicTemplate]]:
        if _atom(node) == "all":
            return [], [], []
        if node.kind == "text":
            raise _RuleError("the topics must be a list, like [\"t/#\"] (or all)", node)
        exact: list[str] = []
        wildcard: list[str] = []
        templates: list[TopicTemplate] = []
        for item in _list(node, "the topics"):
            tag, arguments = _tagged(item)
            if tag == "eq" and len(arguments) == 1:
                exact.append(self.topic_filter(_text(arguments[0], "an eq topic"), arguments[0]))
                continue
            if tag == "re":
                raise _RuleError("EMQX has no regular expressions for topics; use a topic"
                                 " filter or {eq, ...}", item)
            spelling = _text(item, "a topic")
            if spelling.startswith("eq "):
                exact.append(self.topic_filter(spelling[3:], item))
                continue
            compiled = self.template(spelling, item)
            if isinstance(compiled, TopicTemplate):
                templates.append(compiled)
                continue
            topic_filter = self.topic_filter(compiled, item)
            if "+" in topic_filter or "#" in topic_filter:
                wildcard.append(topic_filter)
            else:
                exact.append(topic_filter)
        return exact, wildcard, templates

    def topic_filter(self, topic_filter: str, node: _Node) -> str:
        try:
            validate_filter(topic_filter)
        except InvalidTopic as exc:
            raise _RuleError(f"invalid topic filter {topic_filter!r}: {exc}", node) from None
        return topic_filter

    def template(self, spelling: str, node: _Node) -> str | TopicTemplate:
        """The filter itself when it has no placeholders; ``${$}`` is a literal '$'."""
        parts: list[str | Callable[[ClientInfo], str | None]] = []
        literal = []
        position = 0
        for match in _PLACEHOLDER.finditer(spelling):
            literal.append(spelling[position:match.start()])
            position = match.end()
            name = match.group(1)
            if name is None:
                literal.append("$")
                continue
            if name not in PLACEHOLDER_VALUES:
                reason = _NOT_HERE.get(name) or ("bastionmq has no client attributes"
                                                 if name.startswith("client_attrs.") else
                                                 "known: " + ", ".join(PLACEHOLDER_VALUES))
                raise _RuleError(f"unknown placeholder ${{{name}}} ({reason}; write ${{$}}"
                                 " for a literal '$')", node)
            parts += ["".join(literal), PLACEHOLDER_VALUES[name]]
            literal = []
        literal.append(spelling[position:])
        if not parts:
            return "".join(literal)
        parts.append("".join(literal))
        # Values never hold '/', '+' or '#', so one stand-in value shows whether
        # every rendering is a valid filter.
        self.topic_filter("".join(part if isinstance(part, str) else "x" for part in parts), node)
        return TopicTemplate(tuple(part for part in parts if part != ""))


def _anchored_end(pattern: str) -> str:
    """``pattern`` with a final ``$`` made to match at the true end only
    (``\\Z``): a ``$`` also matches before a trailing newline, so
    ``^dashboard$`` would pass "dashboard\\n" (control characters are
    refused at CONNECT as well)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + "\\Z"
    return pattern


def _all_of(parts: list[Predicate | None]) -> Predicate | None:
    tests = tuple(part for part in parts if part is not None)
    if not tests:
        return None
    return lambda client: all(test(client) for test in tests)


def _any_of(parts: list[Predicate | None]) -> Predicate | None:
    if any(part is None for part in parts):
        return None
    tests = tuple(part for part in parts if part is not None)  # all of them, as mypy can't tell
    return lambda client: any(test(client) for test in tests)


@functools.lru_cache(maxsize=4096)
def _peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address; an IPv4-mapped IPv6 address (a dual-stack
    listener's view of an IPv4 client) as the IPv4 address it is."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _from_networks(networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
                   ) -> Predicate:
    def matches(client: ClientInfo) -> bool:
        address = _peer_address(client.peer.host)
        return address is not None and any(address in network for network in networks)
    return matches


# ------------------------------------------------------------------ the source


#: Clients whose rule conditions an acl.conf keeps evaluated, at most.
APPLIES_CACHE_SIZE = 10_000


class EmqxAclFile:
    """The rules of one acl.conf, checked in order (an AclSource)."""

    def __init__(self, rules: tuple[EmqxAclRule, ...], source: str = "<text>") -> None:
        self.rules = rules
        self.source = source
        # Per action, only the rules that can apply to it, with their qualifiers
        # up front: most rules are skipped on a set lookup.
        self._publish = tuple((rule.publish_qos, rule.publish_retain, index, rule)
                              for index, rule in enumerate(rules) if rule.publish_qos is not None)
        self._subscribe = tuple((rule.subscribe_qos, None, index, rule)
                                for index, rule in enumerate(rules)
                                if rule.subscribe_qos is not None)
        #: Which rules' client conditions hold, per client: evaluated once
        #: per connection (its ClientInfo), not once per check, so that a
        #: regular expression costs a client once. Bounded: emptied when full.
        self._applies: dict[ClientInfo, tuple[bool, ...]] = {}

    def __repr__(self) -> str:
        return f"<EmqxAclFile {self.source} ({len(self.rules)} rules)>"

    def check(self, request: AccessRequest) -> str | None:
        """ALLOW_ACCESS or DENY_ACCESS from the first rule that matches; None when none does."""
        matches: Callable[[str, str], bool]  # filter_matches or filter_covers
        if request.action == PUBLISH_ACTION:
            candidates, matches = self._publish, filter_matches
        elif request.action == SUBSCRIBE_ACTION:
            candidates, matches = self._subscribe, filter_covers
        else:
            return None
        client, topic, qos, retain = request.client, request.topic, request.qos, request.retain
        applies = self._applies.get(client)
        if applies is None:
            if len(self._applies) >= APPLIES_CACHE_SIZE:
                self._applies.clear()
            applies = self._applies[client] = tuple(
                rule.who is None or rule.who(client) for rule in self.rules)
        for levels, retain_flag, index, rule in candidates:
            if qos not in levels or (retain_flag is not None and retain_flag != retain):
                continue
            if not applies[index]:
                continue
            if rule.matches_topic(topic, client, matches):
                return rule.permission
        return None


def parse_acl_text(text: str, source: str = "<text>") -> EmqxAclFile:
    """Compile acl.conf text; raises AclParseError listing every rule in error."""
    reader = _Reader(text)
    compiler = _Compiler(reader)
    rules: list[EmqxAclRule] = []
    errors: list[str] = []
    for term, first, last in reader.rules():
        try:
            if isinstance(term, _Syntax):
                raise term
            rules.append(compiler.rule(term, first, last))
        except _Syntax as error:
            errors.append(f"{source}:{reader.line(error.token)}: {error.message}"
                          f" in {reader.show(first, last)}")
        except _RuleError as error:
            errors.append(f"{source}:{reader.line(error.node.first)}: {error.message}"
                          f" in {reader.show(first, last)}")
    if errors:
        raise AclParseError(errors)
    return EmqxAclFile(tuple(rules), source)


def parse_acl_file(path: str | os.PathLike[str]) -> EmqxAclFile:
    """Read and compile an acl.conf (UTF-8, as EMQX reads it); OSError when it cannot be read."""
    source, text = read_utf8(
        path, lambda source, line, message: AclParseError([f"{source}:{line}: {message}"]))
    return parse_acl_text(text, source)
