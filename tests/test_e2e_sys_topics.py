"""$SYS topics: the broker's figures for a monitoring client, hidden from
'#', under the names and in the forms Debian's Mosquitto publishes them."""

from __future__ import annotations

import queue
from typing import Callable

import pytest

from bastionmq import __version__
from bastionmq.broker.codec import MQTT_3_1_1, MQTT_5, Publish

from cluster_switch import on_every_node
from mosquitto_peer import running_mosquitto

TIMEOUT = 10.0


def _figures(client, count):
    return {m.topic.removeprefix("$SYS/broker/"): m.payload.decode() for m in client.expect(count)}


@pytest.mark.one_node("$SYS figures are one node's")
def test_sys_topics_are_retained_and_reflect_the_broker(start_broker, clients):
    broker = start_broker("sys_topics.sys_interval = 100ms")
    pub = clients(broker.port, client_id="pub")
    pub.publish("work/item", b"x", qos=1, retain=True)
    monitor = clients(broker.port, client_id="monitor")
    # Retained, so the latest figures arrive at once on subscribe.
    monitor.subscribe("$SYS/broker/version", qos=0)
    assert _figures(monitor, 1) == {"version": f"bastionmq {__version__}"}
    monitor.subscribe("$SYS/broker/retained messages/count", qos=0)
    monitor.subscribe("$SYS/broker/clients/connected", qos=0)
    monitor.subscribe("$SYS/broker/publish/messages/received", qos=0)
    seen = _figures(monitor, 3)
    # The $SYS figures are retained messages too, and count among them.
    retained = str(broker.run(lambda: len(broker.core.retained)))
    assert broker.run(lambda: broker.core.retained.get("work/item")) is not None
    deadline_checks = 0
    # Each figure is published again when it changes; wait for the values
    # that include both clients and the one publish.
    while (seen.get("clients/connected") != "2" or seen.get("publish/messages/received") != "1"
           or seen.get("retained messages/count") != retained):
        seen.update(_figures(monitor, 1))
        deadline_checks += 1
        assert deadline_checks < 50, seen


def test_sys_topics_do_not_reach_a_hash_subscriber(start_broker, clients):
    broker = start_broker("sys_topics.sys_interval = 100ms")
    everything = clients(broker.port, client_id="everything")
    everything.subscribe("#", qos=1)
    # Several intervals of $SYS publishing pass while these clients connect.
    for index in range(5):
        clients(broker.port, client_id=f"extra-{index}").disconnect()
    everything.expect_nothing_more("marker")


def test_sys_topics_off(start_broker, clients):
    broker = start_broker("sys_topics.sys_interval = 0s")
    monitor = clients(broker.port, client_id="monitor")
    monitor.subscribe("$SYS/#", qos=1)
    monitor.subscribe("marker", qos=1)
    monitor.expect_nothing_more("marker")


@pytest.mark.parametrize("version", [MQTT_5, MQTT_3_1_1])
def test_clients_cannot_write_sys_topics(start_broker, raw_clients, clients, version):
    broker = start_broker("sys_topics.sys_interval = 1h")
    spoofer = raw_clients(broker.port, version)
    spoofer.connect("spoofer")
    spoofer.send(Publish("$SYS/broker/version", b"evil 6.6.6", qos=1, retain=True, packet_id=1))
    # 5.0: refused with 0x87; 3.1.1 has no refusal: acknowledged and dropped.
    assert spoofer.receive().reason_code == (0x87 if version == MQTT_5 else 0)
    spoofer.send(Publish("$SYS/broker/uptime", b"forever", qos=0, retain=True))
    monitor = clients(broker.port, client_id="monitor")
    monitor.subscribe("$SYS/broker/version")
    monitor.subscribe("$SYS/broker/uptime")
    seen = _figures(monitor, 2)
    assert seen["version"] == f"bastionmq {__version__}"
    assert seen["uptime"] != "forever"
    assert sum(on_every_node(broker, lambda node: node.core.stats.publish_denied)) == 2


def _sys_tree(monitor, done: Callable[[dict[str, str]], bool] = lambda seen: True
              ) -> dict[str, str]:
    """Every $SYS topic ``monitor`` (connected, nothing subscribed) is sent,
    with its latest value: the retained ones, which arrive before a marker
    published after the subscription, and then more until ``done`` says
    enough."""
    monitor.subscribe("$SYS/#")
    monitor.subscribe("marker")
    monitor.publish("marker", b"end", qos=1)
    seen: dict[str, str] = {}
    marked = False
    while not (marked and done(seen)):
        try:
            message = monitor.messages.get(timeout=TIMEOUT)
        except queue.Empty:
            pytest.fail(f"waited {TIMEOUT}s for more $SYS topics; have {sorted(seen)}")
        if message.topic == "marker":
            marked = True
        else:
            seen[message.topic] = message.payload.decode()
    return seen


def test_every_topic_mosquitto_publishes_is_published_too(start_broker, clients, tmp_path):
    with running_mosquitto(tmp_path, "allow_anonymous true\nsys_interval 1\n") as port:
        # Mosquitto publishes clients/maximum only once a client has raised
        # it: at its first interval after this one connected.
        mosquitto = _sys_tree(clients(port, client_id="monitor"),
                              lambda seen: "$SYS/broker/clients/maximum" in seen)
    broker = start_broker("sys_topics.sys_interval = 1h")
    ours = _sys_tree(clients(broker.port, client_id="monitor"))
    assert len(mosquitto) >= 50  # Mosquitto 2.0 publishes 53 (heap/* where it tracks memory)
    assert sorted(set(mosquitto) - set(ours)) == []
    # Values in Mosquitto's forms: "N seconds", integers, loads as "%.2f".
    for topic, value in mosquitto.items():
        if topic.startswith("$SYS/broker/load/"):
            assert ours[topic] == "0.00" and value.count(".") == 1 and len(value.split(".")[1]) == 2
        elif topic == "$SYS/broker/uptime":
            assert ours[topic].endswith(" seconds") and int(ours[topic].split()[0]) >= 0
        elif topic != "$SYS/broker/version":
            assert value.isdigit() and ours[topic].isdigit(), (topic, value, ours[topic])
    # bastionmq's own figures stay beside them.
    assert ours["$SYS/broker/messages/dropped/queue_full"] == "0"


def _until(monitor, wanted: Callable[[dict[str, str]], bool], seen: dict[str, str]) -> None:
    """Read ``monitor``'s $SYS figures into ``seen`` until ``wanted`` holds."""
    for _ in range(200):
        if wanted(seen):
            return
        seen.update(_figures(monitor, 1))
    pytest.fail(f"the figures never got there: {seen}")


@pytest.mark.one_node("$SYS figures are one node's")
def test_clients_maximum_stays_at_the_most_clients_held(start_broker, clients):
    broker = start_broker("sys_topics.sys_interval = 100ms")
    monitor = clients(broker.port, client_id="monitor")
    others = [clients(broker.port, client_id=f"c{index}") for index in range(3)]
    for client in others[1:]:
        client.disconnect()
    for topic in ("clients/maximum", "clients/total", "clients/active", "clients/inactive"):
        monitor.subscribe(f"$SYS/broker/{topic}")
    seen = _figures(monitor, 4)
    # The monitor and three others at most; two left (clean sessions end).
    expected = {"clients/total": "2", "clients/maximum": "4", "clients/active": "2",
                "clients/inactive": "0"}
    _until(monitor, lambda seen: seen == expected, seen)


@pytest.mark.one_node("$SYS figures are one node's")
def test_publish_bytes_received_grow_by_the_payloads(start_broker, clients):
    broker = start_broker("sys_topics.sys_interval = 100ms")
    monitor = clients(broker.port, client_id="monitor")
    monitor.subscribe("$SYS/broker/publish/bytes/received")
    monitor.subscribe("$SYS/broker/publish/messages/received")
    seen = _figures(monitor, 2)
    assert seen == {"publish/bytes/received": "0", "publish/messages/received": "0"}
    publisher = clients(broker.port, client_id="publisher")
    for size, qos in ((10, 0), (200, 1), (3000, 2)):
        publisher.publish("data/x", b"p" * size, qos=qos)
    _until(monitor, lambda seen: seen["publish/messages/received"] == "3", seen)
    _until(monitor, lambda seen: seen["publish/bytes/received"] == "3210", seen)


@pytest.mark.one_node("$SYS figures are one node's")
def test_load_averages_rise_with_traffic(start_broker, clients):
    broker = start_broker("sys_topics.sys_interval = 100ms")
    monitor = clients(broker.port, client_id="monitor")
    loads = [f"load/{name}/{minutes}min"
             for name in ("publish/received", "messages/received", "bytes/received",
                          "connections", "sockets")
             for minutes in (1, 5, 15)]
    for topic in loads:
        monitor.subscribe(f"$SYS/broker/{topic}")
    seen = _figures(monitor, len(loads))
    publisher = clients(broker.port, client_id="publisher")
    for index in range(20):
        publisher.publish("data/x", b"payload", qos=1)
    _until(monitor, lambda seen: all(float(seen[topic]) > 0 for topic in loads), seen)
    # Each average is the decayed rate per minute: the shorter its window,
    # the faster it follows a burst.
    for name in ("publish/received", "connections"):
        one, five, fifteen = (float(seen[f"load/{name}/{minutes}min"]) for minutes in (1, 5, 15))
        assert one >= five >= fifteen > 0


def test_heap_and_store_figures(start_broker, clients):
    broker = start_broker("sys_topics.sys_interval = 100ms")
    publisher = clients(broker.port, client_id="publisher")
    publisher.publish("kept/a", b"x" * 100, qos=1, retain=True)
    monitor = clients(broker.port, client_id="monitor")
    for topic in ("heap/current", "heap/maximum", "store/messages/count",
                  "store/messages/bytes", "messages/stored"):
        monitor.subscribe(f"$SYS/broker/{topic}")
    seen = _figures(monitor, 5)
    assert 0 < int(seen["heap/current"]) <= int(seen["heap/maximum"])
    # The retained messages are stored messages ($SYS figures among them).
    retained = broker.run(lambda: len(broker.core.retained))
    _until(monitor, lambda seen: seen["messages/stored"] == str(retained)
           and int(seen["store/messages/bytes"]) > 100, seen)
    assert seen["store/messages/count"] == seen["messages/stored"]


@pytest.mark.one_node("$SYS figures are one node's")
def test_publish_bytes_sent_count_every_delivery_on_every_path(start_broker, clients):
    """Routed live at QoS 0 and 1, retained on subscribe, queued then drained."""
    broker = start_broker("sys_topics.sys_interval = 0s")
    sent = lambda: broker.run(lambda: broker.core.stats.publish_bytes_sent)  # noqa: E731
    live0 = clients(broker.port, client_id="live0")
    live0.subscribe("data/#", qos=0)
    live1 = clients(broker.port, client_id="live1")
    live1.subscribe("data/#", qos=1)
    away = clients(broker.port, client_id="away", clean=False)
    away.subscribe("data/#", qos=1)
    away.disconnect()
    publisher = clients(broker.port, client_id="publisher")
    publisher.publish("data/a", b"x" * 100, qos=1, retain=True)
    live0.expect()
    live1.expect()
    assert sent() == 200  # the offline session's copy waits in its queue
    late = clients(broker.port, client_id="late")
    late.subscribe("data/#", qos=0)
    late.expect()
    assert sent() == 300  # the retained message, on subscribe
    away = clients(broker.port, client_id="away", clean=False)
    away.expect()
    assert sent() == 400  # the queued one, drained
