"""What a client sends costs the log a bounded amount: client-supplied strings
are cut and escaped, a packet makes at most one refusal line, and repeated
refusals from one client are summed up rather than written one by one."""

from __future__ import annotations

import logging

import pytest

from bastionmq.broker.codec import MQTT_5, Publish, Subscribe, Subscription
from bastionmq.broker.logtext import shown
from cluster_switch import on_every_node

DENY_ALL = "{deny, all}.\n"


def _broker_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name.startswith("bastionmq")]


def _settle(broker, client) -> None:
    """Wait until the broker has handled what the client sent before."""
    client.send(Subscribe(999, [Subscription("settle", 0)]))
    while getattr(client.receive(), "packet_id", None) != 999:
        pass


@pytest.fixture
def logged(caplog):
    caplog.set_level(logging.INFO, logger="bastionmq")
    return caplog


def test_a_subscribe_of_2000_invalid_filters_makes_one_short_line(start_broker, raw_clients,
                                                                   logged):
    broker = start_broker()
    client = raw_clients(broker.port, MQTT_5)
    client.connect("many-filters")
    logged.clear()
    filters = [Subscription(f"a/#/{n}", 0) for n in range(2000)]
    client.send(Subscribe(1, filters))
    suback = client.receive()
    assert suback.reason_codes == [0x8F] * 2000
    assert suback.properties["reason_string"].endswith("and 1999 more filters")
    lines = [line for line in _broker_lines(logged) if "many-filters" in line]
    assert len(lines) == 1
    assert len(lines[0]) < 300


def test_repeated_refusals_are_summed_up(start_broker, raw_clients, logged, tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text(DENY_ALL)
    broker = start_broker(f'authorization {{ sources = [ {{ type = file, path = "{acl}" }} ] }}')
    client = raw_clients(broker.port, MQTT_5)
    client.connect("denied")
    logged.clear()
    # 1,000 small publishes through a topic alias, each refused.
    client.send(Publish("t/" + "x" * 5000, b"1", qos=0, properties={"topic_alias": 1}))
    for _ in range(999):
        client.send(Publish("", b"1", qos=0, properties={"topic_alias": 1}))
    _settle(broker, client)
    lines = [line for line in _broker_lines(logged) if "denied" in line]
    assert len(lines) == 1 and "not authorized to publish" in lines[0]
    assert "(5002 characters)" in lines[0] and len(lines[0]) < 300
    assert sum(on_every_node(broker, lambda node: node.core.stats.publish_denied)) == 1000


def test_long_filters_and_client_ids_are_cut_in_the_log(start_broker, raw_clients, logged):
    broker = start_broker("mqtt.max_clientid_len = 65535")
    client = raw_clients(broker.port, MQTT_5)
    client_id = "c" * 60000
    client.connect(client_id)
    logged.clear()
    for n in range(20):
        client.send(Subscribe(n + 1, [Subscription("f" * 65000 + "/#/x", 0)]))
        client.receive()
    text = "\n".join(_broker_lines(logged))
    assert len(text) < 1000
    assert shown(client_id) in text


def test_shown_escapes_control_characters_and_notes_the_length():
    assert shown("ok") == "'ok'"
    assert shown("evil\nINFO forged line") == "'evil\\nINFO forged line'"
    assert shown("x" * 150) == f"'{'x' * 100}'... (150 characters)"
    assert shown(None) == "None"
