"""Reloading the configuration file of a running ``bastionmq start`` (SIGHUP):
what can change live does, with clients connected; what needs a restart is
named and left as it was; an invalid file changes nothing."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from conftest import Client
from test_cli import command, free_port, refuses_connections, start_process  # noqa: F401

TIMEOUT = 20.0


def config_text(tmp_path: Path, port: int, level: str, acl: str, max_connections: int) -> str:
    return f"""
node.data_dir = "{tmp_path / 'data'}"
log.level = {level}
allow_anonymous = true
listeners.tcp.default {{ bind = "127.0.0.1:{port}", max_connections = {max_connections} }}
authorization {{
  no_match = deny
  sources = [ {{ type = file, path = "{tmp_path / acl}" }} ]
}}
"""


def wait_for(process, text: str, after: int = 0) -> str:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        log = process.stderr[after:]
        if text in log:
            return log
        time.sleep(0.05)
    pytest.fail(f"{text!r} not logged:\n{process.stderr}")


def test_sighup_applies_log_level_acl_and_limit_and_reports_the_bind(start_process, tmp_path):
    (tmp_path / "open.acl").write_text('{allow, all, all, ["#"]}.\n')
    (tmp_path / "closed.acl").write_text('{deny, all, publish, ["alarm/#"]}.\n'
                                         '{allow, all, all, ["#"]}.\n')
    port, other_port = free_port(), free_port()
    config = tmp_path / "bastionmq.conf"
    config.write_text(config_text(tmp_path, port, "info", "open.acl", 10))
    broker = start_process(config)
    broker.wait_listening(port)
    subscriber = Client(port, "watcher")
    subscriber.subscribe("alarm/#", qos=1)
    publisher = Client(port, "sensor", version=paho.MQTTv5)
    publisher.publish("alarm/1", b"before", qos=1)
    assert subscriber.expect()[0].payload == b"before"
    wait_for(broker, "client 'sensor'")

    config.write_text(config_text(tmp_path, other_port, "warning", "closed.acl", 2))
    mark = len(broker.stderr)
    broker.process.send_signal(signal.SIGHUP)
    log = wait_for(broker, "until a restart", mark)
    assert "listeners.tcp.default.bind.port" in log

    # The ACL: the connected publisher is now denied alarm/#.
    publisher.publish("alarm/1", b"after", qos=1)
    subscriber.subscribe("other/#", qos=1)
    publisher.publish("other/1", b"marker", qos=1)
    assert subscriber.expect()[0].payload == b"marker"
    # The limit: two connections are open, a third is refused.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as third:
        assert third.recv(1) == b""
    # The bind waits for a restart: the old port serves, the new one is not open.
    assert refuses_connections(other_port)
    # The log level: connects are no longer logged at info.
    subscriber.disconnect()
    late = Client(port, "quiet-one")
    late.disconnect()
    time.sleep(0.3)
    assert "quiet-one" not in broker.stderr[mark:]
    publisher.disconnect()


def test_an_invalid_file_changes_nothing(start_process, tmp_path):
    (tmp_path / "open.acl").write_text('{allow, all, all, ["#"]}.\n')
    port = free_port()
    config = tmp_path / "bastionmq.conf"
    config.write_text(config_text(tmp_path, port, "info", "open.acl", 10))
    broker = start_process(config)
    broker.wait_listening(port)
    config.write_text(config_text(tmp_path, port, "info", "open.acl", 10)
                      + "mqtt.max_packet_size = lots\n")
    mark = len(broker.stderr)
    broker.process.send_signal(signal.SIGHUP)
    log = wait_for(broker, "nothing changed", mark)
    assert "mqtt.max_packet_size" in log
    Client(port, "still-served").disconnect()
    assert broker.process.poll() is None


# ------------------------------------------------------------------ planning


def test_a_plan_keeps_what_needs_a_restart_and_takes_the_rest():
    from bastionmq.config import load_config
    from bastionmq.reload import plan_reload
    running = load_config(text="""
listeners.tcp.default { bind = "127.0.0.1:1883" }
listeners.ws.default { bind = "127.0.0.1:8083" }
node.data_dir = "/var/lib/a"
log.level = info
cluster { enable = true, heartbeat = 1s }
""", env={})
    new = load_config(text="""
listeners.tcp.default { bind = "127.0.0.1:1884", max_connections = 5 }
listeners.tcp.extra { bind = "127.0.0.1:1999" }
node.data_dir = "/var/lib/b"
log.level = debug
mqtt.max_packet_size = 2KB
cluster { enable = true, heartbeat = 2s, nats.servers = ["10.0.0.9:4222"] }
""", env={})
    effective, report = plan_reload(running, new)
    assert report.applied == ["listeners.tcp.default.max_connections", "log.level",
                              "mqtt.max_packet_size"]
    assert "listeners.tcp.default.bind.port" in report.restart_required
    assert "node.data_dir" in report.restart_required
    assert {"cluster.heartbeat", "cluster.nats.servers"} <= set(report.restart_required)
    assert effective.cluster.heartbeat == 1.0
    assert any(key.startswith("listeners.tcp.extra.") for key in report.restart_required)
    assert any(key.startswith("listeners.ws.default.") for key in report.restart_required)
    assert effective.listeners.tcp["default"].bind.port == 1883
    assert effective.listeners.tcp["default"].max_connections == 5
    assert set(effective.listeners.tcp) == {"default"} and "default" in effective.listeners.ws
    assert effective.node.data_dir == "/var/lib/a"
    assert (effective.log.level, effective.mqtt.max_packet_size) == ("debug", 2048)


def test_operator_bans_end_when_their_time_is_up():
    from bastionmq.auth.banned import OperatorBans
    from bastionmq.auth.builtin_db import Ban
    now = [1000.0]
    bans = OperatorBans([Ban("username", "eve", until=1010.0), Ban("peerhost", "192.0.2.1")],
                        clock=lambda: now[0])
    assert bans.ban_of("c1", "eve", "127.0.0.1").value == "eve"
    assert bans.ban_of("c1", None, "192.0.2.1").kind == "peerhost"
    assert bans.ban_of("eve", None, "127.0.0.1") is None  # a client id is not a username
    now[0] = 1010.0
    assert bans.ban_of("c1", "eve", "127.0.0.1") is None
    assert [ban.value for ban in bans] == ["192.0.2.1"]
