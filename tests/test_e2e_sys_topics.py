"""$SYS topics: the broker's figures for a monitoring client, hidden from '#'."""

from __future__ import annotations

from bastionmq import __version__


def _figures(client, count):
    return {m.topic.removeprefix("$SYS/broker/"): m.payload.decode() for m in client.expect(count)}


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
    monitor.subscribe("$SYS/broker/messages/received", qos=0)
    seen = _figures(monitor, 3)
    # The $SYS figures are retained messages too, and count among them.
    retained = str(broker.run(lambda: len(broker.core.retained)))
    assert broker.run(lambda: broker.core.retained.get("work/item")) is not None
    deadline_checks = 0
    # Each figure is published again when it changes; wait for the values
    # that include both clients and the one publish.
    while (seen.get("clients/connected") != "2" or seen.get("messages/received") != "1"
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
