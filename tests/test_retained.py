"""The retained-message store: one message per topic, found by subscription filters."""

from __future__ import annotations

import pytest
import mqtt_strategies
from hypothesis import given, settings
from hypothesis import strategies as st

from bastionmq.broker.retained import RetainedStore
from bastionmq.broker.topics import filter_matches

PROPERTY_TEST = settings(deadline=None, max_examples=300)


def store_of(*topics: str) -> RetainedStore:
    """A store whose message for each topic is the topic itself."""
    store = RetainedStore()
    for topic in topics:
        store.set(topic, topic)
    return store


def test_set_get_replace_delete():
    store = RetainedStore()
    assert len(store) == 0
    assert store.get("a/b") is None
    store.set("a/b", "first")
    assert store.get("a/b") == "first"
    assert len(store) == 1
    store.set("a/b", "second")
    assert store.get("a/b") == "second"
    assert len(store) == 1
    assert store.delete("a/b") is True
    assert store.get("a/b") is None
    assert len(store) == 0
    assert store.delete("a/b") is False


def test_levels_above_and_below_a_message_hold_nothing():
    store = store_of("a/b")
    assert store.get("a") is None
    assert store.get("a/b/c") is None
    assert store.get("a/b/") is None
    assert store.delete("a") is False
    assert store.delete("a/b/c") is False
    assert len(store) == 1


def test_parent_and_child_topics_are_independent():
    store = store_of("a", "a/b")
    assert store.delete("a") is True
    assert store.get("a/b") == "a/b"
    assert store.match("a/#") == ["a/b"]
    store.set("a", "a")
    assert store.delete("a/b") is True
    assert store.get("a") == "a"
    assert store.match("a/#") == ["a"]


def test_delete_prunes_empty_levels():
    store = store_of("a/b/c/d", "a", "x//y")
    assert store.delete("a/b/c/d")
    assert list(store._root.children) == ["a", "x"]
    assert store._root.children["a"].children == {}
    assert store.delete("x//y")
    assert store.delete("a")
    assert store._root.children == {}


def test_iteration_yields_every_message():
    topics = ["a", "a/b", "/", "/a", "a//b", "$SYS/x", "b/c/d"]
    assert sorted(store_of(*topics)) == sorted(topics)


TOPICS = ["sport", "sport/", "sport/tennis", "sport/tennis/player1",
          "sport/tennis/player1/ranking", "sport/golf", "/finance", "/", "a//b", "a/b",
          "$SYS", "$SYS/monitor/Clients", "$SYS/broker", "x/$SYS"]


@pytest.mark.parametrize("topic_filter, expected", [
    ("sport/tennis/player1", ["sport/tennis/player1"]),
    ("sport/tennis/player1/#", ["sport/tennis/player1", "sport/tennis/player1/ranking"]),
    ("sport/#", ["sport", "sport/", "sport/golf", "sport/tennis", "sport/tennis/player1",
                 "sport/tennis/player1/ranking"]),
    ("sport/+", ["sport/", "sport/golf", "sport/tennis"]),
    ("sport/+/player1", ["sport/tennis/player1"]),
    ("+", ["sport"]),
    ("+/+", ["/", "/finance", "a/b", "sport/", "sport/golf", "sport/tennis", "x/$SYS"]),
    ("/+", ["/", "/finance"]),
    ("+/", ["/", "sport/"]),
    ("a/+/b", ["a//b"]),
    ("a//b", ["a//b"]),
    ("+/#", [t for t in TOPICS if not t.startswith("$")]),
    # '$' topics are not matched by a wildcard in the first level [MQTT-4.7.2-1].
    ("#", [t for t in TOPICS if not t.startswith("$")]),
    ("+/monitor/Clients", []),
    ("$SYS/#", ["$SYS", "$SYS/broker", "$SYS/monitor/Clients"]),
    ("$SYS/+", ["$SYS/broker"]),
    ("$SYS/monitor/+", ["$SYS/monitor/Clients"]),
    ("$SYS", ["$SYS"]),
    ("nothing/#", []),
    ("sport/tennis/player1/ranking/#", ["sport/tennis/player1/ranking"]),
])
def test_match(topic_filter, expected):
    store = store_of(*TOPICS)
    assert sorted(store.match(topic_filter)) == sorted(expected)
    # The brute-force answer agrees with the expectation written above.
    assert sorted(t for t in TOPICS if filter_matches(topic_filter, t)) == sorted(expected)


def test_match_after_delete():
    store = store_of("a/b", "a/c")
    store.delete("a/b")
    assert store.match("a/+") == ["a/c"]
    assert store.match("#") == ["a/c"]


# ---------------------------------------------------------------- against brute force

topic_names = mqtt_strategies.topic_names()
topic_filters = mqtt_strategies.topic_filters()


operations = st.lists(st.one_of(
    st.tuples(st.just("set"), topic_names, st.integers(0, 3)),
    st.tuples(st.just("delete"), topic_names),
), max_size=40)


@PROPERTY_TEST
@given(operations, st.lists(topic_filters, min_size=1, max_size=10))
def test_store_matches_what_brute_force_filter_matching_finds(ops, filters):
    store = RetainedStore()
    model: dict[str, tuple[str, int]] = {}
    for op in ops:
        if op[0] == "set":
            _, topic, version = op
            store.set(topic, (topic, version))
            model[topic] = (topic, version)
        else:
            assert store.delete(op[1]) == (op[1] in model)
            model.pop(op[1], None)
        assert len(store) == len(model)
    for topic_filter in filters:
        expected = sorted(message for topic, message in model.items()
                          if filter_matches(topic_filter, topic))
        assert sorted(store.match(topic_filter)) == expected
    for topic in {name for _, name, *_ in ops}:
        assert store.get(topic) == model.get(topic)
    assert sorted(store) == sorted(model.values())
    for topic in list(model):
        assert store.delete(topic)
    assert store._root.children == {}
    assert len(store) == 0


def test_retained_user_properties_are_kept_at_their_wire_size(broker, raw_clients):
    import sys

    from bastionmq.broker.codec import (
        MQTT_5, Publish, Subscribe, Subscription, WireProperties, encode_properties,
    )
    pairs = [(f"key-{n}", f"value-{n}") for n in range(100)]
    publisher = raw_clients(broker.port, MQTT_5)
    publisher.connect("pub")
    publisher.send(Publish("kept", b"x", qos=1, retain=True, packet_id=1,
                           properties={"user_property": pairs}))
    publisher.receive()
    kept = broker.run(lambda: broker.core.retained.get("kept"))
    assert isinstance(kept.properties, WireProperties)
    wire = len(encode_properties({"user_property": pairs}))
    assert sys.getsizeof(kept.properties.wire) < wire + 64
    # Delivered unchanged, with the order of the pairs kept.
    reader = raw_clients(broker.port, MQTT_5)
    reader.connect("reader")
    reader.send(Subscribe(1, [Subscription("kept", 1)], properties={"subscription_identifier": 7}))
    reader.receive()
    message = reader.receive()
    assert message.properties["user_property"] == pairs
    assert message.properties["subscription_identifier"] == [7]
