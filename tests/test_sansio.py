"""The protocol core without sockets: these bytes in, these bytes out, and
time that passes when the test says so (tests/sansio.py). Message expiry,
session expiry and will delays are tested here on the manual clock instead
of by waiting; the end-to-end tests cover the same paths over real sockets
where no time has to pass."""

from __future__ import annotations

import pytest

from bastionmq.broker.codec import (
    MQTT_3_1_1, MQTT_5, Connect, Decoder, Disconnect, Pingreq, Puback, Publish, Subscribe,
    Subscription, Will, encode,
)
from bastionmq.broker.connection import PACKETS_PER_TURN
from bastionmq.broker.properties import Reason

from sansio import ManualClock, SansIoBroker

EXPIRING = {"message_expiry_interval": 1}


@pytest.fixture
def broker() -> SansIoBroker:
    return SansIoBroker()


def persistent(broker: SansIoBroker, client_id: str = "keeper", topic_filter: str = "e/#",
               qos: int = 1):
    client = broker.connect(client_id, clean_start=False,
                            properties={"session_expiry_interval": 600})
    client.send(Subscribe(1, [Subscription(topic_filter, qos)]))
    [suback] = client.received()
    assert suback.reason_codes == [qos]
    return client


def reconnect(broker: SansIoBroker, client_id: str = "keeper"):
    client = broker.connect(client_id, clean_start=False,
                            properties={"session_expiry_interval": 600})
    assert client.connack.session_present
    return client


# ------------------------------------------------------------------ the clock itself

def test_the_clock_runs_timers_in_their_order_and_only_when_due():
    clock = ManualClock()
    ran = []
    clock.call_later(2, ran.append, "second")
    clock.call_later(1, ran.append, "first")
    clock.call_later(1.5, ran.append, "cancelled").cancel()
    clock.advance(0.5)
    assert ran == []
    clock.advance(2)
    assert ran == ["first", "second"]
    assert clock.time() == 1002.5


# ------------------------------------------------------------------ bytes in, bytes out

def test_a_3_1_1_connect_is_answered_with_these_four_bytes(broker):
    client = broker.client(MQTT_3_1_1)
    client.send_bytes(b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c")
    assert client.written() == b"\x20\x02\x00\x00"


def test_a_qos_1_publish_is_delivered_before_it_is_acknowledged(broker):
    subscriber = broker.connect("sub", MQTT_3_1_1)
    subscriber.send(Subscribe(1, [Subscription("a/b", 1)]))
    assert subscriber.written() == b"\x90\x03\x00\x01\x01"
    publisher = broker.connect("pub", MQTT_3_1_1)
    publisher.send_bytes(b"\x32\x09\x00\x03a/b\x00\x07hi")
    # Routed first, then acknowledged: the subscriber's copy carries its own packet id.
    assert subscriber.written() == b"\x32\x09\x00\x03a/b\x00\x01hi"
    assert publisher.written() == b"\x40\x02\x00\x07"


def test_a_5_0_publish_nobody_takes_is_acknowledged_with_no_matching_subscribers(broker):
    publisher = broker.connect("pub")
    publisher.send(Publish("nobody/here", b"x", qos=1, packet_id=3))
    assert publisher.written() == b"\x40\x03\x00\x03\x10"


def test_a_malformed_packet_closes_that_connection_only_with_its_reason(broker):
    bystander = broker.connect("bystander")
    bystander.send(Subscribe(1, [Subscription("t", 0)]))
    bystander.received()
    culprit = broker.connect("culprit")
    culprit.send_bytes(b"\x30\x02\x00\x05")  # a topic length beyond the packet
    [disconnect] = culprit.received()
    assert isinstance(disconnect, Disconnect)
    assert disconnect.reason_code == Reason.MALFORMED_PACKET
    assert culprit.transport.closed
    publisher = broker.connect("pub")
    publisher.send(Publish("t", b"still here"))
    assert [p.payload for p in bystander.received()] == [b"still here"]


def test_a_second_connect_is_a_protocol_error(broker):
    client = broker.connect("twice")
    client.send(Connect("twice", MQTT_5))
    [disconnect] = client.received()
    assert disconnect.reason_code == Reason.PROTOCOL_ERROR
    assert disconnect.properties["reason_string"] == "second CONNECT"


def test_everything_one_read_causes_goes_in_one_write(broker):
    subscriber = broker.connect("sub", MQTT_3_1_1)
    subscriber.send(Subscribe(1, [Subscription("t/#", 0)]))
    subscriber.written()
    publisher = broker.connect("pub", MQTT_3_1_1)
    writes = []
    subscriber.transport.write = writes.append
    publisher.send(*(Publish(f"t/{n}", b"x") for n in range(5)))
    assert len(writes) == 1
    assert [p.topic for p in Decoder(MQTT_3_1_1).feed(writes[0])] == [f"t/{n}" for n in range(5)]


# ------------------------------------------------------------------ one client's share of a turn

def flood(count: int, topic: str = "t") -> bytes:
    """``count`` QoS 0 PUBLISH, numbered, as one read brings them."""
    return b"".join(encode(Publish(topic, str(n).encode()), MQTT_3_1_1) for n in range(count))


def numbers(packets) -> list[int]:
    return [int(p.payload) for p in packets if isinstance(p, Publish)]


def test_a_read_of_many_packets_is_handled_over_several_turns_in_order(broker):
    subscriber = broker.connect("sub", MQTT_3_1_1)
    subscriber.send(Subscribe(1, [Subscription("t", 0)]))
    subscriber.received()
    publisher = broker.connect("pub", MQTT_3_1_1)
    other = broker.connect("other", MQTT_3_1_1)
    count = 3 * PACKETS_PER_TURN + 10
    publisher.connection.data_received(flood(count))
    first = numbers(subscriber.received())
    assert 0 < len(first) <= PACKETS_PER_TURN
    assert not publisher.transport.reading  # nothing more is read until the rest is handled
    # Another client is served before the flooding client's next share.
    other.connection.data_received(encode(Publish("t", b"-1"), MQTT_3_1_1))
    assert numbers(subscriber.received()) == [-1]
    broker.clock.run_due()  # the following turns
    assert first + numbers(subscriber.received()) == list(range(count))
    assert publisher.transport.reading


def test_what_waited_for_a_later_turn_is_handled_when_the_client_goes(broker):
    subscriber = broker.connect("sub", MQTT_3_1_1)
    subscriber.send(Subscribe(1, [Subscription("t", 0)]))
    subscriber.received()
    will = Will("wills/w", b"gone", 0)
    publisher = broker.connect("pub", MQTT_3_1_1, will=will)
    watcher = broker.connect("watcher", MQTT_3_1_1)
    watcher.send(Subscribe(1, [Subscription("wills/#", 0)]))
    watcher.received()
    count = 2 * PACKETS_PER_TURN
    # The client sends its messages and a DISCONNECT, and closes before its next turn.
    publisher.connection.data_received(flood(count) + encode(Disconnect(), MQTT_3_1_1))
    publisher.lose()
    assert numbers(subscriber.received()) == list(range(count))
    assert watcher.received() == []  # it said DISCONNECT: no will


def test_the_packets_before_a_malformed_one_are_handled_before_the_close(broker):
    subscriber = broker.connect("sub", MQTT_3_1_1)
    subscriber.send(Subscribe(1, [Subscription("t", 0)]))
    subscriber.received()
    publisher = broker.connect("pub", MQTT_3_1_1)
    count = 2 * PACKETS_PER_TURN
    publisher.connection.data_received(flood(count))
    publisher.connection.data_received(b"\x30\x02\x00\x05")  # a topic length beyond the packet
    assert publisher.transport.closed
    broker.clock.run_due()
    assert numbers(subscriber.received()) == list(range(count))


# ------------------------------------------------------------------ message expiry

def test_queued_message_expires_and_the_rest_arrive_with_reduced_intervals(broker):
    persistent(broker).lose()
    pub = broker.connect("pub")
    pub.send(Publish("e/short", b"gone", qos=1, packet_id=1, properties=EXPIRING),
             Publish("e/long", b"kept", qos=1, packet_id=2,
                     properties={"message_expiry_interval": 100}),
             Publish("e/none", b"kept too", qos=1, packet_id=3))
    assert [ack.packet_id for ack in pub.received()] == [1, 2, 3]
    broker.clock.advance(2.1)
    sub = reconnect(broker)
    first, second = sub.received()
    assert [first.payload, second.payload] == [b"kept", b"kept too"]
    # [MQTT-3.3.2-6]: the interval sent is what is left after the wait.
    assert first.properties["message_expiry_interval"] == 98
    assert "message_expiry_interval" not in second.properties
    assert broker.core.stats.dropped_expired == 1


def test_expired_retained_message_is_not_delivered(broker):
    pub = broker.connect("pub")
    pub.send(Publish("e/retained", b"stale", qos=1, packet_id=1, retain=True, properties=EXPIRING),
             Publish("e/kept", b"fresh", qos=1, packet_id=2, retain=True))
    assert len(pub.received()) == 2
    broker.clock.advance(1.2)
    sub = broker.connect("late")
    sub.send(Subscribe(1, [Subscription("e/#", 1)]))
    suback, message = sub.received()
    assert (message.topic, message.payload) == ("e/kept", b"fresh")
    assert broker.core.retained.get("e/retained") is None


def test_expired_inflight_message_is_not_resent(broker):
    sub = persistent(broker)
    pub = broker.connect("pub")
    pub.send(Publish("e/inflight", b"late", qos=1, packet_id=1, properties=EXPIRING),
             Publish("e/inflight", b"durable", qos=1, packet_id=2))
    assert [m.payload for m in sub.received()] == [b"late", b"durable"]
    sub.lose()  # neither acknowledged
    broker.clock.advance(1.2)
    again = reconnect(broker)
    [resent] = again.received()
    assert (resent.payload, resent.dup) == (b"durable", True)
    again.send(Puback(resent.packet_id))
    pub.send(Publish("e/marker", b"m", qos=1, packet_id=3))
    assert [m.payload for m in again.received()] == [b"m"]


def test_a_message_that_expires_while_its_subscriber_is_away_is_counted_once(broker):
    persistent(broker).lose()
    pub = broker.connect("pub")
    pub.send(Publish("e/x", b"gone", qos=1, packet_id=1, properties=EXPIRING))
    broker.clock.advance(0.9)
    assert broker.core.stats.dropped_expired == 0  # not yet
    broker.clock.advance(0.2)
    reconnect(broker).received()
    assert broker.core.stats.dropped_expired == 1


# ------------------------------------------------------------------ session expiry and wills

def test_a_session_ends_when_its_expiry_interval_has_passed(broker):
    client = broker.connect("brief", clean_start=False, properties={"session_expiry_interval": 5})
    client.send(Subscribe(1, [Subscription("s/#", 1)]))
    client.lose()
    broker.clock.advance(4.9)
    assert "brief" in broker.core.sessions
    broker.clock.advance(0.2)
    assert "brief" not in broker.core.sessions
    again = broker.connect("brief", clean_start=False,
                           properties={"session_expiry_interval": 5})
    assert not again.connack.session_present


def watching_wills(broker: SansIoBroker):
    watcher = broker.connect("watcher")
    watcher.send(Subscribe(1, [Subscription("wills/#", 0)]))
    watcher.received()
    return watcher


def test_a_delayed_will_goes_when_its_delay_has_passed_and_not_before(broker):
    watcher = watching_wills(broker)
    will = Will("wills/leaver", b"gone", 0, properties={"will_delay_interval": 10})
    leaver = broker.connect("leaver", will=will, properties={"session_expiry_interval": 60})
    leaver.lose()
    broker.clock.advance(9.5)
    assert watcher.received() == []
    broker.clock.advance(1)
    assert [(p.topic, p.payload) for p in watcher.received()] == [("wills/leaver", b"gone")]


def test_reconnecting_within_the_will_delay_cancels_the_will(broker):
    watcher = watching_wills(broker)
    will = Will("wills/back", b"gone", 0, properties={"will_delay_interval": 10})
    broker.connect("back", will=will, properties={"session_expiry_interval": 60}).lose()
    broker.clock.advance(5)
    broker.connect("back", clean_start=False, properties={"session_expiry_interval": 60})
    broker.clock.advance(60)
    assert watcher.received() == []


def test_the_will_goes_when_the_session_ends_before_the_delay(broker):
    watcher = watching_wills(broker)
    will = Will("wills/short", b"gone", 0, properties={"will_delay_interval": 100})
    broker.connect("short", will=will, properties={"session_expiry_interval": 3}).lose()
    broker.clock.advance(3.1)
    assert [p.topic for p in watcher.received()] == ["wills/short"]


def test_keep_alives_of_many_clients_share_one_timer(broker):
    """Clients with different keep alives, one of them talking: each silent
    one is closed at its own time, the talker never, and a client that
    leaves is not held by the timer."""
    quiet = {seconds: broker.connect(f"quiet-{seconds}", keepalive=seconds)
             for seconds in (2, 4, 8)}
    talker = broker.connect("talker", keepalive=2)
    leaver = broker.connect("leaver", keepalive=2)
    leaver.send(Disconnect())
    assert len(broker.core.keepalives) == 4
    closed_at = {}
    start = broker.clock.now
    for _ in range(140):  # 14 s in steps of 0.1 s
        broker.clock.advance(0.1)
        talker.send(Pingreq())
        for seconds, client in quiet.items():
            if client.transport.closed and seconds not in closed_at:
                closed_at[seconds] = broker.clock.now
    for seconds, at in closed_at.items():
        # Closed 1.5 intervals after its last packet, within the timer's tenth.
        assert 1.5 * seconds - 1e-6 <= at - start <= 1.5 * seconds + 0.21, seconds
    assert sorted(closed_at) == [2, 4, 8]
    assert not talker.transport.closed
    assert len(broker.core.keepalives) == 1


def test_keep_alive_closes_a_silent_client_after_one_and_a_half_intervals(broker):
    client = broker.connect("quiet", keepalive=10)
    broker.clock.advance(14.9)
    assert not client.transport.closed
    broker.clock.advance(0.2)
    [disconnect] = client.received()
    assert disconnect.reason_code == Reason.KEEP_ALIVE_TIMEOUT
    assert client.transport.closed
