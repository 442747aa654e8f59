"""$SYS topics: the broker's figures for a monitoring client, hidden from '#'."""

from __future__ import annotations

import pytest

from bastionmq import __version__
from bastionmq.broker.codec import MQTT_3_1_1, MQTT_5, Publish


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
    assert broker.run(lambda: broker.core.stats.publish_denied) == 2
