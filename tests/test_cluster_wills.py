"""The wills of a node's clients when the node dies (cluster.wills).

The node that dies is a real ``bastionmq start`` process, killed with
SIGKILL; the others run in this process's threads; the NATS server is real.
"""

from __future__ import annotations

import signal
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from mosquitto_peer import free_port
from nats_peer import poll
from test_cli import command, start_process  # noqa: F401  (fixtures)
from test_cluster_bus import nats, node_config, nodes, synced  # noqa: F401  (fixtures)

#: Heartbeats every 100 ms: a node is gone 0.3 s after its last.
FAST = "cluster.heartbeat = 100ms"


@pytest.fixture
def doomed(start_process, nats, tmp_path):  # noqa: F811
    """Start node ``name`` as a process of its own (on ``port``, or a free
    one); (process, port)."""
    def start(name: str = "doomed", extra: str = "", port: int | None = None):
        port = port or free_port()
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        config = directory / "bastionmq.conf"
        config.write_text(f'node.data_dir = "{directory}"\n' + node_config(
            name, [f"127.0.0.1:{nats.port}"], f"{FAST}\n{extra}", port))
        process = start_process(config)
        process.wait_listening(port)
        return process, port
    return start


@pytest.fixture
def survivors(nodes):  # noqa: F811
    """Nodes in this process that outlive the doomed one."""
    return lambda name, extra="": nodes(name, f"{FAST}\n{extra}")


def test_the_wills_of_a_killed_node_are_published_once(doomed, survivors, clients):
    process, port = doomed()
    b, c = survivors("b"), survivors("c")
    on_b = clients(b.port, client_id="on-b")
    on_c = clients(c.port, client_id="on-c")
    for watcher in (on_b, on_c):
        watcher.subscribe("alerts/#", 1)
    synced(b), synced(c)
    clients(port, client_id="sensor-1", will=("alerts/sensor-1", b"offline", 1, False))
    clients(port, client_id="sensor-2", will=("alerts/sensor-2", b"offline", 1, False)
            ).disconnect()  # a clean DISCONNECT: its will is discarded
    # A heartbeat after sensor-2's DISCONNECT (with one client left) says
    # the node dropped its will: the two went out in that order.
    poll(lambda: b.run(lambda: b.broker.bus.peers.get("doomed", ({},))[0].get("clients")) == 1
         and len(b.run(lambda: b.broker.bus.nodes())) == 3, "b hears the doomed node")
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    for watcher in (on_b, on_c):
        [message] = watcher.expect()
        assert (message.topic, message.payload) == ("alerts/sensor-1", b"offline")
    # Both survivors saw it gone; one of them published.
    published = [node.run(lambda node=node: node.broker.cluster_wills.published)
                 for node in (b, c)]
    assert sorted(published) == [0, 1]
    for watcher in (on_b, on_c):
        watcher.expect_nothing_more("alerts/marker")


def test_a_will_its_client_may_not_publish_is_not_published_by_another_node(
        doomed, survivors, clients, tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text('{deny, all, publish, ["forbidden/#"]}.\n{allow, all}.\n')
    rules = f'authorization {{ no_match = deny, sources = [ {{ type = file, path = "{acl}" }} ] }}'
    process, port = doomed(extra=rules)
    b = survivors("b", rules)
    watcher = clients(b.port, client_id="watcher")
    watcher.subscribe("#", 1)
    synced(b)
    clients(port, client_id="sneaky", will=("forbidden/x", b"should not", 1, False))
    clients(port, client_id="honest", will=("allowed/x", b"offline", 1, False))
    poll(lambda: len(b.run(lambda: b.broker.bus.nodes())) == 2, "b hears the doomed node")
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    [message] = watcher.expect()
    assert message.topic == "allowed/x"
    watcher.expect_nothing_more("allowed/marker")


def test_a_node_killed_and_started_again_publishes_its_former_wills(
        doomed, clients, nats, tmp_path: Path):
    process, port = doomed("solo")
    clients(port, client_id="sensor-9", will=("alerts/sensor-9", b"offline", 1, True))
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    again, port = doomed("solo")  # the same name; another origin
    # Its sweep, three heartbeats after start, finds its former self's will;
    # the will was retained, so a subscriber sees it whenever it comes.
    seen: list = []

    def retained_will() -> bool:
        late = clients(port, client_id=f"late-{len(seen)}", version=paho.MQTTv5)
        late.subscribe("alerts/#", 1)
        try:
            seen.append(late.expect(timeout=0.3)[0])
            return True
        except Exception:
            return False
        finally:
            late.disconnect()

    poll(retained_will, "the former will published and retained")
    # (Live, or retained: whether it came before or after the subscription.)
    assert (seen[0].topic, seen[0].payload) == ("alerts/sensor-9", b"offline")
