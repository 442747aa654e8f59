"""Topic names and filters (4.7 of MQTT 3.1.1 and 5.0) and the subscription trie."""

from __future__ import annotations

import pytest
import mqtt_strategies
from hypothesis import given, settings
from hypothesis import strategies as st

from bastionmq.broker import topics
from bastionmq.broker.topics import (
    InvalidTopic, SubscriptionTrie, filter_covers, filter_matches, validate_filter, validate_topic_name,
)

PROPERTY_TEST = settings(deadline=None, max_examples=300)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("topic_filter", [
    "#", "+", "a", "a/b", "a/#", "+/+", "+/#", "/", "//", "/#", "/+", "a//b", "a/+/b",
    "sport/tennis/+", "sport/tennis/player1/#", "$SYS/#", "$SYS/+/x", "$share/g/a/#",
    " ", "a b/c d", "é/ü", "\ufeff",
])
def test_valid_filters(topic_filter):
    validate_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", [
    "",  # [MQTT-4.7.3-1]: at least one character
    "a#", "#a", "a/#/b", "#/a", "##", "a/b#", "sport/tennis#", "#/#",  # [MQTT-4.7.1-2]
    "a+", "+a", "++", "a/b+/c", "sport+", "+x/y",  # [MQTT-4.7.1-3]
])
def test_invalid_filters(topic_filter):
    with pytest.raises(InvalidTopic):
        validate_filter(topic_filter)


def test_invalid_topic_is_a_value_error():
    with pytest.raises(ValueError):
        validate_filter("a#")


@pytest.mark.parametrize("validate, within", [
    (validate_filter, ["a/b/c", "a/+/#", "//"]),
    (validate_topic_name, ["a/b/c", "//"]),
], ids=["filter", "topic name"])
def test_level_limit(validate, within):
    for topic in within:
        validate(topic, max_levels=3)
    for beyond in ("a/b/c/d", "///"):
        with pytest.raises(InvalidTopic):
            validate(beyond, max_levels=3)


@pytest.mark.parametrize("topic", ["a", "a/b", "/", "/a", "a//b", "$SYS/x", "a b", "é"])
def test_valid_topic_names(topic):
    validate_topic_name(topic)


# ---------------------------------------------------------------- matching one filter

#: (filter, topic, matches), the examples of 4.7.1 and 4.7.2 and their edges.
MATCHES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/#", "sport", True),  # '#' includes the parent level
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("#", "/a", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+", "sport", True),
    ("+", "/finance", False),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/tennis", True),
    ("+/tennis/#", "sport/golf", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a//b", False),
    ("a/b", "a/b/", False),
    ("a/b/", "a/b/", True),
    ("a/+", "a/", True),
    ("/a", "/a", True),
    ("/a", "a", False),
    ("a", "/a", False),
    ("ACCOUNTS", "Accounts", False),  # case-sensitive
    ("a b", "a b", True),
    # '$' topics: no wildcard in the first level matches them [MQTT-4.7.2-1].
    ("#", "$SYS", False),
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("+", "$", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/+/Clients", "$SYS/monitor/Clients", True),
    ("+/+", "a/$b", True),  # '$' later in the topic is ordinary
    ("#", "a$", True),
]


@pytest.mark.parametrize("topic_filter, topic, expected", MATCHES)
def test_filter_matches(topic_filter, topic, expected):
    assert filter_matches(topic_filter, topic) is expected


# ---------------------------------------------------------------- the trie

@pytest.mark.parametrize("topic_filter, topic, expected", MATCHES)
def test_trie_agrees_with_the_examples(topic_filter, topic, expected):
    trie = SubscriptionTrie()
    trie.add(topic_filter, "s", 1)
    assert trie.match(topic) == ([("s", 1)] if expected else [])


def test_add_replace_remove():
    trie = SubscriptionTrie()
    assert len(trie) == 0
    assert trie.add("a/b", "s1", 0) is True
    assert trie.add("a/b", "s2", 1) is True
    assert trie.add("a/b", "s1", 2) is False  # one value per subscriber and filter
    assert len(trie) == 2
    assert sorted(trie.match("a/b")) == [("s1", 2), ("s2", 1)]
    assert trie.remove("a/b", "s1") is True
    assert trie.remove("a/b", "s1") is False
    assert trie.remove("a/c", "s2") is False
    assert trie.remove("a", "s2") is False
    assert trie.remove("a/b/c", "s2") is False
    assert len(trie) == 1
    assert trie.match("a/b") == [("s2", 1)]


def test_one_subscriber_with_several_matching_filters_appears_once_per_filter():
    trie = SubscriptionTrie()
    for topic_filter in ("a/b", "a/+", "#", "a/#", "+/b", "x"):
        trie.add(topic_filter, "s", topic_filter)
    assert sorted(trie.match("a/b")) == sorted(
        [("s", "a/b"), ("s", "a/+"), ("s", "#"), ("s", "a/#"), ("s", "+/b")])


def test_multi_level_wildcard_matches_the_parent_level():
    trie = SubscriptionTrie()
    trie.add("a/#", "s", 0)
    trie.add("a/b/#", "t", 0)
    assert trie.match("a") == [("s", 0)]
    assert sorted(trie.match("a/b")) == [("s", 0), ("t", 0)]
    assert sorted(trie.match("a/b/c/d")) == [("s", 0), ("t", 0)]
    assert trie.match("b") == []


def test_single_level_wildcard_needs_a_level():
    trie = SubscriptionTrie()
    trie.add("a/+", "s", 0)
    assert trie.match("a") == []
    assert trie.match("a/") == [("s", 0)]
    assert trie.match("a/b/c") == []


def test_dollar_topics_and_wildcards():
    trie = SubscriptionTrie()
    trie.add("#", "all", 0)
    trie.add("+/monitor/#", "plus", 0)
    trie.add("$SYS/#", "sys", 0)
    trie.add("$SYS/+/Clients", "sys-plus", 0)
    assert sorted(trie.match("$SYS/monitor/Clients")) == [("sys", 0), ("sys-plus", 0)]
    assert trie.match("$SYS") == [("sys", 0)]
    assert trie.match("$other/monitor") == []
    assert sorted(trie.match("x/monitor")) == [("all", 0), ("plus", 0)]
    assert sorted(trie.match("x/$SYS")) == [("all", 0)]


def test_empty_levels():
    trie = SubscriptionTrie()
    trie.add("/a", "slash-a", 0)
    trie.add("+/a", "plus-a", 0)
    trie.add("a//b", "a-b", 0)
    trie.add("a/+/b", "a-plus-b", 0)
    trie.add("/", "slash", 0)
    assert sorted(trie.match("/a")) == [("plus-a", 0), ("slash-a", 0)]
    assert trie.match("a") == []
    assert sorted(trie.match("a//b")) == [("a-b", 0), ("a-plus-b", 0)]
    assert trie.match("a/b") == []
    assert trie.match("/") == [("slash", 0)]


def test_filters_lists_every_subscription():
    trie = SubscriptionTrie()
    subscriptions = {("#", "s", 1), ("/a", "s", 2), ("a//b", "t", 3), ("/", "t", 4),
                     ("a", "u", 5), ("a/+/#", "u", 6), ("$SYS/#", "v", 7), ("a", "v", 8)}
    for topic_filter, subscriber, value in subscriptions:
        trie.add(topic_filter, subscriber, value)
    assert set(trie.filters()) == subscriptions


def test_remove_prunes_dead_branches():
    trie = SubscriptionTrie()
    trie.add("a/b/c/d", "s", 0)
    trie.add("a", "t", 0)
    trie.add("x//y", "s", 0)
    assert trie.remove("a/b/c/d", "s")
    # "a" keeps its own subscriber but none of the levels below it.
    assert list(trie._root.children) == ["a", "x"]
    assert trie._root.children["a"].children == {}
    assert trie.remove("x//y", "s")
    assert list(trie._root.children) == ["a"]
    assert trie.remove("a", "t")
    assert trie._root.children == {}
    assert len(trie) == 0


def test_remove_keeps_branches_with_other_subscribers():
    trie = SubscriptionTrie()
    trie.add("a/b", "s", 0)
    trie.add("a/b", "t", 0)
    trie.add("a/b/c", "s", 0)
    assert trie.remove("a/b", "s")
    assert trie.match("a/b") == [("t", 0)]
    assert trie.match("a/b/c") == [("s", 0)]
    assert trie.remove("a/b/c", "s")
    assert trie.match("a/b") == [("t", 0)]
    assert trie._root.children["a"].children["b"].children == {}


def test_match_is_cached_until_the_trie_changes():
    trie = SubscriptionTrie()
    trie.add("a/+", "s", 0)
    first = trie.match("a/b")
    assert first == [("s", 0)]
    assert trie.match("a/b") is first  # served from the cache
    trie.add("a/b", "t", 1)
    assert sorted(trie.match("a/b")) == [("s", 0), ("t", 1)]
    trie.add("a/b", "t", 2)  # a replaced value is seen too
    assert sorted(trie.match("a/b")) == [("s", 0), ("t", 2)]
    trie.remove("a/+", "s")
    assert trie.match("a/b") == [("t", 2)]
    trie.remove("a/b", "t")
    assert trie.match("a/b") == []


def test_cache_of_a_topic_without_subscribers_is_invalidated():
    trie = SubscriptionTrie()
    assert trie.match("a/b") == []
    trie.add("#", "s", 0)
    assert trie.match("a/b") == [("s", 0)]


def test_cache_stays_bounded_and_correct(monkeypatch):
    monkeypatch.setattr(topics, "MATCH_CACHE_SIZE", 4)
    trie = SubscriptionTrie()
    trie.add("t/+", "s", 0)
    for round_ in range(3):
        for index in range(10):
            assert trie.match(f"t/{index}") == [("s", 0)]
            assert len(trie._cache) <= 4
    trie.remove("t/+", "s")
    assert all(trie.match(f"t/{index}") == [] for index in range(10))


def test_remove_of_a_subscription_whose_value_is_none():
    # The trie takes any value; None is a value like any other.
    trie = SubscriptionTrie()
    assert trie.add("a", "s", None) is True
    assert trie.match("a") == [("s", None)]
    assert trie.remove("a", "s") is True
    assert len(trie) == 0
    assert trie.match("a") == []


def test_merge_gets_every_raw_match_and_its_result_is_cached():
    calls = []

    def merge(found, topic):
        assert topic == "a/b"
        calls.append(sorted(found))
        best: dict = {}
        for subscriber, qos in found:
            best[subscriber] = max(qos, best.get(subscriber, 0))
        return sorted(best.items())

    trie = SubscriptionTrie(merge=merge)
    trie.add("a/+", "s", 0)
    trie.add("a/b", "s", 2)
    trie.add("#", "t", 1)
    assert trie.match("a/b") == [("s", 2), ("t", 1)]
    assert calls == [[("s", 0), ("s", 2), ("t", 1)]]
    assert trie.match("a/b") == [("s", 2), ("t", 1)]
    assert len(calls) == 1  # cached: merged once per topic
    trie.remove("a/b", "s")
    assert trie.match("a/b") == [("s", 0), ("t", 1)]
    assert len(calls) == 2
    assert not trie.match("$SYS/x")


# ---------------------------------------------------------------- against brute force

topic_names = mqtt_strategies.topic_names()
topic_filters = mqtt_strategies.topic_filters()


subscribers = st.sampled_from(["s1", "s2", "s3"])
operations = st.lists(st.one_of(
    st.tuples(st.just("add"), topic_filters, subscribers, st.integers(0, 2)),
    st.tuples(st.just("remove"), topic_filters, subscribers),
    st.tuples(st.just("match"), topic_names),
), max_size=40)


@PROPERTY_TEST
@given(topic_filters)
def test_generated_filters_are_valid(topic_filter):
    validate_filter(topic_filter)


@PROPERTY_TEST
@given(operations, st.lists(topic_names, max_size=10))
def test_trie_matches_what_brute_force_filter_matching_finds(ops, topics_):
    trie = SubscriptionTrie()
    model: dict[tuple[str, str], int] = {}

    def expected(topic: str) -> list:
        return sorted((subscriber, value) for (topic_filter, subscriber), value in model.items()
                      if filter_matches(topic_filter, topic))

    for op in ops:
        if op[0] == "add":
            _, topic_filter, subscriber, value = op
            assert trie.add(topic_filter, subscriber, value) == ((topic_filter, subscriber)
                                                                 not in model)
            model[topic_filter, subscriber] = value
        elif op[0] == "remove":
            _, topic_filter, subscriber = op
            assert trie.remove(topic_filter, subscriber) == ((topic_filter, subscriber) in model)
            model.pop((topic_filter, subscriber), None)
        else:
            assert sorted(trie.match(op[1])) == expected(op[1])
        assert len(trie) == len(model)
    for topic in topics_:
        assert sorted(trie.match(topic)) == expected(topic)
    assert {(f, s): v for f, s, v in trie.filters()} == model
    for topic_filter, subscriber in list(model):
        trie.remove(topic_filter, subscriber)
    assert trie._root.children == {}


@PROPERTY_TEST
@given(topic_filters, topic_names)
def test_one_filter_in_the_trie_matches_like_filter_matches(topic_filter, topic):
    trie = SubscriptionTrie()
    trie.add(topic_filter, "s", 0)
    assert bool(trie.match(topic)) is filter_matches(topic_filter, topic)


@pytest.mark.parametrize("rule, subscription, covered", [
    ("a/#", "a/b/c", True), ("a/#", "a/+", True), ("a/+", "a/+", True), ("a/+", "a/#", False),
    ("#", "a/#", True), ("+/b", "x/b", True), ("a/b", "a/+", False), ("a/+/c", "a/b/c", True),
    ("a", "a", True), ("#", "$SYS/x", False), ("$SYS/#", "$SYS/x", True), ("a/#", "a", True),
    ("a/+", "a", False), ("a/+/#", "a/x/#", True), ("a/+/#", "+/x/#", False),
])
def test_filter_covers(rule, subscription, covered):
    assert filter_covers(rule, subscription) is covered
