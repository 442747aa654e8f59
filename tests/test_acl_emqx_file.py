"""EMQX's acl.conf as an authorization source: syntax, decisions and load errors."""

from __future__ import annotations

import datetime

import attrs
import mqtt_strategies
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastionmq.acl.emqx_file import AclParseError, EmqxAclFile, parse_acl_file, parse_acl_text
from bastionmq.broker.ports import (
    ALLOW_ACCESS, DENY_ACCESS, PUBLISH_ACTION, SUBSCRIBE_ACTION, AccessRequest, CertificateFacts,
    ClientInfo, PeerCertificate, PeerInfo,
)
from bastionmq.broker.topics import filter_covers, filter_matches

PROPERTY_TEST = settings(deadline=None, max_examples=300)

#: apps/emqx_auth/etc/acl.conf of EMQX 5, the rules and the head of its comments.
EMQX_DEFAULT_ACL = """\
%%-------------- Default ACL rules -------------------------------------------------------

{allow, {username, {re, "^dashboard$"}}, subscribe, ["$SYS/#"]}.

{allow, {ipaddr, "127.0.0.1"}, all, ["$SYS/#", "#"]}.

{deny, all, subscribe, ["$SYS/#", {eq, "#"}]}.

{allow, all}.
%% NOTE! when deploy in production:
%% - Change the last rule to `{deny, all}.`
%% - Set config `authorization.no_match = deny`

%% -type ipaddr() :: {ipaddr, string()}.
%% -type rule() :: {perm(), who(), action(), [topic_match()]} | {perm(), all}.
"""


def certificate(common_name: str | None = "sensor-7",
                subject: str = "CN=sensor-7,O=Acme") -> PeerCertificate:
    facts = CertificateFacts(
        subject=subject, common_name=common_name, issuer="CN=Acme CA", serial=7,
        sha256="00" * 32, not_before=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2034, 1, 1, tzinfo=datetime.UTC))
    return PeerCertificate(b"\x30\x00", lambda der: facts)


def client(username: str | None = None, client_id: str = "c1", host: str | None = "10.1.2.3",
           listener: str = "tcp:default", cert: PeerCertificate | None = None) -> ClientInfo:
    peer = PeerInfo(listener=listener, address=(host, 50000) if host is not None else None,
                    tls=cert is not None, certificate=cert)
    return ClientInfo(client_id=client_id, username=username, peer=peer)


def publish(acl: EmqxAclFile, topic: str, who: ClientInfo | None = None, *, qos: int = 0,
            retain: bool = False) -> str | None:
    return acl.check(AccessRequest(client=who or client(), action=PUBLISH_ACTION, topic=topic,
                                   qos=qos, retain=retain))


def subscribe(acl: EmqxAclFile, topic_filter: str, who: ClientInfo | None = None, *,
              qos: int = 0) -> str | None:
    return acl.check(AccessRequest(client=who or client(), action=SUBSCRIBE_ACTION,
                                   topic=topic_filter, qos=qos))


def only(rule: str) -> EmqxAclFile:
    """A file with one allow rule: the tests read ALLOW_ACCESS as "it matches"."""
    return parse_acl_text(rule + ".\n")


def load_error(text: str) -> AclParseError:
    with pytest.raises(AclParseError) as raised:
        parse_acl_text(text, "etc/acl.conf")
    return raised.value


# ------------------------------------------------------------------ EMQX's default file

DEFAULT = parse_acl_text(EMQX_DEFAULT_ACL, "etc/acl.conf")
DASHBOARD = client("dashboard", host="10.0.0.9")
LOCAL = client("device", host="127.0.0.1")
REMOTE = client("device", host="192.0.2.7")


def test_the_default_file_reads_as_four_rules():
    assert [(rule.line, rule.permission) for rule in DEFAULT.rules] == [
        (3, ALLOW_ACCESS), (5, ALLOW_ACCESS), (7, DENY_ACCESS), (9, ALLOW_ACCESS)]
    assert DEFAULT.rules[2].text == '{deny, all, subscribe, ["$SYS/#", {eq, "#"}]}'


@pytest.mark.parametrize("who, topic_filter, decision", [
    (DASHBOARD, "$SYS/brokers/+/version", ALLOW_ACCESS),   # rule 1
    (client("dashboard2", host="10.0.0.9"), "$SYS/#", DENY_ACCESS),  # anchored regex: rule 3
    (client(None, host="10.0.0.9"), "$SYS/#", DENY_ACCESS),
    (LOCAL, "$SYS/#", ALLOW_ACCESS),                         # rule 2
    (LOCAL, "#", ALLOW_ACCESS),
    (REMOTE, "#", DENY_ACCESS),                              # rule 3, {eq, "#"}
    (REMOTE, "$SYS/brokers", DENY_ACCESS),
    (REMOTE, "+/#", ALLOW_ACCESS),                           # not "#" itself: rule 4
    (REMOTE, "a/#", ALLOW_ACCESS),
    (DASHBOARD, "#", DENY_ACCESS),
])
def test_default_file_subscriptions(who, topic_filter, decision):
    assert subscribe(DEFAULT, topic_filter, who) == decision


@pytest.mark.parametrize("who, topic, decision", [
    (LOCAL, "$SYS/x", ALLOW_ACCESS),
    (REMOTE, "a/b", ALLOW_ACCESS),
    # Rule 3 is about subscribing; {allow, all} allows every topic, $SYS too.
    (REMOTE, "$SYS/x", ALLOW_ACCESS),
])
def test_default_file_publishes(who, topic, decision):
    assert publish(DEFAULT, topic, who) == decision


def test_the_production_ending_leaves_the_rest_to_no_match():
    acl = parse_acl_text(EMQX_DEFAULT_ACL.replace("{allow, all}.", "{deny, all}."))
    assert publish(acl, "a/b", REMOTE) == DENY_ACCESS
    without_last = parse_acl_text(EMQX_DEFAULT_ACL.replace("{allow, all}.", ""))
    assert publish(without_last, "a/b", REMOTE) is None
    assert subscribe(without_last, "#", REMOTE) == DENY_ACCESS


def test_parse_acl_file_names_the_file(tmp_path):
    path = tmp_path / "acl.conf"
    path.write_text(EMQX_DEFAULT_ACL, encoding="utf-8")
    acl = parse_acl_file(path)
    assert acl.source == str(path) and len(acl.rules) == 4
    path.write_text("{allow, all}.\n{allow, all, publsh, [\"t\"]}.\n")
    with pytest.raises(AclParseError, match=f"^{path}:2: unknown action 'publsh'"):
        parse_acl_file(path)
    path.write_bytes(b"{allow, all}.\n%% caf\xe9\n")
    with pytest.raises(AclParseError, match=f"^{path}:2: the file is not UTF-8 text$"):
        parse_acl_file(path)
    with pytest.raises(OSError):
        parse_acl_file(tmp_path / "missing.conf")


def test_first_matching_rule_decides_and_no_rule_means_no_answer():
    acl = parse_acl_text('{deny, all, publish, ["a/secret"]}.\n'
                         '{allow, all, publish, ["a/#"]}.\n'
                         '{deny, all, publish, ["a/#"]}.\n')
    assert publish(acl, "a/secret") == DENY_ACCESS
    assert publish(acl, "a/open") == ALLOW_ACCESS
    assert publish(acl, "b") is None
    assert parse_acl_text("% nothing but a comment\n").check(
        AccessRequest(client=client(), action=PUBLISH_ACTION, topic="t")) is None


def test_an_action_the_file_does_not_know_has_no_answer():
    request = AccessRequest(client=client(), action="retain", topic="t")
    assert parse_acl_text("{allow, all}.").check(request) is None


# ------------------------------------------------------------------ who


@pytest.mark.parametrize("who, matching, other", [
    ('{username, "alice"}', client("alice"), client("alicex")),
    ('{user, "alice"}', client("alice"), client(None)),
    ('{username, <<"alice">>}', client("alice"), client("Alice")),
    ('{username, {re, "^dev-[0-9]+$"}}', client("dev-42"), client("dev-x")),
    ('{username, {re, "dev"}}', client("my-dev-1"), client(None)),  # searched, not anchored
    ('{username, {re, ""}}', client(""), client(None)),  # no username: no username condition
    ('{clientid, "c9"}', client(client_id="c9"), client(client_id="c90")),
    ('{client, "c9"}', client(client_id="c9"), client(client_id="C9")),
    ('{clientid, {re, "^sensor-"}}', client(client_id="sensor-7"), client(client_id="7-sensor")),
    ('{listener, "ssl:default"}', client(listener="ssl:default"), client()),
    ('{listener, {re, "^wss?:"}}', client(listener="wss:default"), client(listener="ssl:x")),
    ('all', client(), None),
])
def test_who(who, matching, other):
    acl = only(f'{{allow, {who}, publish, ["t"]}}')
    assert publish(acl, "t", matching) == ALLOW_ACCESS
    if other is not None:
        assert publish(acl, "t", other) is None


@pytest.mark.parametrize("who, host, matches", [
    ('{ipaddr, "127.0.0.1"}', "127.0.0.1", True),
    ('{ipaddr, "127.0.0.1"}', "127.0.0.2", False),
    ('{ipaddr, "10.0.0.0/8"}', "10.200.3.4", True),
    ('{ipaddr, "10.0.0.0/8"}', "11.0.0.1", False),
    ('{ipaddr, "10.1.2.3/8"}', "10.9.9.9", True),  # host bits ignored, as EMQX does
    ('{ipaddr, "10.0.0.0/8"}', "::ffff:10.1.2.3", True),  # a dual-stack listener's view
    ('{ipaddr, "10.0.0.0/8"}', "", False),
    ('{ipaddr, "10.0.0.0/8"}', None, False),
    ('{ipaddr, "::1"}', "::1", True),
    ('{ipaddr, "::1"}', "127.0.0.1", False),
    ('{ipaddr, "2001:db8::/32"}', "2001:db8:7::9", True),
    ('{ipaddr, "2001:db8::/32"}', "2001:db9::1", False),
    ('{ipaddr, "fe80::/10"}', "fe80::1%eth0", True),
    ('{ipaddrs, ["127.0.0.1", "192.168.0.0/16", "2001:db8::/32"]}', "192.168.4.4", True),
    ('{ipaddrs, ["127.0.0.1", "192.168.0.0/16", "2001:db8::/32"]}', "2001:db8::5", True),
    ('{ipaddrs, ["127.0.0.1", "192.168.0.0/16", "2001:db8::/32"]}', "172.16.0.1", False),
    ('{ipaddrs, []}', "127.0.0.1", False),
])
def test_ip_addresses(who, host, matches):
    acl = only(f'{{allow, {who}, all, ["t"]}}')
    assert (publish(acl, "t", client(host=host)) == ALLOW_ACCESS) is matches


@pytest.mark.parametrize("who, username, client_id, host, matches", [
    ("{'and', [{username, \"a\"}, {ipaddr, \"10.0.0.0/8\"}]}", "a", "c", "10.0.0.1", True),
    ("{'and', [{username, \"a\"}, {ipaddr, \"10.0.0.0/8\"}]}", "a", "c", "11.0.0.1", False),
    ("{'or', [{username, \"a\"}, {clientid, \"c\"}]}", "b", "c", "11.0.0.1", True),
    ("{'or', [{username, \"a\"}, {clientid, \"c\"}]}", "b", "d", "11.0.0.1", False),
    ("{'and', [all, {'or', [{user, \"x\"}, {client, {re, \"^c\"}}]}]}", "y", "cat", "", True),
    ("{'and', []}", None, "c", None, True),
    ("{'or', []}", "a", "c", "10.0.0.1", False),
    ("{'or', [all, {username, \"nobody\"}]}", None, "c", None, True),
])
def test_and_or(who, username, client_id, host, matches):
    acl = only(f'{{allow, {who}, publish, ["t"]}}')
    who_asks = client(username, client_id=client_id, host=host)
    assert (publish(acl, "t", who_asks) == ALLOW_ACCESS) is matches


# ------------------------------------------------------------------ actions and qualifiers


@pytest.mark.parametrize("action, publishes, subscribes", [
    ("publish", True, False),
    ("subscribe", False, True),
    ("all", True, True),
])
def test_actions(action, publishes, subscribes):
    acl = only(f'{{allow, all, {action}, ["t/#"]}}')
    assert (publish(acl, "t/1") == ALLOW_ACCESS) is publishes
    assert (subscribe(acl, "t/1") == ALLOW_ACCESS) is subscribes


@pytest.mark.parametrize("action, qos, retain, matches", [
    ("{publish, [{qos, 1}]}", 1, False, True),
    ("{publish, [{qos, 1}]}", 1, True, True),
    ("{publish, [{qos, 1}]}", 0, False, False),
    ("{publish, [{qos, [0, 1]}, {retain, false}]}", 0, False, True),
    ("{publish, [{qos, [0, 1]}, {retain, false}]}", 1, True, False),
    ("{publish, [{qos, [0, 1]}, {retain, false}]}", 2, False, False),
    ("{publish, [{qos, 0}, {qos, 2}]}", 2, False, True),  # repeated entries add up
    ("{publish, [{retain, true}]}", 2, True, True),
    ("{publish, [{retain, true}]}", 2, False, False),
    ("{publish, [{retain, all}]}", 1, True, True),
    ("{publish, [retain]}", 0, True, True),  # a bare proplist atom is {retain, true}
    ("{publish, [retain]}", 0, False, False),
    ("{publish, {retain, true}}", 0, True, True),  # the single form of EMQX's docs
    ("{publish, []}", 2, True, True),
    ("{all, [{qos, 2}, {retain, true}]}", 2, True, True),
    ("{all, [{qos, 2}, {retain, true}]}", 2, False, False),
])
def test_publish_qualifiers(action, qos, retain, matches):
    acl = only(f'{{allow, all, {action}, ["t"]}}')
    assert (publish(acl, "t", qos=qos, retain=retain) == ALLOW_ACCESS) is matches


@pytest.mark.parametrize("action, qos, matches", [
    ("{subscribe, [{qos, 2}]}", 2, True),
    ("{subscribe, [{qos, 2}]}", 1, False),
    ("{subscribe, {qos, [0, 1]}}", 1, True),
    ("{publish, [{qos, 2}]}", 2, False),
    # The retain qualifier of an all action concerns only its publishes.
    ("{all, [{qos, [1, 2]}, {retain, true}]}", 1, True),
    ("{all, [{qos, [1, 2]}, {retain, true}]}", 0, False),
])
def test_subscribe_qualifiers(action, qos, matches):
    acl = only(f'{{allow, all, {action}, ["t"]}}')
    assert (subscribe(acl, "t", qos=qos) == ALLOW_ACCESS) is matches


def test_a_qualified_deny_lets_the_rest_through():
    acl = parse_acl_text('{deny, all, {publish, [{retain, true}]}, ["#"]}.\n'
                         '{deny, all, {subscribe, [{qos, 2}]}, ["#"]}.\n'
                         "{allow, all}.\n")
    assert publish(acl, "t", retain=True) == DENY_ACCESS
    assert publish(acl, "t", qos=2) == ALLOW_ACCESS
    assert subscribe(acl, "t/#", qos=2) == DENY_ACCESS
    assert subscribe(acl, "t/#", qos=1) == ALLOW_ACCESS


# ------------------------------------------------------------------ topics


@pytest.mark.parametrize("rule_filter, topic, matches", [
    ("a/b", "a/b", True), ("a/b", "a/b/c", False), ("a/+", "a/b", True), ("a/+", "a", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True), ("a//b", "a//b", True),
])
def test_publish_topics_match_like_subscriptions(rule_filter, topic, matches):
    acl = only(f'{{allow, all, publish, ["{rule_filter}"]}}')
    assert (publish(acl, topic) == ALLOW_ACCESS) is matches


@pytest.mark.parametrize("rule_filter, topic_filter, covered", [
    ("a/+", "a/b", True), ("a/+", "a/+", True), ("a/+", "a/#", False),
    ("a/#", "a/+/b", True), ("a/#", "a/#", True), ("a/#", "a", True), ("a/#", "#", False),
    ("a/b", "a/+", False), ("#", "$SYS/#", False), ("$SYS/#", "$SYS/+/x", True),
])
def test_subscriptions_must_be_covered(rule_filter, topic_filter, covered):
    acl = only(f'{{allow, all, subscribe, ["{rule_filter}"]}}')
    assert (subscribe(acl, topic_filter) == ALLOW_ACCESS) is covered


@pytest.mark.parametrize("topic", ['{eq, "t/#"}', '"eq t/#"', '{eq, <<"t/#">>}', '<<"eq t/#">>'])
def test_eq_is_the_literal_filter(topic):
    acl = only(f"{{allow, all, all, [{topic}]}}")
    assert subscribe(acl, "t/#") == ALLOW_ACCESS
    assert subscribe(acl, "t/1") is None
    assert subscribe(acl, "t/+") is None
    assert publish(acl, "t/1") is None


def test_eq_applies_to_publishes_of_that_exact_topic():
    acl = only('{allow, all, publish, [{eq, "a/b"}]}')
    assert publish(acl, "a/b") == ALLOW_ACCESS
    assert publish(acl, "a/b/c") is None


def test_all_topics():
    acl = only('{allow, {username, "root"}, all, all}')
    for topic in ("a", "$SYS/brokers", "x/y/z"):
        assert publish(acl, topic, client("root")) == ALLOW_ACCESS
    assert subscribe(acl, "#", client("root")) == ALLOW_ACCESS
    assert subscribe(acl, "#", client("other")) is None


@PROPERTY_TEST
@given(rule_filter=mqtt_strategies.topic_filters(), topic=mqtt_strategies.topic_names())
def test_publish_decisions_agree_with_filter_matches(rule_filter, topic):
    acl = only(f'{{allow, all, publish, ["{rule_filter}"]}}')
    assert (publish(acl, topic) == ALLOW_ACCESS) is filter_matches(rule_filter, topic)


@PROPERTY_TEST
@given(rule_filter=mqtt_strategies.topic_filters(), wanted=mqtt_strategies.topic_filters())
def test_subscribe_decisions_agree_with_filter_covers(rule_filter, wanted):
    acl = only(f'{{allow, all, subscribe, ["{rule_filter}"]}}')
    assert (subscribe(acl, wanted) == ALLOW_ACCESS) is filter_covers(rule_filter, wanted)


# ------------------------------------------------------------------ placeholders


def test_username_and_clientid_placeholders():
    acl = only('{allow, all, all, ["users/${username}/#", "${clientid}/status", '
               '"t/foo${username}boo/${clientid}xxx"]}')
    alice = client("alice", client_id="c7")
    assert publish(acl, "users/alice/inbox", alice) == ALLOW_ACCESS
    assert subscribe(acl, "users/alice/#", alice) == ALLOW_ACCESS
    assert publish(acl, "c7/status", alice) == ALLOW_ACCESS
    assert publish(acl, "t/fooaliceboo/c7xxx", alice) == ALLOW_ACCESS
    assert publish(acl, "users/bob/inbox", alice) is None
    assert subscribe(acl, "users/+/#", alice) is None


def test_certificate_and_peerhost_placeholders():
    acl = only('{allow, all, publish, ["devices/${cert_common_name}/#", '
               '"subjects/${cert_subject}", "hosts/${peerhost}"]}')
    device = client(host="10.1.2.3", cert=certificate("sensor-7", "CN=sensor-7,O=Acme"))
    assert publish(acl, "devices/sensor-7/telemetry", device) == ALLOW_ACCESS
    assert publish(acl, "subjects/CN=sensor-7,O=Acme", device) == ALLOW_ACCESS
    assert publish(acl, "hosts/10.1.2.3", device) == ALLOW_ACCESS
    assert publish(acl, "devices/sensor-8/telemetry", device) is None
    ipv6 = client(host="2001:db8::1")
    assert publish(acl, "hosts/2001:db8::1", ipv6) == ALLOW_ACCESS


def test_a_placeholder_without_a_value_does_not_match():
    acl = parse_acl_text('{allow, all, publish, ["users/${username}/#", "open/#"]}.\n'
                         '{allow, all, publish, ["devices/${cert_common_name}/#"]}.\n'
                         '{allow, all, publish, ["hosts/${peerhost}"]}.\n'
                         '{deny, all}.\n')
    anonymous = client(None, host=None)
    assert publish(acl, "users//x", anonymous) == DENY_ACCESS  # not rendered as "users//#"
    assert publish(acl, "open/x", anonymous) == ALLOW_ACCESS  # the rule's other filters count
    assert publish(acl, "users//x", client("")) == DENY_ACCESS  # an empty value is no value
    assert publish(acl, "devices//x", client("a")) == DENY_ACCESS  # no certificate
    no_cn = client("a", cert=certificate(common_name=None))
    assert publish(acl, "devices//x", no_cn) == DENY_ACCESS
    assert publish(acl, "hosts/", anonymous) == DENY_ACCESS


@pytest.mark.parametrize("username", ["+", "#", "a/b", "a+", "b#", "/", "x\x00", "x\ny", "\x85"])
def test_a_placeholder_value_is_never_a_wildcard_or_a_level_separator(username):
    acl = parse_acl_text('{allow, all, all, ["${username}/#", "users/${username}"]}.\n'
                         '{deny, all}.\n')
    who = client(username)
    for topic_filter in ("+/#", "#", "users/+", "users/#", "a/b/#", "users/a/b"):
        assert subscribe(acl, topic_filter, who) == DENY_ACCESS
    for topic in ("x/y", "a/b/c", "users/a/b", f"users/{username}"):
        assert publish(acl, topic, who) == DENY_ACCESS


def test_a_value_may_not_turn_a_filter_into_a_system_topic():
    acl = parse_acl_text('{allow, all, all, ["${username}/#", "users/${username}"]}.\n'
                         '{deny, all}.\n')
    system = client("$SYS")
    assert subscribe(acl, "$SYS/#", system) == DENY_ACCESS
    assert publish(acl, "$SYS/brokers", system) == DENY_ACCESS
    assert publish(acl, "users/$SYS", system) == ALLOW_ACCESS  # '$' inside a filter is a letter


@PROPERTY_TEST
@given(username=st.text(alphabet="ab/+#$ \x00é", max_size=6),
       topic=mqtt_strategies.topic_names(st.sampled_from(["users", "a", "b", "+", "#", "$a", ""])))
def test_placeholder_values_never_widen_a_rule(username, topic):
    acl = only('{allow, all, all, ["users/${username}/#"]}')
    who = client(username)
    allowed = publish(acl, topic, who) == ALLOW_ACCESS
    safe = username != "" and not any(char in username for char in "/+#\x00")
    mine = topic == f"users/{username}" or topic.startswith(f"users/{username}/")
    assert allowed is (safe and mine)
    # Whatever the name, a subscription reaching past one's own level is refused.
    for topic_filter in ("users/+/#", "users/#", "#", "+/+/#"):
        assert subscribe(acl, topic_filter, who) is None


def test_placeholders_inside_eq_and_escaped_dollars_are_literal():
    acl = only('{allow, all, all, [{eq, "t/${username}"}, "u/${$}{username}", "v/${$}"]}')
    alice = client("alice")
    assert subscribe(acl, "t/${username}", alice) == ALLOW_ACCESS
    assert subscribe(acl, "t/alice", alice) is None
    assert publish(acl, "u/${username}", alice) == ALLOW_ACCESS
    assert publish(acl, "u/alice", alice) is None
    assert publish(acl, "v/$", alice) == ALLOW_ACCESS


def test_a_leading_dot_names_the_same_placeholder():
    acl = only('{allow, all, publish, ["t/${.username}"]}')  # emqx_template's syntax
    assert publish(acl, "t/alice", client("alice")) == ALLOW_ACCESS


# ------------------------------------------------------------------ Erlang terms


@pytest.mark.parametrize("spelling, value", [
    (r'"a\\d"', "a\\d"), (r'"\d"', "\x7f"), (r'"\101\x41\x{42}"', "AAB"), (r'"\s\t"', " \t"),
    (r'"\"q\""', '"q"'), (r'"\q"', "q"), (r'"\^a"', "\x01"), ('"a" "b"\n "c"', "abc"),
    ('<<"bin">>', "bin"), ('<<"é"/utf8>>', "é"), ("<<104, 105>>", "hi"), ('<<"a", "b">>', "ab"),
    ("<<>>", ""), ('"100% sure"', "100% sure"), ('"é"', "é"), ('"\\x{1F600}"', "\U0001F600"),
])
def test_erlang_strings(spelling, value):
    acl = only(f'{{allow, {{username, {spelling}}}, publish, ["t"]}}')
    assert publish(acl, "t", client(value)) == ALLOW_ACCESS
    assert publish(acl, "t", client(value + "x")) is None


def test_a_regex_is_written_with_erlang_escapes():
    acl = only('{allow, {clientid, {re, "^dev-\\\\d+$"}}, publish, ["t"]}')
    assert publish(acl, "t", client(client_id="dev-12")) == ALLOW_ACCESS
    assert publish(acl, "t", client(client_id="dev-x")) is None


@PROPERTY_TEST
@given(st.text(max_size=12))
def test_any_text_survives_erlang_quoting(value):
    def quoted(char: str) -> str:
        return char if char.isascii() and char.isprintable() and char not in '"\\' \
            else f"\\x{{{ord(char):X}}}"
    acl = only(f'{{allow, {{username, "{"".join(map(quoted, value))}"}}, publish, ["t"]}}')
    assert publish(acl, "t", client(value)) == ALLOW_ACCESS


def test_layout_comments_and_quoted_atoms():
    text = """
    %% a comment with a rule in it: {deny, all}.
    {'allow',   % the permission
       {'and', [{username, "a"}]},
       'publish',
       [ "t/1" , "t/2" ]
    }.   {deny, all}. % two rules on one line
    """
    acl = parse_acl_text(text)
    assert [(rule.line, rule.permission) for rule in acl.rules] == [(3, ALLOW_ACCESS),
                                                                    (7, DENY_ACCESS)]
    assert acl.rules[0].text == "{'allow', {'and', [{username, \"a\"}]}, 'publish', " \
                                "[ \"t/1\" , \"t/2\" ] }"
    assert publish(acl, "t/2", client("a")) == ALLOW_ACCESS
    assert publish(acl, "t/2", client("b")) == DENY_ACCESS


# ------------------------------------------------------------------ load errors


def test_the_error_names_file_line_and_rule():
    error = load_error('{allow, all}.\n\n{allow, all, publsh, ["t"]}.\n')
    assert str(error) == "etc/acl.conf:3: unknown action 'publsh' in {allow, all, publsh, [\"t\"]}"


def test_every_rule_in_error_is_reported_in_order():
    error = load_error('{allow, all, publsh, ["t"]}.\n'
                       '{allow, all, publish, ["t"]}.\n'
                       '{allow, all, publish, ["t"]\n'
                       '{deny, {username, {re, "("}}, all, ["t"]}.\n'
                       '{allow, all, all, ["ok"]}.\n'
                       '{deny, all, subscribe, ["a/#/b"]}.\n')
    assert [line.split(": ")[0] for line in error.errors] == [
        "etc/acl.conf:1", "etc/acl.conf:4", "etc/acl.conf:6"]
    assert error.errors[1] == ("etc/acl.conf:4: expected ',' or '}', found '{' in "
                               '{allow, all, publish, ["t"] {deny, {username, {re, "("}}, all, '
                               '["t"]}')
    assert str(error).splitlines() == list(error.errors)


@pytest.mark.parametrize("text, line, message", [
    ('{allow, all, publish, ["t"]}', 1, "expected '.' to end the rule"),
    ('{allow, all}.\n{allow, all, publish, ["t]}.\n', 2, "string never closed"),
    ("{allow, Who, publish, [\"t\"]}.", 1, "Who is a variable"),
    ('{allow, all, {publish, [{qos, 1.0}]}, ["t"]}.', 1, "floats are not allowed"),
    ('{allow, all, publish, ["t" | T]}.', 1, "list tails ([H | T]) are not supported"),
    ("{allow, all}.{deny, all}.", 1, "the '.' ending a rule must be followed by a space"),
    ('{allow, all, publish, ["t"]}; {deny, all}.', 1, "unexpected character ';'"),
    ('{allow, all, publish, [t/1]}.', 1, "expected ',' or ']', found '/'"),
    ('{allow, <<"\\xe9">>}.', 1, "the binary is not UTF-8 text"),
    ("{permit, all}.", 1, "unknown permission 'permit' (allow or deny)"),
    ("allow.", 1, "a rule is {Permission, Who, Action, Topics} or {Permission, all}"),
    ('{allow, all, publish}.', 1, "a rule is {Permission, Who, Action, Topics}"),
    ('{allow, {username, "a"}}.', 1, "a two-element rule is {allow, all} or {deny, all}"),
    ("{allow, {security_profile, legacy}}.", 1, "security_profile condition is not supported"),
    ('{allow, {zone, external}, all, ["t"]}.', 1, "zone condition is not supported"),
    ('{allow, {client_attr, "tns", "a"}, all, ["t"]}.', 1, "client_attr condition is not"),
    ('{allow, {peerhost, "a"}, all, ["t"]}.', 1, "unknown client condition {peerhost, \"a\"}"),
    ('{allow, {username, alice}, all, ["t"]}.', 1, "the username must be a string"),
    ('{allow, {ipaddr, "10.0.0.0/33"}, all, ["t"]}.', 1, "invalid address or network"),
    ('{allow, {ipaddrs, "10.0.0.1"}, all, ["t"]}.', 1, "ipaddrs must be a list"),
    ('{allow, {clientid, {re, "a("}}, all, ["t"]}.', 1, "invalid regular expression 'a('"),
    ('{allow, all, pubsub, ["t"]}.', 1, "unknown action 'pubsub' (EMQX 5 calls it all)"),
    ('{allow, all, {publish, [{qos, 3}]}, ["t"]}.', 1, "invalid qos 3 (0, 1 or 2)"),
    ('{allow, all, {publish, [{qos, [0, x]}]}, ["t"]}.', 1, "invalid qos 'x'"),
    ('{allow, all, {publish, [{retain, maybe}]}, ["t"]}.', 1, "invalid retain 'maybe'"),
    ('{allow, all, {publish, [{retain, true}, {retain, false}]}, ["t"]}.', 1, "retain is given"),
    ('{allow, all, {subscribe, [{retain, true}]}, ["t"]}.', 1, "retain applies to publish"),
    ('{allow, all, {publish, [{qso, 1}]}, ["t"]}.', 1, "unknown publish qualifier {qso, 1}"),
    ('{allow, all, {pub, [{qos, 1}]}, ["t"]}.', 1, "invalid action {pub, [{qos, 1}]}"),
    ('{allow, all, publish, "t/#"}.', 1, "the topics must be a list"),
    ('{allow, all, publish, [{re, "^t"}]}.', 1, "EMQX has no regular expressions for topics"),
    ('{allow, all, publish, [t]}.', 1, "a topic must be a string"),
    ('{allow, all, publish, ["a/#/b"]}.', 1, "invalid topic filter 'a/#/b'"),
    ('{allow, all, publish, [""]}.', 1, "invalid topic filter ''"),
    ('{allow, all, publish, [{eq, "a#"}]}.', 1, "invalid topic filter 'a#'"),
    ('{allow, all, publish, ["a/${username}#"]}.', 1, "invalid topic filter 'a/x#'"),
    ('{allow, all, publish, ["t/${usrname}"]}.', 1, "unknown placeholder ${usrname} (known: "),
    ('{allow, all, publish, ["t/${cn}"]}.', 1, "(write ${cert_common_name}; write ${$}"),
    ('{allow, all, publish, ["t/${zone}"]}.', 1, "(bastionmq has no zones"),
    ('{allow, all, publish, ["t/${client_attrs.tns}"]}.', 1, "has no client attributes"),
])
def test_load_errors(text, line, message):
    error = load_error(text)
    assert len(error.errors) == 1
    assert error.errors[0].startswith(f"etc/acl.conf:{line}: ")
    assert message in error.errors[0]


def test_the_line_is_where_the_fault_is_within_a_long_rule():
    error = load_error('{allow,\n  {username, "a"},\n  {publish, [{qos, 7}]},\n  ["t"]}.\n')
    assert str(error) == ('etc/acl.conf:3: invalid qos 7 (0, 1 or 2) in '
                          '{allow, {username, "a"}, {publish, [{qos, 7}]}, ["t"]}')


def test_a_long_rule_is_shortened_in_messages():
    topics = ", ".join(f'"t/{index}"' for index in range(100))
    error = load_error(f"{{allow, all, publsh, [{topics}]}}.")
    shown = str(error).split(" in ", 1)[1]
    assert shown.startswith('{allow, all, publsh, ["t/0"') and shown.endswith("…")
    assert len(shown) <= 160


def test_client_conditions_are_evaluated_once_per_client():
    # A regular expression on a long client id is paid once per connection,
    # not on every check.
    source = parse_acl_text('{allow, {clientid, {re, "^sensor-.*-prod$"}}, publish, ["t/#"]}.\n'
                            '{deny, {username, "x"}, publish, ["#"]}.\n')
    calls = []

    def counting(rule):
        def who(client):
            calls.append(rule.line)
            return rule.who(client)
        return attrs.evolve(rule, who=who)

    counted = EmqxAclFile(tuple(counting(rule) for rule in source.rules))
    client = ClientInfo(client_id="sensor-7-prod", username=None, peer=PeerInfo(listener="tcp:x"))
    for n in range(50):
        assert counted.check(AccessRequest(client=client, action=PUBLISH_ACTION,
                                           topic=f"t/{n}")) == ALLOW_ACCESS
    assert sorted(calls) == [1, 2]
    other = ClientInfo(client_id="sensor-8-test", username="x", peer=PeerInfo(listener="tcp:x"))
    assert counted.check(AccessRequest(client=other, action=PUBLISH_ACTION,
                                       topic="t/1")) == DENY_ACCESS
    assert len(calls) == 4


def test_a_final_dollar_in_a_regular_expression_matches_only_at_the_true_end():
    source = parse_acl_text('{allow, {username, {re, "^dashboard$"}}, publish, ["t"]}.\n'
                            '{allow, {username, {re, "cost\\\\$"}}, publish, ["t"]}.\n')

    def check(username):
        client = ClientInfo(client_id="c", username=username, peer=PeerInfo(listener="tcp:x"))
        return source.check(AccessRequest(client=client, action=PUBLISH_ACTION, topic="t"))

    assert check("dashboard") == ALLOW_ACCESS
    assert check("dashboard\n") is None
    assert check("the cost$") == ALLOW_ACCESS  # an escaped $ is a dollar sign
