"""The mapping between MQTT topics and filters and NATS subjects and key-value
keys that the cluster's nodes use (cluster/codec.py)."""

from __future__ import annotations

import re

import pytest
import mqtt_strategies
from hypothesis import given, settings
from hypothesis import strategies as st

from bastionmq.broker.topics import filter_matches
from bastionmq.cluster import codec
from bastionmq.cluster.codec import (
    filter_to_subjects, key_to_topic, subject_to_topic, topic_to_key, topic_to_subject,
)

PROPERTY_TEST = settings(deadline=None, max_examples=200)

#: What follows the prefix of every subject the codec makes.
TOKENS = re.compile(r"[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]+)*")
#: JetStream's rule for a key (nats.go's keyValid): these characters, and no
#: '.' at either end.
KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


def assert_valid_key(key: str) -> None:
    assert KV_KEY.fullmatch(key), key
    assert not key.startswith(".") and not key.endswith("."), key


def nats_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: '*' is exactly one token, '>' one or more."""
    wanted = pattern.split(".")
    tokens = subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(wanted) == len(tokens)


# ------------------------------------------------------------------ examples

@pytest.mark.parametrize(("topic", "subject"), [
    ("a", "bmq.t.a"),
    ("a/b", "bmq.t.a.b"),
    ("sport/tennis-2/player_1", "bmq.t.sport.tennis-2.player_1"),
    ("a//b", "bmq.t.a.=.b"),  # an empty level is the token "=" alone
    ("/leading", "bmq.t.=.leading"),
    ("trailing/", "bmq.t.trailing.="),
    ("/", "bmq.t.=.="),
    ("//", "bmq.t.=.=.="),
    ("$SYS/x", "bmq.t.=24SYS.x"),
    ("=", "bmq.t.=3D"),  # the escape character is itself escaped
    ("==/=", "bmq.t.=3D=3D.=3D"),
    ("a.b", "bmq.t.a=2Eb"),
    ("*/>", "bmq.t.=2A.=3E"),
    ("a b/c\td\ne", "bmq.t.a=20b.c=09d=0Ae"),
    ("é", "bmq.t.=C3=A9"),
    ("caf\u00e9/\u20ac", "bmq.t.caf=C3=A9.=E2=82=AC"),
    ("\U0001f600", "bmq.t.=F0=9F=98=80"),
    ("\ufeff", "bmq.t.=EF=BB=BF"),
    ("a/b/c=1/d", "bmq.t.a.b.c=3D1.d"),
])
def test_topic_to_subject(topic, subject):
    assert topic_to_subject("bmq.t", topic) == subject
    assert subject_to_topic("bmq.t", subject) == topic
    key = subject.removeprefix("bmq.t.")
    assert topic_to_key(topic) == key
    assert key_to_topic(key) == topic
    assert_valid_key(key)


@pytest.mark.parametrize("prefix", ["bmq.t", "bmq.d", "bmq.r"])
def test_the_prefix_is_the_callers(prefix):
    assert topic_to_subject(prefix, "a/b") == f"{prefix}.a.b"
    assert topic_to_subject(prefix, "a b") == f"{prefix}.a=20b"
    assert subject_to_topic(prefix, f"{prefix}.a.=") == "a/"
    assert filter_to_subjects(prefix, "a/#") == (f"{prefix}.a", f"{prefix}.a.>")


def test_the_subject_must_be_under_the_prefix():
    with pytest.raises(ValueError, match=r"'bmq\.d\.a' does not start with 'bmq\.t\.'"):
        subject_to_topic("bmq.t", "bmq.d.a")
    with pytest.raises(ValueError, match="does not start with"):
        subject_to_topic("bmq.t", "bmq.t")  # the bare prefix is no topic
    with pytest.raises(ValueError, match="does not start with"):
        subject_to_topic("bmq.t", "bmq.tt.a")


@pytest.mark.parametrize(("tokens", "message"), [
    ("", "empty token"),
    ("a..b", "empty token"),
    ("a.", "empty token"),
    (".a", "empty token"),
    ("a b", "not an escape"),
    ("a/b", "not an escape"),
    ("*", "not an escape"),
    (">", "not an escape"),
    ("a=", "not an escape"),
    ("a=4", "not an escape"),
    ("==", "not an escape"),
    ("=3d", "not an escape"),  # upper-case hex only
    ("=G0", "not an escape"),
    ("\u00e9", "not an escape"),
    ("=FF", "not UTF-8"),
    ("=C3", "not UTF-8"),  # a code point cut short
    ("=C3.=A9", "not UTF-8"),  # ... or split across levels
    ("=C0=80", "not UTF-8"),  # an overlong U+0000
    ("=41", "not escaped canonically"),  # "A" has one spelling
    ("=2D", "not escaped canonically"),
    ("a.=5F", "not escaped canonically"),
])
def test_malformed_subjects_and_keys(tokens, message):
    with pytest.raises(ValueError, match=message):
        subject_to_topic("bmq.t", "bmq.t." + tokens)
    with pytest.raises(ValueError, match=message):
        key_to_topic(tokens)


def test_the_error_names_the_subject_or_key():
    with pytest.raises(ValueError, match=r"^subject 'bmq\.t\.a\.=41': token '=41' .*expected 'A'"):
        subject_to_topic("bmq.t", "bmq.t.a.=41")
    with pytest.raises(ValueError, match=r"^key 'a\.\.b': empty token"):
        key_to_topic("a..b")


def test_a_lone_surrogate_is_refused():
    # Not a legal topic (not UTF-8 encodable); refused, not mangled.
    with pytest.raises(ValueError):
        topic_to_subject("bmq.t", "a/\ud800")
    with pytest.raises(ValueError):
        topic_to_key("\udfff")


@pytest.mark.parametrize("topic", [
    "x" * (codec.CACHE_MAX_CHARS + 1),
    " " * (codec.CACHE_MAX_CHARS + 1),
    "a/" * 200 + "\u20ac",
    "/" * 300,
])
def test_long_topics_are_escaped_uncached(topic):
    subject = topic_to_subject("bmq.t", topic)
    assert TOKENS.fullmatch(subject.removeprefix("bmq.t."))
    assert subject_to_topic("bmq.t", subject) == topic
    assert key_to_topic(topic_to_key(topic)) == topic


@pytest.mark.parametrize(("topic_filter", "subjects"), [
    ("a", ("bmq.t.a",)),
    ("a/b", ("bmq.t.a.b",)),
    ("+", ("bmq.t.*",)),
    ("+/x", ("bmq.t.*.x",)),
    ("a/+/b", ("bmq.t.a.*.b",)),
    ("+/+", ("bmq.t.*.*",)),
    # '#' also matches its parent level, which '>' does not.
    ("a/#", ("bmq.t.a", "bmq.t.a.>")),
    ("a/b/#", ("bmq.t.a.b", "bmq.t.a.b.>")),
    ("+/#", ("bmq.t.*", "bmq.t.*.>")),
    ("a/+/#", ("bmq.t.a.*", "bmq.t.a.*.>")),
    # '#' alone: every topic has a level, and the bare prefix is no topic.
    ("#", ("bmq.t.>",)),
    # Empty levels, and levels that need escaping, as in topics.
    ("/#", ("bmq.t.=", "bmq.t.=.>")),
    ("a//+", ("bmq.t.a.=.*",)),
    ("/", ("bmq.t.=.=",)),
    ("$SYS/#", ("bmq.t.=24SYS", "bmq.t.=24SYS.>")),
    ("$share/g/a", ("bmq.t.=24share.g.a",)),
    ("a b/+/=", ("bmq.t.a=20b.*.=3D",)),
    ("*/>", ("bmq.t.=2A.=3E",)),  # NATS wildcards in a filter are literal
    ("é/#", ("bmq.t.=C3=A9", "bmq.t.=C3=A9.>")),
])
def test_filter_to_subjects(topic_filter, subjects):
    assert filter_to_subjects("bmq.t", topic_filter) == subjects


def test_the_test_nats_matcher():
    assert nats_matches("a.b", "a.b")
    assert not nats_matches("a.b", "a.b.c")
    assert not nats_matches("a.b.c", "a.b")
    assert nats_matches("a.*", "a.b")
    assert not nats_matches("a.*", "a")
    assert not nats_matches("a.*", "a.b.c")
    assert nats_matches("a.>", "a.b")
    assert nats_matches("a.>", "a.b.c")
    assert not nats_matches("a.>", "a")
    assert nats_matches("*.>", "a.b")
    assert not nats_matches("*.>", "a")


# ---------------------------------------------------------------- properties

#: Every legal topic name: non-empty, no U+0000, no wildcard (4.7, 1.5.4);
#: hypothesis's text leaves out lone surrogates, which UTF-8 cannot encode.
LEGAL_TOPICS = st.text(
    alphabet=st.one_of(
        st.sampled_from("/////aZ09_-=.$*> \t\u00e9\u20ac\U0001f600"),
        st.characters(exclude_characters="\x00+#", exclude_categories=("Cs",)),
    ),
    min_size=1,
)


@PROPERTY_TEST
@given(LEGAL_TOPICS)
def test_every_legal_topic_round_trips(topic):
    subject = topic_to_subject("bmq.t", topic)
    assert subject.startswith("bmq.t.")
    assert TOKENS.fullmatch(subject.removeprefix("bmq.t.")), subject
    assert subject_to_topic("bmq.t", subject) == topic
    key = topic_to_key(topic)
    assert subject == "bmq.t." + key  # the subject's fast path agrees with the rule
    assert_valid_key(key)
    assert key_to_topic(key) == topic
    assert len(key.split(".")) == len(topic.split("/"))


@PROPERTY_TEST
@given(st.text(alphabet="aZ_=.-0189AF", max_size=12))
def test_decoding_accepts_only_what_encoding_makes(tokens):
    # Whatever a peer or a stored key holds: either the one spelling of a
    # topic, or a ValueError.
    try:
        topic = key_to_topic(tokens)
    except ValueError:
        return
    assert topic_to_key(topic) == tokens
    assert subject_to_topic("bmq.t", "bmq.t." + tokens) == topic


#: Levels that collide often and need escaping: empty, '$' first, the NATS
#: separator and wildcards, the escape character, non-ASCII.
MATCH_LEVELS = st.sampled_from(["a", "b", "", "$s", "a$", "a.b", "*", ">", "=", "=3D", " ", "\u00e9"])


@PROPERTY_TEST
@given(mqtt_strategies.topic_filters(MATCH_LEVELS), mqtt_strategies.topic_names(MATCH_LEVELS))
def test_nats_matching_agrees_with_mqtt_matching(topic_filter, topic):
    subject = topic_to_subject("bmq.t", topic)
    matching = [pattern for pattern in filter_to_subjects("bmq.t", topic_filter)
                if nats_matches(pattern, subject)]
    assert len(matching) <= 1  # a filter's subjects never deliver a message twice
    if filter_matches(topic_filter, topic):
        assert matching
    elif matching:
        # NATS knows nothing of [MQTT-4.7.2-1]: a filter starting with a
        # wildcard over-matches a topic starting with '$', and the receiving
        # node's own matching drops it.
        assert topic.startswith("$") and topic_filter[0] in "+#"
