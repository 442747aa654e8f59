"""The outbox alone, with a list as its transport: what the core delivers
to one client becomes these bytes, written once per flush."""

from __future__ import annotations

import pytest

from bastionmq.broker.codec import Connack, Decoder, Puback, Publish, Pubrel, Suback
from bastionmq.broker.message import Message
from bastionmq.broker.outbox import Outbox, Outboxes
from bastionmq.broker.stats import Stats
from bastionmq.broker.store import Journal


class ListTransport:
    """Records each write: the outbox calls nothing else."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(version: int = 5, window: int = 10) -> tuple[Outbox, Outboxes, ListTransport]:
    transport = ListTransport()
    outboxes = Outboxes(Stats(), Clock())
    outbox = Outbox(transport, outboxes, window)
    outbox.version = version
    return outbox, outboxes, transport


def packets(data: bytes, version: int = 5) -> list:
    return Decoder(version=version).feed(data)


def test_nothing_is_written_before_the_flush_and_once_per_flush():
    outbox, outboxes, transport = make()
    message = Message("a/b", b"hello", 1, False)
    outbox.send_publish(message, 0, False, ())
    outbox.send_publish(message, 1, False, (), packet_id=7)
    outbox.puback(3)
    assert transport.writes == []
    assert outboxes.dirty == [outbox]  # enlisted once, however many packets
    outboxes.flush()
    [data] = transport.writes
    first, second, ack = packets(data)
    assert isinstance(first, Publish) and (first.topic, first.payload, first.qos) == ("a/b", b"hello", 0)
    assert isinstance(second, Publish) and (second.qos, second.packet_id) == (1, 7)
    assert isinstance(ack, Puback) and ack.packet_id == 3
    assert outboxes.stats.messages_sent == 2
    assert outboxes.stats.bytes_sent == len(data)
    outboxes.flush()
    assert len(transport.writes) == 1 and outboxes.dirty == []


def test_every_dirty_outbox_gets_one_write():
    outboxes = Outboxes(Stats(), Clock())
    pairs = [(Outbox(t, outboxes, 10), t) for t in (ListTransport(), ListTransport())]
    for outbox, _ in pairs:
        outbox.version = 4
        outbox.send_publish(Message("t", b"x", 0, False), 0, False, ())
        outbox.send_publish(Message("t", b"y", 0, False), 0, False, ())
    outboxes.flush()
    for _, transport in pairs:
        assert [p.payload for p in packets(b"".join(transport.writes), 4)] == [b"x", b"y"]
        assert len(transport.writes) == 1


@pytest.mark.parametrize("version, expected", [
    (4, b"\x40\x02\x00\x09"),        # 3.1.1 has no reason code: the short form
    (5, b"\x40\x03\x00\x09\x10"),    # 5.0: No matching subscribers
])
def test_an_acknowledgement_carries_its_reason_only_in_5(version, expected):
    outbox, outboxes, transport = make(version)
    outbox.puback(9, 0x10)
    outboxes.flush()
    assert transport.writes == [expected]


def test_each_acknowledgement_has_its_own_first_byte():
    outbox, outboxes, transport = make(4)
    outbox.puback(1)
    outbox.pubrec(2)
    outbox.pubrel(3)
    outbox.pubcomp(4)
    outboxes.flush()
    data = transport.writes[0]
    assert [data[i] for i in range(0, 16, 4)] == [0x40, 0x50, 0x62, 0x70]
    assert isinstance(packets(data, 4)[2], Pubrel)


def test_a_resend_carries_dup():
    outbox, outboxes, transport = make()
    outbox.send_publish(Message("t", b"x", 1, False), 1, False, (), packet_id=5, dup=True)
    outboxes.flush()
    [publish] = packets(transport.writes[0])
    assert publish.dup and publish.packet_id == 5


def test_a_message_beyond_the_clients_maximum_packet_size_is_dropped_and_counted():
    outbox, outboxes, transport = make()
    outbox.max_packet_size = 20
    assert outbox.send_publish(Message("t", b"x" * 100, 1, False), 1, False, (), 1) is False
    assert outbox.send_publish(Message("t", b"x", 1, False), 1, False, (), 2) is True
    outboxes.flush()
    assert [p.packet_id for p in packets(transport.writes[0])] == [2]
    assert outboxes.stats.dropped_too_large == 1


def test_a_reason_string_is_left_out_when_it_would_exceed_the_maximum_packet_size():
    outbox, outboxes, transport = make()
    outbox.send_explained(Suback(1, [0x87]), "not authorized")
    outbox.max_packet_size = 8
    outbox.send_explained(Connack(0x87), "not authorized " * 10)
    outboxes.flush()
    suback, connack = packets(transport.writes[0])
    assert suback.properties["reason_string"] == "not authorized"
    assert "reason_string" not in connack.properties


def test_outbound_topic_aliases_send_the_topic_once():
    outbox, outboxes, transport = make()
    outbox.aliases, outbox.alias_max = {}, 1
    for topic in ("long/topic/name", "long/topic/name", "other"):
        outbox.send_publish(Message(topic, b"x", 0, False), 0, False, ())
    outboxes.flush()
    first, second, third = packets(transport.writes[0])
    assert (first.topic, first.properties["topic_alias"]) == ("long/topic/name", 1)
    assert (second.topic, second.properties["topic_alias"]) == ("", 1)
    assert (third.topic, "topic_alias" in third.properties) == ("other", False)  # no alias left


def test_a_message_with_an_expiry_is_sent_with_the_time_it_has_left():
    outbox, outboxes, transport = make()
    message = Message("t", b"x", 0, False, {"message_expiry_interval": 60})
    message.stamp_expiry(outboxes.clock())
    outboxes.clock.now += 45
    outbox.send_publish(message, 0, False, ())
    outboxes.flush()
    assert packets(transport.writes[0])[0].properties["message_expiry_interval"] == 15


def test_a_message_sent_at_once_never_gets_more_time_than_it_was_given():
    """(now + 600) - now is 600.0000000000001 for some clock values (6% of
    them, at this magnitude): rounded up, that would be 601 s."""
    for step in range(2000):
        now = 1000 + step * 0.0137
        message = Message("t", b"x", 0, False, {"message_expiry_interval": 600})
        message.stamp_expiry(now)
        head, _ = message.wire_form(True, 0, False, (), now)
        assert Decoder(5).feed(head)[0].properties["message_expiry_interval"] == 600, now


# ------------------------------------------------------------------ held for the store

def journal_for(outboxes: Outboxes) -> Journal:
    journal = Journal(outboxes.clock, 100, lambda: None, lambda: None)
    outboxes.journal = journal
    return journal


def test_an_answer_promising_storage_waits_for_the_commit_and_keeps_its_order():
    outbox, outboxes, transport = make(4)
    journal = journal_for(outboxes)
    outbox.mark = journal.changes
    journal.retained_saved(Message("kept", b"x", 1, True))  # handling the packet stored something
    outbox.puback(1)
    outbox.mark = journal.changes  # the next packet stored nothing, but must not overtake
    outbox.puback(2)
    outboxes.flush()
    assert transport.writes == [] and outbox.acks_held == 2
    outboxes.release_acks(journal.take().acks)
    assert transport.writes == [b"\x40\x02\x00\x01\x40\x02\x00\x02"]
    assert outbox.acks_held == 0


def test_an_answer_that_promises_nothing_new_goes_at_once():
    outbox, outboxes, transport = make(4)
    journal = journal_for(outboxes)
    outbox.mark = journal.changes
    outbox.puback(1)
    outboxes.flush()
    assert transport.writes == [b"\x40\x02\x00\x01"]


def test_after_commit_waits_for_an_earlier_packets_promise():
    outbox, outboxes, transport = make(4)
    journal = journal_for(outboxes)
    journal.retained_saved(Message("kept", b"x", 1, True))
    outbox.mark = journal.changes  # this packet stored nothing itself
    outbox.pubrec(1, after_commit=True)
    outboxes.flush()
    assert transport.writes == []
    outboxes.release_acks(journal.take().acks)
    assert transport.writes == [b"\x50\x02\x00\x01"]


def test_held_answers_of_a_closed_connection_are_not_written():
    outbox, outboxes, transport = make(4)
    journal = journal_for(outboxes)
    journal.retained_saved(Message("kept", b"x", 1, True))
    outbox.puback(1)
    outbox.closed = True
    outboxes.release_acks(journal.take().acks)
    assert transport.writes == [] and outbox.acks_held == 0
