"""The in-process API of an embedded broker: in-process subscribers, the
clients view and disconnect, and the application's hooks.

A real broker in the test's event loop (``async with Broker``), real paho-mqtt
clients in threads (``asyncio.to_thread``), as an application would have it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import paho.mqtt.client as paho
import pytest
import uvloop
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bastionmq import Broker
from bastionmq.broker.local import LocalMessage, SubscriptionClosed
from bastionmq.broker.codec import Disconnect, Publish
from bastionmq.broker.properties import Reason
from bastionmq.hooks import ConnectedClient, Hooks

TIMEOUT = 10.0

ANONYMOUS = """
listeners.tcp.default { bind = "127.0.0.1:0" }
allow_anonymous = true
"""



def port_of(broker: Broker) -> int:
    return broker.listeners["tcp:default"].address[1]


async def paho_client(clients, broker: Broker, client_id: str, version: int = paho.MQTTv5,
                      **kwargs: Any):
    return await asyncio.to_thread(clients, port_of(broker), client_id=client_id,
                                   version=version, **kwargs)


async def next_message(subscription) -> LocalMessage:
    return await asyncio.wait_for(subscription.get(), TIMEOUT)


def user_properties(*pairs: tuple[str, str]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = list(pairs)
    return props


# ------------------------------------------------------------------ in-process subscribe


def test_an_in_process_subscriber_receives_what_paho_publishes(clients):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            subscription = broker.subscribe("sensors/#", qos=1)
            publisher = await paho_client(clients, broker, "pub")
            await asyncio.to_thread(publisher.publish, "sensors/a", b"zero", 0, False,
                                    user_properties(("unit", "C")))
            await asyncio.to_thread(publisher.publish, "sensors/b", b"one", 1)
            await asyncio.to_thread(publisher.publish, "elsewhere", b"not for it", 1)
            zero = await next_message(subscription)
            assert (zero.topic, zero.payload, zero.qos, zero.retain) == \
                ("sensors/a", b"zero", 0, False)
            assert zero.properties["user_property"] == [("unit", "C")]
            one = await next_message(subscription)
            assert (one.topic, one.payload, one.qos, one.retain) == ("sensors/b", b"one", 1, False)
            assert subscription.get_nowait() is None
            # Taken is acknowledged: nothing is left in flight.
            assert not broker.core.sessions.get(subscription.client_id)  # not a network session
            assert not subscription._subscriber.session.inflight
            # A QoS 0 subscription gets QoS 1 messages at QoS 0.
            low = broker.subscribe("sensors/#", qos=0)
            await asyncio.to_thread(publisher.publish, "sensors/c", b"two", 1)
            assert (await next_message(low)).qos == 0
            assert (await next_message(subscription)).qos == 1

    uvloop.run(main())


def test_retained_messages_reach_a_new_in_process_subscriber(clients):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            publisher = await paho_client(clients, broker, "pub")
            await asyncio.to_thread(publisher.publish, "state/door", b"open", 1, True)
            async with broker.subscribe("state/#", qos=1) as subscription:
                message = await next_message(subscription)
                assert (message.topic, message.payload, message.retain) == \
                    ("state/door", b"open", True)
                # Live messages have RETAIN cleared, as for any subscriber.
                await asyncio.to_thread(publisher.publish, "state/door", b"shut", 1, True)
                live = await next_message(subscription)
                assert (live.payload, live.retain) == (b"shut", False)

    uvloop.run(main())


def test_a_shared_subscription_is_shared_with_a_paho_client(clients):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            member = await paho_client(clients, broker, "member")
            assert await asyncio.to_thread(member.subscribe, "$share/workers/jobs/#", 1) == [1]
            subscription = broker.subscribe("$share/workers/jobs/#", qos=1)
            publisher = await paho_client(clients, broker, "pub")
            payloads = [b"job-%d" % i for i in range(20)]
            for payload in payloads:
                await asyncio.to_thread(publisher.publish, "jobs/x", payload, 1)
            local = []
            while (message := subscription.get_nowait()) is not None:
                local.append(message.payload)
            remote = [message.payload for message in
                      await asyncio.to_thread(member.expect, len(payloads) - len(local))]
            # Each message went to exactly one member, and both took part.
            assert sorted(local + remote) == sorted(payloads)
            assert local and remote

    uvloop.run(main())


def test_a_consumer_that_does_not_iterate_slows_the_publisher_then_loses_its_oldest(clients):
    config = ANONYMOUS + "mqtt { max_mqueue_len = 100, slow_subscriber_timeout = 500ms }\n"

    async def main():
        async with Broker(config) as broker:
            stalled = broker.subscribe("news", qos=1, queue_size=10)
            fast = await paho_client(clients, broker, "fast", version=paho.MQTTv311)
            assert await asyncio.to_thread(fast.subscribe, "news", 1) == [1]
            publisher = await paho_client(clients, broker, "pub", version=paho.MQTTv311)
            payloads = [b"%04d" % i for i in range(600)]

            def publish_all() -> None:
                for payload in payloads:
                    publisher.paho.publish("news", payload, 1)
                for _ in range(50):  # the last one acknowledged: all were
                    info = publisher.paho.publish("news/end", b"", 1)
                    info.wait_for_publish(TIMEOUT)
                    if info.is_published():
                        return

            await asyncio.to_thread(publish_all)
            received = [m.payload for m in await asyncio.to_thread(fast.expect, len(payloads))]
            # Nothing lost for the subscriber that keeps up.
            assert received == payloads
            stats = broker.core.stats
            assert stats.publisher_pauses > 0  # the publisher was slowed first
            assert stats.slow_subscribers == 1  # then the stalled one was taken for slow
            dropped = stats.dropped_queue_full
            assert dropped > 0
            kept = []
            while (message := stalled.get_nowait()) is not None:
                kept.append(message.payload)
            # Its in-flight window and its newest: its oldest queued were dropped, counted.
            assert kept == sorted(kept)
            assert kept[:10] == payloads[:10]
            assert kept[-1] == payloads[-1]
            assert len(kept) + dropped == len(payloads)

    uvloop.run(main())


def test_a_slow_in_process_qos0_subscriber_loses_its_oldest_and_counts_them():
    async def main():
        async with Broker(ANONYMOUS) as broker:
            subscription = broker.subscribe("bulk", qos=0, queue_size=5)
            for i in range(20):
                await broker.publish("bulk", b"%02d" % i)
            # Nobody to hold back (the application published): beyond its bound
            # the oldest waiting make room, and are counted.
            assert broker.core.stats.dropped_qos0_backpressure == 15
            kept = []
            while (message := subscription.get_nowait()) is not None:
                kept.append(message.payload)
            assert kept == [b"%02d" % i for i in range(15, 20)]

    uvloop.run(main())


def test_breaking_out_of_the_iteration_unsubscribes(run, clients):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            publisher = await paho_client(clients, broker, "pub")
            got = []

            async def first_two() -> None:
                async for message in broker.subscribe("t/#", qos=1):
                    got.append(message.payload)
                    if len(got) == 2:
                        break

            consumer = asyncio.create_task(first_two())
            await asyncio.sleep(0)  # it has subscribed
            assert broker.core.subscription_count() == 1
            for payload in (b"1", b"2", b"3"):
                await asyncio.to_thread(publisher.publish, "t/x", payload, 1)
            await asyncio.wait_for(consumer, TIMEOUT)
            assert got == [b"1", b"2"]
            # The generator is closed by the loop at its next turns.
            for _ in range(10):
                if broker.core.subscription_count() == 0:
                    break
                await asyncio.sleep(0)
            assert broker.core.subscription_count() == 0
            assert await broker.publish("t/x", b"4") == 0

            async with broker.subscribe("u", qos=0) as subscription:
                assert broker.core.subscription_count() == 1
            assert broker.core.subscription_count() == 0
            with pytest.raises(SubscriptionClosed):
                await subscription.get()

    run(main())


def test_stopping_the_broker_ends_an_iteration():
    async def main():
        broker = Broker(ANONYMOUS)
        await broker.start()
        got = []

        async def consume() -> None:
            async for message in broker.subscribe("t"):
                got.append(message)

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0)
        await broker.stop()
        await asyncio.wait_for(consumer, TIMEOUT)
        assert got == []

    uvloop.run(main())


def test_an_invalid_or_denied_filter_is_refused():
    config = ANONYMOUS + "authorization.no_match = deny\n"

    async def main():
        async with Broker(config) as broker:
            for bad in ("a/#/b", "$share/g", "", "a+"):
                with pytest.raises(ValueError):
                    broker.subscribe(bad)
            # Trusted by default: the authorization chain is not asked.
            broker.subscribe("private/#").close()
            with pytest.raises(PermissionError):
                broker.subscribe("private/#", trusted=False, username="app")
            assert broker.core.subscription_count() == 0

    uvloop.run(main())


# ------------------------------------------------------------------ clients, disconnect


def test_the_clients_view_shows_connected_clients(clients):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            broker.subscribe("x")  # an in-process subscriber is no client
            await paho_client(clients, broker, "five", username="alice", password="pw")
            await paho_client(clients, broker, "three", version=paho.MQTTv311)
            view = broker.clients
            assert set(view) == {"five", "three"}
            five = view["five"]
            assert isinstance(five, ConnectedClient)
            assert (five.username, five.listener, five.protocol_version, five.tls) == \
                ("alice", "tcp:default", 5, False)
            assert five.peer_address[0] == "127.0.0.1"
            assert five.connected_at > 0 and five.certificate is None
            assert view["three"].protocol_version == 4
            with pytest.raises(TypeError):
                view["other"] = five  # read-only

    uvloop.run(main())


def test_disconnect_sends_the_reason_to_a_5_0_client(clients):
    async def main():
        async with Broker(ANONYMOUS) as broker:
            client = await paho_client(clients, broker, "victim")
            assert await broker.disconnect("victim", Reason.USE_ANOTHER_SERVER, "moving") is True
            reason = await asyncio.to_thread(client.disconnects.get, True, TIMEOUT)
            assert reason.value == Reason.USE_ANOTHER_SERVER
            assert "victim" not in broker.clients
            assert await broker.disconnect("nobody") is False
            with pytest.raises(ValueError):
                await broker.disconnect("victim", 0x01)  # no server's DISCONNECT reason
            # kick is the same path: 0x98 and the session ended.
            other = await paho_client(clients, broker, "kicked")
            assert broker.kick("kicked", "enough") is True
            reason = await asyncio.to_thread(other.disconnects.get, True, TIMEOUT)
            assert reason.value == Reason.ADMINISTRATIVE_ACTION
            assert "kicked" not in broker.core.sessions

    uvloop.run(main())


# ------------------------------------------------------------------ authentication hooks


def test_authenticate_hooks_join_the_chain(clients):
    config = 'listeners.tcp.default { bind = "127.0.0.1:0" }\nallow_anonymous = false\n'
    asked = []

    def sync_hook(client) -> str:
        asked.append(("sync", client.username))
        return {"alice": "allow", "mallory": "deny"}.get(client.username, "ignore")

    async def async_hook(client) -> str | None:
        await asyncio.sleep(0)
        asked.append(("async", client.username))
        return "allow" if client.username == "bob" else None

    async def main():
        async with Broker(config, hooks=Hooks(authenticate=sync_hook)) as broker:
            broker.authenticate(async_hook)  # added while running: asked after the first
            codes = {}
            for user in ("alice", "bob", "mallory", "carol"):
                client = await paho_client(clients, broker, user, username=user, password="x")
                codes[user] = client.reason_code
            assert codes == {"alice": 0, "bob": 0, "mallory": Reason.NOT_AUTHORIZED,
                             # ignored by both: allow_anonymous = false decides
                             "carol": Reason.BAD_USER_NAME_OR_PASSWORD}
            assert asked == [("sync", "alice"), ("sync", "bob"), ("async", "bob"),
                             ("sync", "mallory"), ("sync", "carol"), ("async", "carol")]
            assert broker.authn_stats.by_source[("hook", "allowed")] == 2
            assert broker.authn_stats.by_source[("hook", "denied")] == 1

    uvloop.run(main())


def test_an_ignoring_hook_leaves_the_configured_chain_to_decide(clients, passwd):
    config = f"""
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
authentication = [ {{ mechanism = password_based, backend = password_file, path = "{passwd}" }} ]
"""

    async def main():
        async with Broker(config, hooks=Hooks(authenticate=lambda client: "ignore")) as broker:
            good = await paho_client(clients, broker, "a", username="alice", password="wonderland")
            bad = await paho_client(clients, broker, "b", username="alice", password="wrong")
            assert (good.reason_code, bad.reason_code) == (0, Reason.BAD_USER_NAME_OR_PASSWORD)

    uvloop.run(main())


# ------------------------------------------------------------------ authorization hooks


def test_authorize_hooks_join_the_chain_on_every_path(clients):
    config = ANONYMOUS + "authorization.no_match = deny\n"
    asked = []

    def rules(client, action, topic) -> str:
        asked.append((client.client_id, action, topic))
        if topic.startswith("secret/"):
            return "deny"
        if topic == "#" or topic.startswith("open/"):
            return "allow"
        return "ignore"  # authorization.no_match decides: deny

    async def main():
        async with Broker(config) as broker:
            broker.authorize(rules)
            reader = await paho_client(clients, broker, "reader")
            assert await asyncio.to_thread(reader.subscribe, "#", 1) == [1]
            assert await asyncio.to_thread(reader.subscribe, "other/#", 1) == [0x87]
            assert await asyncio.to_thread(reader.subscribe, "secret/#", 1) == [0x87]
            await broker.publish("secret/plans", b"no", qos=1)  # the application may publish
            await broker.publish("open/news", b"yes", qos=1)
            [message] = await asyncio.to_thread(reader.expect)
            assert message.topic == "open/news"  # read access was asked at delivery too
            # An untrusted in-process subscriber is asked about like a client.
            untrusted = broker.subscribe("#", qos=1, trusted=False, username="app")
            await broker.publish("secret/plans", b"no", qos=1)
            await broker.publish("open/more", b"yes", qos=1)
            assert (await next_message(untrusted)).topic == "open/more"
            assert untrusted.get_nowait() is None
            assert ("reader", "subscribe", "secret/plans") in asked
            assert any(client_id == untrusted.client_id for client_id, _, _ in asked)

    uvloop.run(main())


def async_rules(asked: list, gate: asyncio.Event | None = None):
    """An async authorize hook: "secret/" denied, "open/" and "#" allowed,
    the rest ignored (no_match = deny decides); it waits for ``gate`` on
    topics under "slow/", and a moment on every question."""

    async def rules(client, action, topic) -> str:
        asked.append((client.client_id, action, topic))
        await asyncio.sleep(0.01)
        if gate is not None and topic.startswith("slow/"):
            await gate.wait()
            return "allow"
        if topic.startswith("secret/"):
            return "deny"
        if topic == "#" or topic.startswith("open/"):
            return "allow"
        return "ignore"

    return rules


def test_an_async_authorize_hook_decides_publish_subscribe_and_reading(clients):
    config = ANONYMOUS + "authorization.no_match = deny\n"
    asked: list = []

    async def main():
        async with Broker(config, hooks=Hooks(authorize=async_rules(asked))) as broker:
            reader = await paho_client(clients, broker, "reader")
            # Several filters in one SUBSCRIBE: every one is decided before any is subscribed.
            codes = await asyncio.to_thread(
                lambda: reader.paho.subscribe([("#", 1), ("other/#", 1), ("secret/#", 1)]))
            assert codes[0] == paho.MQTT_ERR_SUCCESS
            _, granted = await asyncio.to_thread(reader.subacks.get, timeout=TIMEOUT)
            assert [code.value for code in granted] == [1, 0x87, 0x87]
            writer = await paho_client(clients, broker, "writer")
            # Published by a client, each decided by the hook: "secret/" denied,
            # "open/" allowed; read access decided per topic for the reader.
            for topic in ("secret/plans", "open/news", "other/thing"):
                await asyncio.to_thread(writer.publish, topic, b"x", 1)
            await broker.publish("secret/by-the-app", b"no", qos=1)  # the application may publish
            [message] = await asyncio.to_thread(reader.expect)
            assert message.topic == "open/news"
            await asyncio.to_thread(reader.expect_nothing_more, "open/marker")
            assert ("writer", "publish", "secret/plans") in asked
            assert ("reader", "subscribe", "secret/by-the-app") in asked
            decided = broker.core.access.decided
            assert decided[("publish", False, "hook")] >= 1
            assert decided[("subscribe", False, "no_match")] >= 1

    uvloop.run(main())


def test_messages_waiting_for_a_read_decision_keep_their_order(clients):
    asked: list = []
    gate = asyncio.Event()

    async def main():
        async with Broker(ANONYMOUS, hooks=Hooks(authorize=async_rules(asked, gate))) as broker:
            reader = await paho_client(clients, broker, "reader")
            other = await paho_client(clients, broker, "other")
            assert await asyncio.to_thread(reader.subscribe, "#", 1) == [1]
            assert await asyncio.to_thread(other.subscribe, "open/#", 1) == [1]
            # The application publishes to "slow/x": the reader's read access
            # waits for the gate, and its messages wait behind it, in order.
            for n in range(20):
                await broker.publish("slow/x", str(n).encode(), qos=1)
            await broker.publish("open/now", b"first", qos=1)
            # Another topic, and another client, do not wait.
            [now] = await asyncio.to_thread(other.expect)
            assert now.topic == "open/now"
            [now] = await asyncio.to_thread(reader.expect)
            assert now.topic == "open/now"
            gate.set()
            messages = await asyncio.to_thread(reader.expect, 20)
            assert [m.payload for m in messages] == [str(n).encode() for n in range(20)]
            assert [a for a in asked if a[2] == "slow/x"] == [("reader", "subscribe", "slow/x")]

    uvloop.run(main())


def test_a_publish_waiting_for_its_decision_holds_only_its_client(clients):
    asked: list = []
    gate = asyncio.Event()

    async def main():
        async with Broker(ANONYMOUS, hooks=Hooks(authorize=async_rules(asked, gate))) as broker:
            subscriber = broker.subscribe("#", qos=1)
            slow = await paho_client(clients, broker, "slow")
            fast = await paho_client(clients, broker, "fast")
            waiting = slow.paho.publish("slow/a", b"1", qos=1)
            slow.paho.publish("open/b", b"2", qos=1)  # behind it: waits too
            await asyncio.to_thread(fast.publish, "open/c", b"3", 1)
            assert (await next_message(subscriber)).topic == "open/c"
            assert not waiting.is_published()
            gate.set()
            assert [(await next_message(subscriber)).topic for _ in range(2)] == \
                ["slow/a", "open/b"]
            await asyncio.to_thread(waiting.wait_for_publish, TIMEOUT)

    uvloop.run(main())


def test_what_a_client_published_before_it_went_is_routed_once_allowed(raw_clients):
    """A QoS 0 publisher that disconnects at once (mosquitto_pub does):
    its PUBLISH, waiting for the hook, is still routed when allowed, and
    counted once; the one denied is not."""
    asked: list = []
    gate = asyncio.Event()

    async def main():
        async with Broker(ANONYMOUS, hooks=Hooks(authorize=async_rules(asked, gate))) as broker:
            subscriber = broker.subscribe("#", qos=0, trusted=True)
            raw = raw_clients(port_of(broker))
            await asyncio.to_thread(raw.connect, "quick")
            raw.send(Publish("slow/x", b"sent before going", 0))
            raw.send(Publish("secret/y", b"denied", 0))
            raw.send(Disconnect())
            raw.close()
            for _ in range(50):  # the broker sees the client go
                if "quick" not in broker.clients:
                    break
                await asyncio.sleep(0.02)
            assert "quick" not in broker.clients
            gate.set()
            message = await asyncio.wait_for(subscriber.get(), 10)
            assert (message.topic, message.payload) == ("slow/x", b"sent before going")
            await broker.publish("open/marker", b"")
            marker = await asyncio.wait_for(subscriber.get(), 10)
            assert marker.topic == "open/marker"  # nothing else came
            stats = broker.core.stats
            for _ in range(50):  # the denial is decided beside the allowed one
                if stats.publish_denied:
                    break
                await asyncio.sleep(0.02)
            assert stats.received_by_qos[0] == 2 and stats.publish_denied == 1

    uvloop.run(main())


def test_retained_shared_and_wills_wait_for_an_async_decision(clients):
    config = ANONYMOUS + "authorization.no_match = deny\n"
    asked: list = []

    async def main():
        async with Broker(config, hooks=Hooks(authorize=async_rules(asked))) as broker:
            await broker.publish("open/kept", b"r1", qos=1, retain=True)
            await broker.publish("secret/kept", b"r2", qos=1, retain=True)
            reader = await paho_client(clients, broker, "reader")
            assert await asyncio.to_thread(reader.subscribe, "#", 1) == [1]
            [message] = await asyncio.to_thread(reader.expect)
            assert (message.topic, message.retain) == ("open/kept", True)
            member = await paho_client(clients, broker, "member")
            assert await asyncio.to_thread(member.subscribe, "$share/g/#", 1) == [1]
            doomed = await paho_client(clients, broker, "doomed",
                                       will=("open/will", b"gone", 1, False))
            liar = await paho_client(clients, broker, "liar",
                                     will=("secret/will", b"gone", 1, False))
            await asyncio.to_thread(doomed.stop_network)
            await asyncio.to_thread(liar.stop_network)
            await broker.publish("secret/shared", b"no", qos=1)
            await broker.publish("open/shared", b"yes", qos=1)
            got = {m.topic for m in await asyncio.to_thread(member.expect, 2)}
            assert got == {"open/shared", "open/will"}
            await asyncio.to_thread(member.expect_nothing_more, "open/marker")
            got = {m.topic for m in await asyncio.to_thread(reader.expect, 3)}
            assert got == {"open/shared", "open/will", "open/marker"}
            assert ("liar", "publish", "secret/will") in asked

    uvloop.run(main())


def test_an_untrusted_in_process_subscriber_waits_for_an_async_decision():
    config = ANONYMOUS + "authorization.no_match = deny\n"

    async def main():
        async with Broker(config, hooks=Hooks(authorize=async_rules([]))) as broker:
            allowed = broker.subscribe("open/#", qos=1, trusted=False)
            denied = broker.subscribe("secret/#", qos=1, trusted=False)
            with pytest.raises(PermissionError, match="secret/#"):
                await next_message(denied)
            # Subscribed once the answer came: a message published after it arrives.
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while not allowed._subscriber.session.subscriptions:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            await broker.publish("open/x", b"yes", qos=1)
            assert (await next_message(allowed)).payload == b"yes"

    uvloop.run(main())


def test_an_async_authorize_hook_that_does_not_answer_denies(clients, monkeypatch, caplog):
    monkeypatch.setattr("bastionmq.hooks.AUTHORIZE_TIMEOUT", 0.2)
    never = asyncio.Event()

    async def silent(client, action, topic):
        if topic.startswith("stuck/"):
            await never.wait()
        return "allow"

    async def main():
        async with Broker(ANONYMOUS, hooks=Hooks(authorize=silent)) as broker:
            client = await paho_client(clients, broker, "c")
            assert await asyncio.to_thread(client.subscribe, "stuck/#", 1) == [0x87]
            assert await asyncio.to_thread(client.subscribe, "fine/#", 1) == [1]
            await asyncio.to_thread(client.publish, "stuck/x", b"x", 1)  # acknowledged (denied)
            await asyncio.to_thread(client.expect_nothing_more, "fine/marker")
            # A client that goes while its decision is under way takes its packets along.
            gone = await paho_client(clients, broker, "gone")
            gone.paho.publish("stuck/y", b"y", qos=1)
            await asyncio.sleep(0.05)
            await asyncio.to_thread(gone.stop_network)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(client.expect_nothing_more, "fine/marker")
        assert "authorize hook" in caplog.text and "silent" in caplog.text

    with caplog.at_level(logging.ERROR, logger="bastionmq.hooks"):
        uvloop.run(main())


# ------------------------------------------------------------------ observers


def test_observers_are_told_of_messages_and_clients(clients):
    seen: list[Any] = []
    told = asyncio.Event

    async def main():
        done = told()
        broker = Broker(ANONYMOUS)

        @broker.on_message
        def message(message: LocalMessage) -> None:
            seen.append(("message", message.topic, message.payload, message.client_id))

        @broker.on_connect
        def connected(client: ConnectedClient) -> None:
            seen.append(("connect", client.client_id, client.protocol_version))

        @broker.on_disconnect
        async def gone(client: ConnectedClient, reason: str) -> None:
            seen.append(("disconnect", client.client_id, reason))
            done.set()

        async with broker:
            assert broker.core.observer is not None
            client = await paho_client(clients, broker, "watched")
            await asyncio.to_thread(client.publish, "obs/1", b"hi", 1)
            await broker.publish("obs/2", b"from the app")
            await asyncio.to_thread(client.disconnect)
            await asyncio.wait_for(done.wait(), TIMEOUT)
        assert seen == [("connect", "watched", 5),
                        ("message", "obs/1", b"hi", "watched"),
                        ("message", "obs/2", b"from the app", None),
                        ("disconnect", "watched", "client disconnected")]

    uvloop.run(main())


def test_no_hook_means_no_observer_on_the_hot_path():
    async def main():
        async with Broker(ANONYMOUS) as broker:
            assert broker.core.observer is None
            assert broker.core.access is None  # no authorize hook, no chain: nothing to ask

    uvloop.run(main())


def test_an_async_observer_that_falls_behind_loses_calls_counted():
    async def main():
        release = asyncio.Event()
        seen = []

        async def slow(message: LocalMessage) -> None:
            await release.wait()
            seen.append(message.payload)

        async with Broker(ANONYMOUS, hooks=Hooks(on_message=slow, queue_size=2)) as broker:
            subscription = broker.subscribe("t")
            for i in range(10):
                await broker.publish("t", b"%d" % i)  # does not yield: the task has not run
            assert broker.hook_stats() == {"queued": 2, "dropped": 8, "errors": 0}
            # The subscriber lost nothing to the observer.
            assert [subscription.get_nowait().payload for _ in range(10)] == \
                [b"%d" % i for i in range(10)]
            release.set()
            for _ in range(10):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0)
            assert seen == [b"0", b"1"]

    uvloop.run(main())


def test_an_exception_in_a_hook_is_logged_and_harmless(clients, caplog):
    config = ANONYMOUS + "authorization.no_match = allow\n"

    def broken_observer(message):
        raise RuntimeError("observer bug")

    async def broken_async_observer(client):
        raise RuntimeError("async observer bug")

    def broken_authenticate(client):
        if client.username == "trigger":
            raise RuntimeError("authenticate bug")
        return "ignore"

    def broken_authorize(client, action, topic):
        if topic.startswith("bug/"):
            raise RuntimeError("authorize bug")
        return "ignore"

    hooks = Hooks(on_message=broken_observer, on_connect=broken_async_observer,
                  authenticate=broken_authenticate, authorize=broken_authorize)

    async def main():
        caplog.set_level(logging.ERROR, logger="bastionmq.hooks")
        async with Broker(config, hooks=hooks) as broker:
            subscription = broker.subscribe("#", qos=1)
            # A failing authenticate hook refuses (fail closed): 0x88.
            refused = await paho_client(clients, broker, "t", username="trigger", password="x")
            assert refused.reason_code == Reason.SERVER_UNAVAILABLE
            client = await paho_client(clients, broker, "fine")
            assert await asyncio.to_thread(client.subscribe, "bug/#", 1) == [0x87]
            assert await asyncio.to_thread(client.subscribe, "ok/#", 1) == [1]
            await asyncio.to_thread(client.publish, "ok/1", b"delivered", 1)
            [message] = await asyncio.to_thread(client.expect)
            assert message.payload == b"delivered"
            assert (await next_message(subscription)).payload == b"delivered"
            for _ in range(10):  # the async observer's task ran
                if broker.hook_stats()["errors"] == 2:
                    break
                await asyncio.sleep(0)
            assert broker.hook_stats()["errors"] == 2  # the two observers (the chains deny)
        logged = caplog.text
        for what in ("observer bug", "async observer bug", "authenticate bug", "authorize bug"):
            assert what in logged
        assert "raised an exception" in logged

    uvloop.run(main())
