"""The pytest plugin bastionmq.testing, as an application's test suite uses it:
pytest runs the tests below in a directory of their own (pytester), against
real brokers, over real sockets, with real certificates."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

TIMEOUT = 10.0

#: The application's own helper: a paho-mqtt client that waits for CONNACK.
CONFTEST = '''
import queue

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion


class Client:
    def __init__(self, args, context=None, client_id=""):
        self.messages = queue.Queue()
        self.events = queue.Queue()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if context is not None:
            self.paho.tls_set_context(context)
        self.paho.on_connect = lambda c, u, flags, rc, props: self.events.put(rc)
        self.paho.on_disconnect = lambda c, u, flags, rc, props: self.events.put(rc)
        self.paho.on_subscribe = lambda c, u, mid, codes, props: self.events.put(codes)
        self.paho.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.paho.connect(**args)
        self.paho.loop_start()
        self.connack = self.events.get(timeout=10)

    def subscribe(self, topic):
        self.paho.subscribe(topic, qos=1)
        return self.events.get(timeout=10)

    def publish(self, topic, payload):
        self.paho.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self):
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def client():
    made = []

    def connect(*args, **kwargs):
        made.append(Client(*args, **kwargs))
        return made[-1]

    yield connect
    for each in made:
        each.close()
'''


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An application's test directory, run with the plugin and with every
    warning an error, as a strict project would."""
    # Loaded explicitly, not through the entry point, so that these tests do
    # not depend on how this checkout was installed (test_the_entry_point...
    # checks the installed one).
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makeconftest(CONFTEST)
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    return suite.runpytest("-p", "bastionmq.testing", "-p", "no:cacheprovider", *args)


def test_publish_and_subscribe_through_mqtt_broker(suite):
    suite.makepyfile(test_app="""
        def test_broker_publish_reaches_a_subscriber(mqtt_broker, client):
            assert mqtt_broker.host == "127.0.0.1" and mqtt_broker.port > 0
            subscriber = client(mqtt_broker.client_args())
            assert subscriber.subscribe("greetings/#") == [1]
            assert mqtt_broker.publish("greetings/broker", b"hello", qos=1) == 1
            assert subscriber.messages.get(timeout=10) == ("greetings/broker", b"hello")

        def test_clients_talk_to_each_other(mqtt_broker, client):
            subscriber = client(mqtt_broker.client_args())
            subscriber.subscribe("chat")
            client(mqtt_broker.client_args()).publish("chat", b"hi")
            assert subscriber.messages.get(timeout=10) == ("chat", b"hi")
            names = mqtt_broker.run(lambda: len(mqtt_broker.core.connections))
            assert names == 2
    """)
    run(suite).assert_outcomes(passed=2)


def test_the_factory_starts_brokers_from_a_config_and_stops_them(suite, tmp_path):
    ports = tmp_path / "ports.json"
    suite.makepyfile(test_app=f"""
        import json

        def test_two_brokers(mqtt_broker_factory, client, tmp_path):
            # No bind given: the listener opens on 127.0.0.1, on a free port.
            first = mqtt_broker_factory("listeners.tcp.default {{}}\\nallow_anonymous = true")
            second = mqtt_broker_factory('''
                listeners.tcp.inside {{ }}
                listeners.tcp.closed {{ allow_anonymous = false }}
                allow_anonymous = true
            ''')
            assert first.address[0] == "127.0.0.1"
            assert len({{first.port, second.port_of("tcp:inside"),
                         second.port_of("tcp:closed")}}) == 3
            assert second.default_listener == "tcp:inside"
            # Its data (none here) would go to the test's directory, not the project's.
            assert first.broker.config.node.data_dir.startswith(str(tmp_path))
            assert client(second.client_args("tcp:inside")).connack == 0
            assert client(second.client_args("tcp:closed")).connack != 0
            with open({str(ports)!r}, "w") as file:
                json.dump([first.port, second.port_of("tcp:inside")], file)
    """)
    run(suite).assert_outcomes(passed=1)
    # Stopped at teardown: nothing listens there any more.
    for port in json.loads(ports.read_text()):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def test_mutual_tls_names_the_client_by_its_certificate_and_refuses_a_revoked_one(suite):
    suite.makepyfile(test_app="""
        import ssl

        import pytest

        ACL = '''
        {allow, all, publish, ["devices/${username}/#"]}.
        {allow, {username, "monitor"}, subscribe, ["devices/#"]}.
        '''

        @pytest.fixture
        def broker(mqtt_broker_factory, mqtt_pki, tmp_path):
            acl = tmp_path / "acl.conf"
            acl.write_text(ACL)
            return mqtt_broker_factory(mqtt_pki.ssl_listener() + f'''
                mqtt.peer_cert_as_username = cn
                authorization {{
                  no_match = deny
                  sources = [ {{ type = file, path = "{acl}" }} ]
                }}
            ''')

        def test_the_certificate_cn_is_the_username(broker, mqtt_pki, client):
            monitor = client(broker.client_args(), mqtt_pki.client("monitor").context)
            assert monitor.subscribe("devices/#") == [1]
            sensor = client(broker.client_args(), mqtt_pki.client("sensor-1").context,
                            client_id="claims-to-be-sensor-2")
            sensor.publish("devices/sensor-2/temp", b"spoofed")
            sensor.publish("devices/sensor-1/temp", b"21.5")
            assert monitor.messages.get(timeout=10) == ("devices/sensor-1/temp", b"21.5")
            usernames = broker.run(lambda: sorted(c.username for c in broker.core.connections))
            assert usernames == ["monitor", "sensor-1"]

        def refused(broker, context, client):
            # TLS 1.3: the client may finish its handshake before the server
            # refuses the certificate, and then hears of it at its first read.
            try:
                return client(broker.client_args(), context).connack != 0
            except (ssl.SSLError, OSError):
                return True

        def test_a_revoked_certificate_is_refused(broker, mqtt_pki, client):
            mallory = mqtt_pki.client("mallory")
            mqtt_pki.revoke(mallory)
            assert broker.reload_tls() == {"ssl:default": True}
            assert refused(broker, mallory.context, client)
            assert not refused(broker, mqtt_pki.client("alice").context, client)

        def test_no_certificate_no_handshake(broker, mqtt_pki, client):
            assert refused(broker, mqtt_pki.context(), client)
    """)
    run(suite).assert_outcomes(passed=3)


def test_a_failing_test_reports_the_broker_log(suite):
    suite.makepyfile(test_app="""
        def test_fails(mqtt_broker, client):
            client(mqtt_broker.client_args(), client_id="the-client")
            assert False, "the application misbehaved"

        def test_passes(mqtt_broker):
            pass
    """)
    result = run(suite)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*- bastionmq broker log -*",
        "*bastionmq-broker-* INFO listener tcp:default listening on 127.0.0.1:*",
        "*the-client*connected*",
    ])
    # Only the failing test's report carries it.
    assert result.stdout.str().count("bastionmq broker log") == 1


def test_the_log_level_is_a_setting(suite):
    suite.makeini("[pytest]\nfilterwarnings = error\nbastionmq_log_level = warning\n")
    suite.makepyfile(test_app="""
        import logging

        def test_fails(mqtt_broker):
            logging.getLogger("bastionmq").warning("a warning from the application")
            assert False
    """)
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*MainThread WARNING a warning from the application"])
    result.stdout.no_fnmatch_line("*listening on*")


def test_an_async_client_in_another_loop(suite):
    # No async plugin needed: the broker has its own loop in its own thread.
    suite.makepyfile(test_app="""
        import asyncio

        from bastionmq.broker.codec import (
            MQTT_5, Connack, Connect, Decoder, Publish, Suback, Subscribe, Subscription, encode)

        async def subscribe_and_receive(mqtt_broker):
            reader, writer = await asyncio.open_connection(*mqtt_broker.address)
            decoder = Decoder(MQTT_5)

            async def receive():
                while True:
                    packets = decoder.feed(await reader.read(65536))
                    if packets:
                        return packets[0]

            writer.write(encode(Connect("async", MQTT_5), MQTT_5))
            assert isinstance(await receive(), Connack)
            writer.write(encode(Subscribe(1, [Subscription("news", qos=0)]), MQTT_5))
            assert isinstance(await receive(), Suback)
            assert await mqtt_broker.apublish("news", b"from the broker") == 1
            message = await receive()
            writer.close()
            await writer.wait_closed()
            return message

        def test_async(mqtt_broker):
            message = asyncio.run(asyncio.wait_for(subscribe_and_receive(mqtt_broker), 10))
            assert isinstance(message, Publish) and message.payload == b"from the broker"
    """)
    run(suite).assert_outcomes(passed=1)


def test_an_async_test_with_pytest_asyncio(suite):
    pytest.importorskip("pytest_asyncio")
    suite.makeini("[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = "
                  "function\n")
    suite.makepyfile(test_app="""
        import asyncio

        import pytest

        @pytest.mark.asyncio
        async def test_async(mqtt_broker):
            reader, writer = await asyncio.open_connection(*mqtt_broker.address)
            writer.write(bytes.fromhex("100d00044d5154540402003c000161"))  # CONNECT, id "a"
            assert await asyncio.wait_for(reader.readexactly(4), 10) == bytes.fromhex("20020000")
            assert await mqtt_broker.apublish("nobody/listens", b"x") == 0
            writer.close()
            await writer.wait_closed()
    """)
    run(suite, "-p", "pytest_asyncio.plugin").assert_outcomes(passed=1)


def test_an_async_test_with_anyio(suite):
    pytest.importorskip("anyio")
    suite.makepyfile(test_app="""
        import anyio
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.mark.anyio
        async def test_async(mqtt_broker):
            async with await anyio.connect_tcp(*mqtt_broker.address) as stream:
                await stream.send(bytes.fromhex("100d00044d5154540402003c000161"))
                with anyio.fail_after(10):
                    assert await stream.receive(4) == bytes.fromhex("20020000")
    """)
    run(suite, "-p", "anyio.pytest_plugin").assert_outcomes(passed=1)


def test_the_plugin_loads_nothing_of_the_broker_until_a_fixture_is_used(suite):
    suite.makepyfile(test_app="""
        import sys

        def test_untouched():
            heavy = ["bastionmq.app", "bastionmq.testkit", "asyncio", "attrs"]
            assert [name for name in heavy if name in sys.modules] == []
    """)
    # In a process of its own: this one has loaded all of it already.
    result = suite.runpytest_subprocess("-p", "bastionmq.testing", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_entry_point_registers_the_plugin():
    [entry] = entry_points(group="pytest11", name="bastionmq")
    assert entry.value == "bastionmq.testing", \
        "the installed metadata is stale: pip install -e . again"


def test_an_installed_bastionmq_offers_the_fixtures_without_configuration(tmp_path):
    # As an application gets it: no -p, no conftest, the entry point alone.
    (tmp_path / "test_app.py").write_text(
        "def test_it(mqtt_broker, mqtt_pki):\n"
        "    assert mqtt_broker.port > 0 and mqtt_pki.ca.exists()\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
