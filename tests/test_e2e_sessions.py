"""Sessions, client identifiers, takeover and wills, over real sockets."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import (
    MQTT_5, Connack, Pingreq, Pingresp, Puback, Publish, Pubrec, Pubrel, Pubcomp,
    Subscribe, Subscription, Will,
)


@pytest.mark.parametrize("version", [paho.MQTTv311, paho.MQTTv5], ids=["3.1.1", "5.0"])
def test_persistent_session_keeps_subscriptions_and_queues_messages(broker, clients, version):
    persistent = dict(client_id="keeper", version=version, clean=False, session_expiry=3600)
    if version != paho.MQTTv5:
        del persistent["session_expiry"]
    sub = clients(broker.port, **persistent)
    assert not sub.session_present
    sub.subscribe("news/#", qos=2)
    sub.disconnect()
    pub = clients(broker.port, client_id="pub", version=version)
    for qos in (0, 1, 2):
        pub.publish(f"news/{qos}", f"offline {qos}".encode(), qos=qos)
    again = clients(broker.port, **persistent)
    assert again.session_present
    got = again.expect(3)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("news/0", b"offline 0", 0), ("news/1", b"offline 1", 1), ("news/2", b"offline 2", 2)]
    # The subscription itself survived too.
    pub.publish("news/live", b"live", qos=1)
    assert again.expect(1)[0].payload == b"live"


def test_clean_session_discards_the_old_session(broker, clients):
    sub = clients(broker.port, client_id="c", clean=False)
    sub.subscribe("t", qos=1)
    sub.disconnect()
    fresh = clients(broker.port, client_id="c", clean=True)
    assert not fresh.session_present
    fresh.subscribe("marker", qos=1)
    pub = clients(broker.port, client_id="pub")
    pub.publish("t", b"not for a clean session", qos=1)
    fresh.expect_nothing_more("marker")


def test_5_session_with_expiry_0_ends_with_the_connection(broker, clients):
    sub = clients(broker.port, client_id="short", version=paho.MQTTv5, clean=False,
                  session_expiry=0)
    sub.subscribe("t", qos=1)
    sub.disconnect()
    again = clients(broker.port, client_id="short", version=paho.MQTTv5, clean=False,
                    session_expiry=0)
    assert not again.session_present


def test_unacknowledged_message_is_resent_with_dup_on_reconnect(broker, clients, raw_clients):
    raw = raw_clients(broker.port)
    assert raw.connect("slow", clean_start=False) == Connack(0, False)
    raw.send(Subscribe(1, [Subscription("q", 1)]))
    assert raw.receive().reason_codes == [1]
    pub = clients(broker.port, client_id="pub")
    pub.publish("q", b"must arrive", qos=1)
    first = raw.receive()
    assert (first.payload, first.qos, first.dup) == (b"must arrive", 1, False)
    raw.close()  # gone without acknowledging
    again = raw_clients(broker.port)
    assert again.connect("slow", clean_start=False) == Connack(0, True)
    resent = again.receive()
    assert (resent.payload, resent.qos, resent.dup, resent.packet_id) == \
        (b"must arrive", 1, True, first.packet_id)
    again.send(Puback(resent.packet_id))
    # Acknowledged now (the PINGRESP after it says the broker read it, before
    # the session may move to another node): a third connection gets nothing resent.
    again.send(Pingreq())
    assert isinstance(again.receive(), Pingresp)
    again.close()
    third = raw_clients(broker.port)
    assert third.connect("slow", clean_start=False) == Connack(0, True)
    third.send(Subscribe(2, [Subscription("marker", 1)]))
    assert third.receive().packet_id == 2
    pub.publish("marker", b"m", qos=1)
    assert third.receive().topic == "marker"


def test_qos2_exchange_resumes_at_pubrel_after_reconnect(broker, clients, raw_clients):
    raw = raw_clients(broker.port)
    raw.connect("q2", clean_start=False)
    raw.send(Subscribe(1, [Subscription("x", 2)]))
    raw.receive()
    pub = clients(broker.port, client_id="pub")
    pub.publish("x", b"exactly once", qos=2)
    message = raw.receive()
    raw.send(Pubrec(message.packet_id))
    assert raw.receive() == Pubrel(message.packet_id)
    raw.close()  # PUBCOMP never sent
    again = raw_clients(broker.port)
    assert again.connect("q2", clean_start=False).session_present
    # Only PUBREL is resent: the message itself must not be delivered twice.
    assert again.receive() == Pubrel(message.packet_id)
    again.send(Pubcomp(message.packet_id))


def test_inbound_qos2_duplicate_is_not_delivered_twice(broker, clients, raw_clients):
    sub = clients(broker.port, client_id="sub")
    sub.subscribe("once", qos=2)
    sub.subscribe("marker", qos=1)
    raw = raw_clients(broker.port)
    raw.connect("sender")
    raw.send(Publish("once", b"one", qos=2, packet_id=7))
    assert raw.receive() == Pubrec(7)
    raw.send(Publish("once", b"one", qos=2, packet_id=7, dup=True))
    assert raw.receive() == Pubrec(7)
    raw.send(Pubrel(7))
    assert raw.receive() == Pubcomp(7)
    assert sub.expect(1)[0].payload == b"one"
    sub.expect_nothing_more("marker")


@pytest.mark.one_node("looks at the sessions of one node")
def test_offline_queue_is_bounded_and_drops_the_oldest(start_broker, clients):
    broker = start_broker("mqtt.max_mqueue_len = 3")
    sub = clients(broker.port, client_id="q", clean=False)
    sub.subscribe("burst", qos=1)
    sub.disconnect()
    pub = clients(broker.port, client_id="pub")
    for index in range(5):
        pub.publish("burst", str(index).encode(), qos=1)
    again = clients(broker.port, client_id="q", clean=False)
    assert [m.payload for m in again.expect(3)] == [b"2", b"3", b"4"]
    assert broker.run(lambda: broker.core.stats.dropped_queue_full) == 2


@pytest.mark.one_node("looks at the sessions of one node")
def test_inflight_window_holds_back_the_rest(start_broker, clients, raw_clients):
    broker = start_broker("mqtt.max_inflight = 2")
    raw = raw_clients(broker.port)
    raw.connect("window")
    raw.send(Subscribe(1, [Subscription("w", 1)]))
    raw.receive()
    pub = clients(broker.port, client_id="pub")
    for index in range(4):
        pub.publish("w", str(index).encode(), qos=1)
    first, second = raw.receive(), raw.receive()
    assert [first.payload, second.payload] == [b"0", b"1"]
    assert broker.run(lambda: len(broker.core.sessions["window"].queue)) == 2
    raw.send(Puback(first.packet_id))
    assert raw.receive().payload == b"2"
    raw.send(Puback(second.packet_id))
    assert raw.receive().payload == b"3"


def test_empty_client_id(broker, raw_clients):
    v5 = raw_clients(broker.port, MQTT_5)
    connack = v5.connect("")
    assert connack.reason_code == 0
    assert connack.properties["assigned_client_identifier"].startswith("bastionmq-")
    v3 = raw_clients(broker.port)
    assert v3.connect("").reason_code == 0
    # [MQTT-3.1.3-8]: without a clean session, an empty id is refused (return code 2).
    refused = raw_clients(broker.port)
    assert refused.connect("", clean_start=False) == Connack(2)
    assert refused.receive_until_closed() == []


def test_client_id_longer_than_allowed(start_broker, raw_clients):
    broker = start_broker("mqtt.max_clientid_len = 23")
    v5 = raw_clients(broker.port, MQTT_5)
    assert v5.connect("x" * 24).reason_code == 0x85
    v3 = raw_clients(broker.port)
    assert v3.connect("x" * 24).reason_code == 2


def test_takeover_closes_the_first_connection(broker, raw_clients):
    first = raw_clients(broker.port, MQTT_5)
    first.connect("same")
    second = raw_clients(broker.port, MQTT_5)
    assert second.connect("same").reason_code == 0
    assert first.closing_reasons() == [0x8E]
    v3_first = raw_clients(broker.port)
    v3_first.connect("same3")
    raw_clients(broker.port).connect("same3")
    assert v3_first.receive_until_closed() == []


@pytest.mark.parametrize("version", [paho.MQTTv311, paho.MQTTv5], ids=["3.1.1", "5.0"])
def test_will_is_sent_when_the_connection_is_lost(broker, clients, version):
    watcher = clients(broker.port, client_id="watcher", version=version)
    watcher.subscribe("wills/#", qos=1)
    dying = clients(broker.port, client_id="dying", version=version,
                    will=("wills/dying", b"gone", 1, False))
    dying.stop_network()
    message = watcher.expect(1)[0]
    assert (message.topic, message.payload, message.qos) == ("wills/dying", b"gone", 1)


def test_will_is_not_sent_after_disconnect(broker, clients):
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("wills/#", qos=1)
    polite = clients(broker.port, client_id="polite", will=("wills/polite", b"gone", 1, False))
    polite.disconnect()
    watcher.expect_nothing_more("wills/marker")


def test_will_with_retain_is_retained(broker, clients):
    dying = clients(broker.port, client_id="dying", will=("status/dying", b"offline", 1, True))
    dying.stop_network()
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("status/+", qos=1)
    message = watcher.expect(1)[0]
    assert (message.payload, message.retain) == (b"offline", True)


def test_will_is_sent_on_protocol_error(broker, clients, raw_clients):
    watcher = clients(broker.port, client_id="watcher")
    watcher.subscribe("wills/#", qos=1)
    raw = raw_clients(broker.port)
    raw.connect("bad", will=Will("wills/bad", b"broke the rules", 0))
    raw.send(b"\x30\x05\x00\x01#xy")  # wildcard in a PUBLISH topic
    raw.receive_until_closed()
    assert watcher.expect(1)[0].payload == b"broke the rules"


def test_will_is_sent_on_keepalive_timeout(broker, clients, raw_clients):
    watcher = clients(broker.port, client_id="watcher", version=paho.MQTTv5)
    watcher.subscribe("wills/#", qos=1)
    raw = raw_clients(broker.port, MQTT_5)
    raw.connect("sleepy", keepalive=1, will=Will("wills/sleepy", b"timed out", 0))
    # Silent past 1.5 x keepalive: DISCONNECT 0x8D, then the connection closes.
    assert raw.closing_reasons() == [0x8D]
    assert watcher.expect(1)[0].payload == b"timed out"


def test_pingreq_keeps_the_connection_alive(broker, raw_clients):
    from bastionmq.broker.codec import Pingreq, Pingresp
    raw = raw_clients(broker.port)
    raw.connect("pinger", keepalive=60)
    raw.send(Pingreq())
    assert raw.receive() == Pingresp()
