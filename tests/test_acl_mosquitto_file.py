"""Mosquitto's acl_file as an authorization source (acl/mosquitto_file.py):
the format as mosquitto.conf(5) describes it, the decisions as Mosquitto
2.0's src/security_default.c makes them, and a real mosquitto (Debian's
mosquitto package) deciding the same cases from the same file."""

from __future__ import annotations

import datetime
import logging
import re
import subprocess

import pytest

from mosquitto_peer import running_mosquitto, tool

from bastionmq.acl.mosquitto_file import (
    MosquittoAclError, parse_mosquitto_acl, parse_mosquitto_acl_text,
)
from bastionmq.broker.ports import (
    ALLOW_ACCESS, DENY_ACCESS, PUBLISH_ACTION, SUBSCRIBE_ACTION, AccessRequest,
    CertificateFacts, ClientInfo, PeerCertificate, PeerInfo,
)

PUB = PUBLISH_ACTION
SUB = SUBSCRIBE_ACTION
ALLOW = ALLOW_ACCESS
DENY = DENY_ACCESS
TIMEOUT = 10.0


def certificate(common_name: str | None, subject: str) -> PeerCertificate:
    moment = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    facts = CertificateFacts(subject=subject, common_name=common_name, issuer="CN=Test CA",
                             serial=1, sha256="00" * 32, not_before=moment, not_after=moment)
    return PeerCertificate(b"", lambda der: facts)


def request(action: str, topic: str, *, username: str | None = None,
            client_id: str = "client-1", cert: PeerCertificate | None = None,
            address: tuple[str, int] | None = ("192.0.2.7", 50000)) -> AccessRequest:
    peer = PeerInfo(listener="ssl:default" if cert else "tcp:default", address=address,
                    tls=cert is not None, certificate=cert)
    client = ClientInfo(client_id=client_id, username=username, peer=peer)
    return AccessRequest(client=client, action=action, topic=topic)


def decide(acl_text: str, action: str, topic: str, **who) -> str | None:
    return parse_mosquitto_acl_text(acl_text).check(request(action, topic, **who))


# The example of mosquitto.conf(5) and Debian's /etc/mosquitto/aclfile.example.
DOCS_EXAMPLE = """\
# This affects access control for clients with no username.
topic read $SYS/#

# This only affects clients with username "roger".
user roger
topic foo/bar

# This affects all clients.
pattern write $SYS/broker/connection/%c/state
pattern write sensor/%u/data
"""


@pytest.mark.parametrize("username, action, topic, expected", [
    (None, SUB, "$SYS/broker/uptime", ALLOW),
    (None, PUB, "$SYS/broker/uptime", None),     # read only
    (None, SUB, "foo/bar", None),                # roger's
    ("roger", SUB, "foo/bar", ALLOW),            # no access word: readwrite
    ("roger", PUB, "foo/bar", ALLOW),
    ("roger", SUB, "$SYS/broker/uptime", None),  # the anonymous lines are not roger's
    ("roger", PUB, "$SYS/broker/connection/bridge-1/state", ALLOW),
    (None, PUB, "$SYS/broker/connection/bridge-1/state", ALLOW),
    (None, PUB, "$SYS/broker/connection/bridge-2/state", None),
    ("roger", PUB, "sensor/roger/data", ALLOW),
    ("roger", SUB, "sensor/roger/data", None),   # write only
    ("roger", PUB, "sensor/anne/data", None),
    (None, PUB, "sensor//data", None),           # no username: the %u pattern does not apply
])
def test_the_example_of_the_mosquitto_docs(username, action, topic, expected):
    assert decide(DOCS_EXAMPLE, action, topic, username=username,
                  client_id="bridge-1") == expected


@pytest.mark.parametrize("access, publish, subscribe", [
    ("read", None, ALLOW),
    ("write", ALLOW, None),
    ("readwrite", ALLOW, ALLOW),
    ("", ALLOW, ALLOW),
    ("deny", DENY, DENY),
])
def test_access_words(access, publish, subscribe):
    text = f"user u\ntopic {access} a/+/c\n"
    assert decide(text, PUB, "a/b/c", username="u") == publish
    assert decide(text, SUB, "a/b/c", username="u") == subscribe
    assert decide(text, PUB, "a/b/d", username="u") is None


def test_deny_wins_over_grants_wherever_it_stands():
    for text in ("user u\ntopic deny a/secret\ntopic readwrite a/#\n",
                 "user u\ntopic readwrite a/#\ntopic deny a/secret\n"):
        assert decide(text, PUB, "a/secret", username="u") == DENY
        assert decide(text, SUB, "a/secret", username="u") == DENY
        assert decide(text, PUB, "a/public", username="u") == ALLOW


def test_own_lines_come_before_the_patterns():
    # Mosquitto checks a user's topic lines first: its grant beats a deny pattern.
    text = "pattern deny shared/#\nuser u\ntopic readwrite shared/u\n"
    assert decide(text, PUB, "shared/u", username="u") == ALLOW
    assert decide(text, PUB, "shared/v", username="u") == DENY
    # ...and its deny beats a grant pattern.
    text = "pattern readwrite home/%u/#\nuser u\ntopic deny home/u/locked\n"
    assert decide(text, PUB, "home/u/locked", username="u") == DENY
    assert decide(text, PUB, "home/u/open", username="u") == ALLOW


def test_anonymous_clients_get_the_lines_before_the_first_user():
    text = "topic read news/#\nuser alice\ntopic read alice/#\n"
    assert decide(text, SUB, "news/today") == ALLOW
    assert decide(text, SUB, "alice/inbox") is None
    assert decide(text, SUB, "alice/inbox", username="alice") == ALLOW
    assert decide(text, SUB, "news/today", username="alice") is None
    # An empty username is a username, not its absence.
    assert decide(text, SUB, "news/today", username="") is None


def test_user_sections_add_up_and_usernames_may_hold_spaces():
    text = ("user alice\ntopic read a/#\nuser bob\ntopic read b/#\n"
            "user alice\ntopic write w/#\nuser  Jane Doe  \ntopic jane/#\n")
    assert decide(text, SUB, "a/1", username="alice") == ALLOW
    assert decide(text, PUB, "w/1", username="alice") == ALLOW
    assert decide(text, SUB, "b/1", username="alice") is None
    assert decide(text, PUB, "jane/x", username="Jane Doe") == ALLOW
    assert decide(text, PUB, "a/1", username="ALICE") is None  # names are case-sensitive


def test_patterns_apply_to_every_client_wherever_they_stand():
    text = "user alice\ntopic read a/#\npattern readwrite devices/%c/#\nuser bob\n"
    for username in (None, "alice", "bob", "carol"):
        assert decide(text, PUB, "devices/d-7/temp", username=username, client_id="d-7") == ALLOW
        assert decide(text, PUB, "devices/d-8/temp", username=username, client_id="d-7") is None


def test_client_id_username_and_certificate_placeholders():
    text = ("pattern readwrite clients/%c/#\n"
            "pattern read users/%u/inbox\n"
            "pattern write certs/%C/up\n"
            "pattern read subjects/%D\n"
            "pattern write hosts/%H/log\n"
            "pattern write pair/%u/%c\n")
    cert = certificate("sensor-7", "CN=sensor-7,O=Acme")
    who = dict(username="anne", client_id="c-1", cert=cert)
    assert decide(text, PUB, "clients/c-1/a/b", **who) == ALLOW
    assert decide(text, SUB, "users/anne/inbox", **who) == ALLOW
    assert decide(text, PUB, "certs/sensor-7/up", **who) == ALLOW
    assert decide(text, SUB, "subjects/CN=sensor-7,O=Acme", **who) == ALLOW
    assert decide(text, PUB, "hosts/192.0.2.7/log", **who) == ALLOW
    assert decide(text, PUB, "pair/anne/c-1", **who) == ALLOW
    assert decide(text, PUB, "pair/c-1/anne", **who) is None
    assert decide(text, PUB, "certs/sensor-8/up", **who) is None
    # Placeholders are replaced in pattern lines only.
    assert decide("topic readwrite clients/%c\n", PUB, "clients/%c", client_id="c-1") == ALLOW
    assert decide("topic readwrite clients/%c\n", PUB, "clients/c-1", client_id="c-1") is None


def test_a_pattern_without_a_value_for_its_placeholder_does_not_apply():
    text = ("pattern write certs/%C/up\npattern deny certs/%C/locked\n"
            "pattern read users/%u\npattern write hosts/%H\npattern read open/#\n")
    # No certificate, a certificate without a CN, no username, no address.
    assert decide(text, PUB, "certs//up") is None
    assert decide(text, PUB, "certs/%C/up") is None
    assert decide(text, PUB, "certs//up", cert=certificate(None, "O=Acme")) is None
    assert decide(text, SUB, "users/") is None
    assert decide(text, SUB, "users/", username="") is None
    assert decide(text, PUB, "hosts/", address=None) is None
    # The other patterns still do.
    assert decide(text, SUB, "open/x") == ALLOW


@pytest.mark.parametrize("who", [
    dict(client_id="+"), dict(client_id="#"), dict(client_id="a+b"),
    dict(username="+", client_id="c-1"), dict(username="x#", client_id="c-1"),
])
def test_a_wildcard_in_a_client_id_or_username_denies_what_patterns_decide(who):
    # As Mosquitto: whether or not the patterns use the value.
    text = "pattern readwrite clients/%c/#\npattern read open/#\nuser +\ntopic read own/#\n"
    assert decide(text, PUB, "clients/a/x", **who) == DENY
    assert decide(text, SUB, "clients/#", **who) == DENY
    assert decide(text, SUB, "open/x", **who) == DENY
    if who.get("username") == "+":
        assert decide(text, SUB, "own/x", **who) == ALLOW  # its own lines still grant


@pytest.mark.parametrize("who", [
    dict(client_id="a/b"),                       # would reach into client a's tree
    dict(client_id="$SYS"),                      # would make a $ topic
    dict(client_id="tab\there"),
    dict(username="x/y"),
    dict(cert=certificate("a/b", "CN=a")),
    dict(cert=certificate("ok", "CN=a+UID=b")),  # a multi-valued RDN
    dict(cert=certificate("ok", "CN=#616263")),
])
def test_a_value_that_would_not_stay_one_level_is_refused(who):
    text = ("pattern readwrite devices/%c/#\npattern readwrite users/%u/#\n"
            "pattern readwrite certs/%C/#\npattern read subjects/%D/#\npattern read open/#\n")
    assert decide(text, PUB, "devices/a/b/x", **who) == DENY
    assert decide(text, SUB, "open/x", **who) == DENY
    # The same values are fine when no pattern uses them.
    assert decide("pattern read open/#\n", SUB, "open/x", **who) == ALLOW


def test_values_are_never_read_as_wildcards_by_patterns_that_do_not_use_them():
    cert = certificate("c+", "CN=c+")
    assert decide("pattern read open/%c\n", SUB, "open/c-1", client_id="c-1", cert=cert) == ALLOW


@pytest.mark.parametrize("rule, subscription, expected", [
    # A read rule grants a filter it covers...
    ("topic read a/#", "a/+", ALLOW),
    ("topic read a/#", "a/#", ALLOW),
    ("topic read a/#", "a", ALLOW),
    ("topic read a/+", "a/b", ALLOW),
    ("topic read a/+", "a/+", ALLOW),
    ("topic read +/b", "+/b", ALLOW),
    # ...and no wider one.
    ("topic read a/+", "a/#", None),
    ("topic read a/+", "+/+", None),
    ("topic read a/b", "a/+", None),
    ("topic read #", "$SYS/broker/uptime", None),
    ("topic read $SYS/#", "$SYS/broker/+", ALLOW),
    # A deny rule refuses any filter that could reach one of its topics.
    ("topic deny a/secret", "a/#", DENY),
    ("topic deny a/secret", "+/secret", DENY),
    ("topic deny a/secret", "#", DENY),
    ("topic deny a/+/c", "a/b/+", DENY),
    ("topic deny a/#", "a", DENY),
    ("topic deny a/secret", "a/public", None),
    ("topic deny a/secret", "a/+/x", None),
    ("topic deny a/+", "a", None),
    ("topic deny $SYS/#", "#", None),
    ("topic deny $SYS/#", "+/broker", None),
    ("topic deny #", "$SYS/x", None),
])
def test_subscriptions(rule, subscription, expected):
    assert decide(f"{rule}\n", SUB, subscription) == expected


def test_other_actions_and_empty_files_decide_nothing(caplog):
    assert decide("topic readwrite #\n", "unsubscribe", "a") is None
    with caplog.at_level(logging.WARNING, logger="bastionmq.acl"):
        acl = parse_mosquitto_acl_text("# nothing yet\n\n", "empty.acl")
    assert "empty.acl has no rules" in caplog.text
    assert acl.check(request(PUB, "a")) is None
    assert acl.check(request(SUB, "#")) is None


def test_layout_comments_blanks_and_crlf():
    text = ("# comment\r\n"
            "\r\n"
            "   \t\r\n"
            "  # an indented comment\n"
            "\ttopic   read    a/b  \t\r\n"
            "user   bob  \r\n"
            "topic  read  spaced topic/x  \n"
            "topic deny\n"          # one word: the topic "deny", readwrite
            "topic read\n"          # the topic "read"
            "user carol # admin\n"  # a # later in a line is part of it
            "topic carol/#\n")
    acl = parse_mosquitto_acl_text(text)
    assert acl.check(request(SUB, "a/b")) == ALLOW
    assert acl.check(request(SUB, "spaced topic/x", username="bob")) == ALLOW
    assert acl.check(request(PUB, "deny", username="bob")) == ALLOW
    assert acl.check(request(PUB, "read", username="bob")) == ALLOW
    assert acl.check(request(PUB, "carol/x", username="carol # admin")) == ALLOW
    assert acl.check(request(PUB, "carol/x", username="carol")) is None


@pytest.mark.parametrize("line, message", [
    ("bogus line", "unknown keyword 'bogus'"),
    ("TOPIC read a", "unknown keyword 'TOPIC'"),
    ("topic\tread\ta", "(separate words with spaces)"),
    ("topic read\ta", "control character in topic"),
    ("user", "user needs a username"),
    ("user   ", "user needs a username"),
    ("topic", "no topic"),
    ("pattern   ", "no topic"),
    ("topic reed a/b", "unknown access 'reed'"),
    ("topic read a/#/b", "invalid topic filter 'a/#/b'"),
    ("topic read a+", "invalid topic filter 'a+'"),
    ("pattern read x/a%cb", "%c must be a whole topic level"),
    ("pattern read %count/x", "%c must be a whole topic level"),
    ("pattern read x/%U", "unknown placeholder %U"),
    ("topic read a\0b", "control character in topic"),
    ("user a\x7fb", "control character in username"),
])
def test_errors_name_the_file_and_the_line(line, message):
    with pytest.raises(MosquittoAclError) as raised:
        parse_mosquitto_acl_text(f"# rules\ntopic read ok\n\n{line}\ntopic read later\n",
                                 "/etc/bastionmq/acl")
    assert str(raised.value).startswith("/etc/bastionmq/acl, line 4: ")
    assert message in str(raised.value)
    assert raised.value.line == 4


def test_parse_from_a_file(tmp_path):
    path = tmp_path / "acl"
    path.write_text(DOCS_EXAMPLE)
    acl = parse_mosquitto_acl(path)
    assert acl.source == str(path)
    assert acl.check(request(PUB, "foo/bar", username="roger")) == ALLOW
    path.write_bytes(b"topic read a\nuser b\xffb\n")
    with pytest.raises(MosquittoAclError) as raised:
        parse_mosquitto_acl(path)
    assert str(raised.value) == f"{path}, line 2: the file is not UTF-8 text"
    with pytest.raises(FileNotFoundError):
        parse_mosquitto_acl(tmp_path / "missing")


# --- the same file, decided by a real mosquitto -----------------------------

REFERENCE_ACL = """\
# Clients without a username.
topic readwrite public/#
topic deny public/private
topic read status/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic read sensors/+
topic write commands/#
topic readwrite shared/alice

user admin
topic readwrite #

# Every client.
pattern readwrite devices/%c/#
pattern deny devices/%c/locked
pattern read inbox/%u
pattern deny shared/#
"""

# (username, client id, action, topic); reads are of topic names, which is
# how Mosquitto checks each message it delivers.
REFERENCE_CASES = [
    (None, "anon-1", PUB, "public/news"),
    (None, "anon-1", PUB, "public/private"),
    (None, "anon-1", PUB, "status/up"),
    (None, "anon-1", PUB, "alice/notes"),
    (None, "anon-1", PUB, "devices/anon-1/temp"),
    (None, "anon-1", PUB, "devices/anon-1/locked"),
    (None, "anon-1", SUB, "public/news"),
    (None, "anon-1", SUB, "public/private"),
    (None, "anon-1", SUB, "status/up"),
    (None, "anon-1", SUB, "inbox/alice"),
    ("alice", "alice-1", PUB, "alice/notes"),
    ("alice", "alice-1", PUB, "alice/secret"),
    ("alice", "alice-1", PUB, "sensors/kitchen"),
    ("alice", "alice-1", PUB, "commands/light/on"),
    ("alice", "alice-1", PUB, "public/news"),
    ("alice", "alice-1", PUB, "shared/alice"),
    ("alice", "alice-1", PUB, "shared/other"),
    ("alice", "alice-1", PUB, "devices/alice-1/temp"),
    ("alice", "alice-1", SUB, "alice/secret"),
    ("alice", "alice-1", SUB, "sensors/kitchen"),
    ("alice", "alice-1", SUB, "sensors/kitchen/deep"),
    ("alice", "alice-1", SUB, "commands/light/on"),
    ("alice", "alice-1", SUB, "public/news"),
    ("alice", "alice-1", SUB, "inbox/alice"),
    ("alice", "alice#2", PUB, "alice/notes"),
    ("alice", "alice#2", PUB, "public/news"),
    ("bob", "bob-1", PUB, "devices/bob-1/temp"),
    ("bob", "bob-1", PUB, "devices/bob-1/locked"),
    ("bob", "bob-1", PUB, "devices/alice-1/temp"),
    ("bob", "bob-1", PUB, "public/news"),
    ("bob", "bob-1", SUB, "inbox/bob"),
    ("bob", "bob-1", SUB, "inbox/alice"),
    ("bob", "bob+1", PUB, "public/news"),
    ("bob", "bob+1", SUB, "inbox/bob"),
]


def connection_options(port: int, username: str | None, client_id: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(port), "-V", "5", "-i", client_id,
            *(["-u", username] if username is not None else [])]


def publish(port: int, username: str | None, client_id: str, topic: str,
            retain: bool = False) -> bool:
    """Whether mosquitto accepted a QoS 1 publish, from the reason code of its PUBACK."""
    done = subprocess.run(
        [tool("mosquitto_pub"), *connection_options(port, username, client_id), "-q", "1",
         "-d", "-t", topic, "-m", topic, *(["-r"] if retain else [])],
        capture_output=True, text=True, timeout=TIMEOUT)
    code = re.search(r"received PUBACK \(Mid: \d+, RC:(\d+)\)", done.stdout)
    assert code, done.stdout + done.stderr
    return int(code[1]) < 0x80


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A real mosquitto with REFERENCE_ACL as its acl_file; the decisions it
    made for REFERENCE_CASES, and what a subscription to sensors/# received."""
    directory = tmp_path_factory.mktemp("mosquitto")
    (directory / "acl").write_text(REFERENCE_ACL)
    with running_mosquitto(directory, f"allow_anonymous true\nacl_file {directory / 'acl'}\n") \
            as port:
        yield observe(port)


def observe(port: int) -> tuple[dict, set[str]]:
    decisions = {}
    # Reads: a retained message on each topic; mosquitto sends it to a new
    # subscriber only if the subscriber may read it.
    read_topics = {case[3] for case in REFERENCE_CASES if case[2] == SUB}
    for topic in sorted(read_topics | {"sensors/kitchen", "sensors/kitchen/deep"}):
        assert publish(port, "admin", "admin-1", topic, retain=True)
    for case in REFERENCE_CASES:
        if case[2] == PUB:
            decisions[case] = publish(port, *case[:2], case[3])
    readers = {}
    for username, client_id, action, topic in REFERENCE_CASES:
        if action == SUB:
            readers.setdefault((username, client_id), []).append(topic)
    readers[("alice", "alice-wide")] = ["sensors/#"]
    running = {
        reader: subprocess.Popen(
            [tool("mosquitto_sub"), *connection_options(port, *reader), "-W", "1", "-v",
             *[option for topic in topics for option in ("-t", topic)]],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for reader, topics in readers.items()}
    received: dict[tuple, set[str]] = {}
    for reader, process in running.items():
        received[reader] = set()
        # "topic payload" lines; each retained message's payload is its topic.
        for line in process.communicate(timeout=TIMEOUT)[0].splitlines():
            topic, _, payload = line.partition(" ")
            if topic == payload:
                received[reader].add(topic)
    for username, client_id, action, topic in REFERENCE_CASES:
        if action == SUB:
            decisions[(username, client_id, action, topic)] = \
                topic in received[(username, client_id)]
    return decisions, received[("alice", "alice-wide")]


def test_mosquitto_decides_as_we_do_with_no_match_deny(reference):
    theirs, _ = reference
    acl = parse_mosquitto_acl_text(REFERENCE_ACL)
    ours = {case: acl.check(request(case[2], case[3], username=case[0], client_id=case[1],
                                    address=("127.0.0.1", 50000))) == ALLOW
            for case in REFERENCE_CASES}
    assert ours == theirs
    # Both kinds of answer were seen, so the comparison says something.
    assert set(theirs.values()) == {True, False}


def test_mosquitto_grants_any_subscription_and_filters_what_it_delivers(reference):
    # With "topic read sensors/+", mosquitto grants alice a subscription to
    # sensors/# and then delivers only the topics she may read. Here the
    # subscription itself is decided: sensors/+ is granted, sensors/# is not.
    _, delivered = reference
    assert delivered == {"sensors/kitchen"}
    acl = parse_mosquitto_acl_text(REFERENCE_ACL)
    assert acl.check(request(SUB, "sensors/+", username="alice")) == ALLOW
    assert acl.check(request(SUB, "sensors/#", username="alice")) is None
