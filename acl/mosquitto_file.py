"""Mosquitto's ``acl_file`` as an authorization source.

The format is the one mosquitto.conf(5) describes under ``acl_file``, read as
Mosquitto 2.0 reads it (src/security_default.c)::

    # Clients without a username: the lines before the first "user" line.
    topic read $SYS/broker/#

    # The lines after "user roger" are roger's, up to the next "user" line.
    # No access word means readwrite.
    user roger
    topic foo/bar
    topic deny foo/bar/private

    # Every client, with its own values put in.
    pattern write sensors/%u/data
    pattern readwrite devices/%c/#

``topic [read|write|readwrite|deny] <topic>`` gives the current user (or the
anonymous clients) access to a topic filter: ``read`` to subscribe and
receive, ``write`` to publish, ``readwrite`` both (the default), ``deny``
neither, whatever else grants it. A line with a single word after ``topic``
takes that word as the topic, even ``read`` or ``deny``, as Mosquitto does.
The topic is the rest of the line and may contain spaces. ``pattern`` lines
have the same form, apply to every client wherever they stand in the file,
and have placeholders replaced by the client's values. Several ``user``
sections for one name add up. A line whose first character is ``#`` is a
comment (a ``#`` later in a line is part of it); blank lines and blanks
around a line are skipped.

Decisions
---------
Mosquitto denies whatever no rule grants. It looks at the client's own
``topic`` lines first, deny lines before the others; then, when the file has
patterns, it refuses a client whose username or client id contains ``+`` or
``#``; then it looks at the patterns, deny patterns before the others. The
first line that matches with a verdict decides, so a user's own grant beats
a deny pattern. Here each verdict maps onto the chain's three answers:

==========================================================  ============
Mosquitto 2.0                                               this source
==========================================================  ============
a deny line matches                                         DENY_ACCESS
a grant matches: read for subscribe, write for publish      ALLOW_ACCESS
patterns in use, a ``+`` or ``#`` in username or client id  DENY_ACCESS
nothing grants: denied                                      None
==========================================================  ============

None lets the chain go on to its next source, and after the last one
``authorization.no_match`` decides. For exactly Mosquitto's behaviour make
this file the only source and set ``no_match = deny``. With
``no_match = allow`` every topic the file does not mention is open, and an
empty file denies nothing.

Subscriptions
-------------
Mosquitto 2.0 never refuses a SUBSCRIBE because of its acl_file: the SUBACK
grants every filter, and each message is checked against the read rules
when it is delivered (with ``topic read a/+``, a subscription to ``a/#``
receives ``a/b`` but not ``a/b/c``). Here a filter is decided when it is
subscribed:

* a read rule grants it when the rule covers every topic the filter can
  match (``broker.topics.filter_covers``): ``read a/#`` grants ``a/+``,
  ``read a/+`` does not grant ``a/#``;
* a deny rule refuses it when the two filters have any topic in common:
  ``deny a/secret`` refuses ``a/#``, so that no subscription reaches a
  denied topic. Subscribe to narrower filters, or grant them per user.

Topic names (a retained message about to be sent) are decided exactly as
Mosquitto decides a delivery.

Placeholders
------------
``%c`` and ``%u`` are Mosquitto's; the others are this broker's (the names
EMQX gives them on the right), for clients identified by certificate:

======  ==============================================  ===================
``%c``  the client id                                   ``${clientid}``
``%u``  the username                                    ``${username}``
``%C``  the common name of the client certificate       ``${cert_common_name}``
``%D``  the certificate's subject, RFC 4514 (CN=a,O=b)  ``${cert_subject}``
``%H``  the client's IP address                         ``${peerhost}``
======  ==============================================  ===================

A placeholder must be a whole topic level (``devices/%c/#``, not
``devices/x-%c``), as mosquitto.conf(5) requires; anything else is an error
here. A pattern whose placeholder has no value for the client (``%u`` for a
client without a username, ``%C`` without a certificate) does not apply to
it, as Mosquitto skips ``%u`` patterns for anonymous clients. Substituted
values never act as wildcards or level separators: when the file has
patterns, a client whose username or client id contains ``+`` or ``#``, or
whose value for a placeholder the patterns use contains ``/``, ``+``, ``#``
or a control character, or begins with ``$``, is denied whatever its own
``topic`` lines do not grant.

Where this differs from Mosquitto 2.0
-------------------------------------
* Subscriptions are decided when subscribed (above).
* A value with ``/`` is refused, not substituted: Mosquitto 2.0 lets client
  ``a/b`` into ``devices/a/b/#``, inside client ``a``'s ``devices/a/#``
  (Mosquitto 2.1 refuses it too). Values that begin with ``$``, and unsafe
  values of the new placeholders, are refused the same way.
* A placeholder inside a level (``x-%c``) is an error; Mosquitto 2.0
  substitutes it and 2.1 takes it literally.
* An empty username is no value for ``%u``; only clients without a username
  get the lines before the first ``user`` line, as in Mosquitto.
* Indented comments and lines that start with a tab are accepted (Mosquitto
  refuses the file). A tab or other control character in a username or a
  topic is an error: Mosquitto splits words at spaces only and would read
  ``topic read<TAB>foo`` as readwrite on the topic "read<TAB>foo".
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Iterable

import attrs

from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import (
    ALLOW_ACCESS, DENY_ACCESS, PUBLISH_ACTION, SUBSCRIBE_ACTION, AccessRequest, ClientInfo,
)
from bastionmq.broker.topics import InvalidTopic, filter_covers, filter_matches, validate_filter
from .files import read_utf8

log = logging.getLogger("bastionmq.acl")

_READ = 1
_WRITE = 2
_ACCESS = {"read": _READ, "write": _WRITE, "readwrite": _READ | _WRITE, "deny": 0}

#: What C's isspace() takes, which Mosquitto trims lines with (str.strip()
#: with no argument would take Unicode spaces too).
_BLANKS = " \t\n\v\f\r"
_CONTROL = re.compile("[\x00-\x1f\x7f]")
#: Mosquitto's own test on usernames and client ids when patterns are in use.
_WILDCARD = re.compile("[+#]")
#: A value that would not stay one literal topic level once substituted.
_UNSAFE = re.compile("[/+#\x00-\x1f\x7f]|^\\$")
_MAX_TOPIC_BYTES = 65535


def _certificate_common_name(client: ClientInfo) -> str | None:
    certificate = client.peer.certificate
    return certificate.common_name if certificate is not None else None


def _certificate_subject(client: ClientInfo) -> str | None:
    certificate = client.peer.certificate
    return certificate.subject if certificate is not None else None


#: Each placeholder and how a client's value for it is found.
PLACEHOLDERS: dict[str, Callable[[ClientInfo], str | None]] = {
    "%c": lambda client: client.client_id,
    "%u": lambda client: client.username,
    "%C": _certificate_common_name,
    "%D": _certificate_subject,
    "%H": lambda client: client.peer.host,
}


class MosquittoAclError(ValueError):
    """An acl_file line that cannot be used; the message names the file and line."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}, line {line}: {message}")
        self.source = source
        self.line = line


@attrs.define(slots=True)
class _Rules:
    """Deny, read and write rules: one user's topic filters, or the patterns."""

    denies: list = attrs.Factory(list)
    reads: list = attrs.Factory(list)
    writes: list = attrs.Factory(list)

    def add(self, access: int, rule: object) -> None:
        if not access:
            self.denies.append(rule)
        if access & _READ:
            self.reads.append(rule)
        if access & _WRITE:
            self.writes.append(rule)

    def grants(self, wanted: int) -> list:
        return self.writes if wanted == _WRITE else self.reads


@attrs.define(slots=True, frozen=True)
class _Pattern:
    """A pattern line: its levels, and which of them are placeholders."""

    text: str
    levels: tuple[str, ...]
    #: (level index, placeholder) for each placeholder level.
    slots: tuple[tuple[int, str], ...]

    def substitute(self, values: dict[str, str | None]) -> str | None:
        """The topic filter for a client; None when a placeholder has no value."""
        if not self.slots:
            return self.text
        levels = list(self.levels)
        for index, name in self.slots:
            value = values[name]
            if value is None:
                return None
            levels[index] = value
        return "/".join(levels)


def _filters_overlap(rule: str, subscription: str) -> bool:
    """Whether some topic name matches both filters."""
    rule_levels = rule.split("/")
    sub_levels = subscription.split("/")
    # [MQTT-4.7.2-1]: a wildcard in the first level matches no '$' topic.
    for one, other in ((rule_levels[0], sub_levels[0]), (sub_levels[0], rule_levels[0])):
        if one in ("+", "#") and other.startswith("$"):
            return False
    for one, other in zip(rule_levels, sub_levels):
        if one == "#" or other == "#":
            return True
        if one != other and one != "+" and other != "+":
            return False
    if len(rule_levels) == len(sub_levels):
        return True
    # "a/#" also matches "a".
    longer = rule_levels if len(rule_levels) > len(sub_levels) else sub_levels
    return longer[min(len(rule_levels), len(sub_levels))] == "#"


def _decide(denies: Iterable[str | None], grants: Iterable[str | None],
            action: str, topic: str) -> str | None:
    denied_by: Callable[[str, str], bool]
    granted_by: Callable[[str, str], bool]
    if action == PUBLISH_ACTION:
        denied_by = granted_by = filter_matches
    else:
        denied_by, granted_by = _filters_overlap, filter_covers
    if any(rule is not None and denied_by(rule, topic) for rule in denies):
        return DENY_ACCESS
    if any(rule is not None and granted_by(rule, topic) for rule in grants):
        return ALLOW_ACCESS
    return None


class MosquittoAcl:
    """The rules of one acl_file, as an authorization source (``check``).
    Made by parse_mosquitto_acl and parse_mosquitto_acl_text."""

    __slots__ = ("source", "_users", "_patterns", "_placeholders")

    def __init__(self, source: str, users: dict[str | None, _Rules], patterns: _Rules) -> None:
        #: Where the rules came from (the file's path), for messages.
        self.source = source
        #: Each user's topic lines; the key None holds the anonymous clients'.
        self._users = users
        self._patterns = patterns if patterns.denies or patterns.reads or patterns.writes else None
        #: The placeholders the patterns use.
        self._placeholders = tuple(sorted({
            name for pattern in (*patterns.denies, *patterns.reads, *patterns.writes)
            for _, name in pattern.slots}))

    def __repr__(self) -> str:
        return f"<MosquittoAcl {self.source}>"

    def check(self, request: AccessRequest) -> str | None:
        """DENY_ACCESS or ALLOW_ACCESS when a rule decides; None when none does."""
        if request.action == PUBLISH_ACTION:
            wanted = _WRITE
        elif request.action == SUBSCRIBE_ACTION:
            wanted = _READ
        else:
            return None
        client = request.client
        topic = request.topic
        own = self._users.get(client.username)
        if own is not None:
            decision = _decide(own.denies, own.grants(wanted), request.action, topic)
            if decision is not None:
                return decision
        patterns = self._patterns
        if patterns is None:
            return None
        values = self._values(client)
        if values is None:
            return DENY_ACCESS
        return _decide((pattern.substitute(values) for pattern in patterns.denies),
                       (pattern.substitute(values) for pattern in patterns.grants(wanted)),
                       request.action, topic)

    def _values(self, client: ClientInfo) -> dict[str, str | None] | None:
        """The client's value for each placeholder the patterns use (None for
        no value); None when one would not stay a literal topic level."""
        username = client.username
        if _WILDCARD.search(client.client_id) or (username and _WILDCARD.search(username)):
            log.info("%s: denying client %s: a '+' or '#' in its client id or username",
                     self.source, shown(client.client_id))
            return None
        values: dict[str, str | None] = {}
        for name in self._placeholders:
            value = PLACEHOLDERS[name](client) or None
            if value is not None and _UNSAFE.search(value):
                log.info("%s: denying client %s: its %s %s cannot stand for one topic level",
                         self.source, shown(client.client_id), name, shown(value))
                return None
            values[name] = value
        return values


def parse_mosquitto_acl(path: str | os.PathLike[str]) -> MosquittoAcl:
    """Reads an acl_file. Raises MosquittoAclError for a line that cannot be
    used (and OSError when the file cannot be read)."""
    source, text = read_utf8(path, MosquittoAclError)
    return parse_mosquitto_acl_text(text, source)


def parse_mosquitto_acl_text(text: str, source: str = "<acl_file>") -> MosquittoAcl:
    """Reads acl_file text; ``source`` names it in errors."""
    users: dict[str | None, _Rules] = {}
    patterns = _Rules()
    user: str | None = None
    # Lines end at "\n" only, as fgets() reads them (str.splitlines() would
    # also split at form feeds and Unicode separators).
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(_BLANKS)
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        try:
            if keyword == "user":
                user = _username(rest)
            elif keyword == "topic":
                access, topic = _access_and_topic(rest)
                if any(level in PLACEHOLDERS for level in topic.split("/")):
                    log.warning("%s, line %d: topic %r: placeholders are replaced in pattern "
                                "lines only; here they are literal text", source, number, topic)
                users.setdefault(user, _Rules()).add(access, topic)
            elif keyword == "pattern":
                access, topic = _access_and_topic(rest)
                pattern = _pattern(topic)
                if not pattern.slots:
                    log.warning("%s, line %d: pattern %r has no placeholder: it applies to "
                                "every client as it stands", source, number, topic)
                patterns.add(access, pattern)
            else:
                hint = " (separate words with spaces)" if _CONTROL.search(keyword) else ""
                raise ValueError(f"unknown keyword {keyword!r}: expected topic, pattern or "
                                 f"user{hint}")
        except ValueError as exc:
            raise MosquittoAclError(source, number, str(exc)) from None
    acl = MosquittoAcl(source, users, patterns)
    if not users and acl._patterns is None:
        log.warning("%s has no rules: it denies nothing, and with authorization.no_match = "
                    "allow every client may do anything", source)
    return acl


def _username(rest: str) -> str:
    name = rest.strip(_BLANKS)
    if not name:
        raise ValueError("user needs a username: user <username>")
    if _CONTROL.search(name):
        raise ValueError(f"control character in username {name!r}")
    return name


def _access_and_topic(rest: str) -> tuple[int, str]:
    rest = rest.lstrip(" ")
    if not rest:
        raise ValueError("no topic: expected [read|write|readwrite|deny] <topic>")
    first, _, remainder = rest.partition(" ")
    topic = remainder.strip(_BLANKS)
    if not topic:
        # One word: the topic, with readwrite access, whatever the word.
        access, topic = _READ | _WRITE, first
    elif first in _ACCESS:
        access = _ACCESS[first]
    else:
        raise ValueError(f"unknown access {first!r}: expected read, write, readwrite or deny")
    if _CONTROL.search(topic):
        raise ValueError(f"control character in topic {topic!r} (separate words with spaces)")
    try:
        validate_filter(topic)
    except InvalidTopic as exc:
        raise ValueError(f"invalid topic filter {topic!r}: {exc}") from None
    if len(topic.encode("utf-8", "surrogatepass")) > _MAX_TOPIC_BYTES:
        raise ValueError(f"topic longer than {_MAX_TOPIC_BYTES} bytes")
    return access, topic


def _pattern(topic: str) -> _Pattern:
    levels = tuple(topic.split("/"))
    slots = []
    for index, level in enumerate(levels):
        if level in PLACEHOLDERS:
            slots.append((index, level))
        elif len(level) == 2 and level[0] == "%" and level[1].isalpha():
            raise ValueError(f"unknown placeholder {level}: expected one of "
                             f"{', '.join(PLACEHOLDERS)}")
        else:
            inside = next((name for name in PLACEHOLDERS if name in level), None)
            if inside is not None:
                raise ValueError(f"{inside} must be a whole topic level (as in "
                                 f"devices/{inside}/#), not part of {level!r}")
    return _Pattern(topic, levels, tuple(slots))
