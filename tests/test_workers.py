"""``bastionmq start --workers N``: a supervisor and N worker processes that
share the listeners' ports (SO_REUSEPORT) and meet on the embedded nats-server.

Everything runs as an operator runs it: the ``bastionmq`` program, real
clients on the shared port, signals to the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import (MQTT_5, Disconnect, Puback, Publish, Subscribe,
                                    Subscription, Will)

from conftest import TIMEOUT, RawClient
from nats_peer import poll
from test_durable_crash import broker_command, broker_env, free_port

WORKERS = 3


def write_config(tmp_path: Path, port: int, api_port: int, nats_port: int,
                 extra: str = "") -> Path:
    config = tmp_path / "bastionmq.conf"
    config.write_text(f"""
node.data_dir = "{tmp_path / 'data'}"
allow_anonymous = true
listeners.tcp.default.bind = "127.0.0.1:{port}"
cluster {{ node_name = "t", heartbeat = 200ms, nats.servers = ["127.0.0.1:{nats_port}"] }}
http_api {{ enable = true, bind = "127.0.0.1:{api_port}", allow_loopback_without_key = true }}
{extra}
""", encoding="utf-8")
    return config


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Supervised:
    """``bastionmq start --workers N -c CONFIG``, its workers and its log."""

    def __init__(self, tmp_path: Path, extra: str = "", workers: int = WORKERS) -> None:
        self.port = free_port()
        self.api_port = free_port()
        self.nats_port = free_port()
        self.config = write_config(tmp_path, self.port, self.api_port, self.nats_port, extra)
        self.log_path = tmp_path / "supervisor.log"
        self.workers = workers
        self.process: subprocess.Popen | None = None
        self.nats_pid: int | None = None

    def start(self, wait: bool = True, cwd: Path | None = None) -> Supervised:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*broker_command(), "start", "-c", str(self.config),
                 "--workers", str(self.workers)],
                env=broker_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd)
        if wait:
            poll(lambda: "workers serving" in self.log or self.process.poll() is not None,
                 "the workers to start", timeout=4 * TIMEOUT)
            assert self.process.poll() is None, self.log
            self.nats_pid = self._nats_pid()
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _nats_pid(self) -> int | None:
        assert self.process is not None
        for pid in children(self.process.pid):
            if "nats-server" in command_line(pid)[0]:
                return pid
        return None

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid, as the supervisor's children say."""
        assert self.process is not None
        found = {}
        for pid in children(self.process.pid):
            words = command_line(pid)
            if "worker" in words and alive(pid):
                found[int(words[words.index("--index") + 1])] = pid
        return found

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}",
                                    timeout=TIMEOUT) as answer:
            return json.load(answer)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {node["node"]: node for node in self.api("/api/v1/cluster")["nodes"]}

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(4 * TIMEOUT)

    def close(self) -> None:
        pids = []
        if self.process is not None:
            pids = children(self.process.pid)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(TIMEOUT)
        for pid in pids + ([self.nats_pid] if self.nats_pid else []):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Any]:
    made: list[Supervised] = []

    def make(**kwargs: Any) -> Supervised:
        running = Supervised(tmp_path, **kwargs)
        made.append(running)
        return running

    yield make
    for running in made:
        running.close()


def paho_client(port: int, client_id: str = "", on_message: Any = None) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    if on_message is not None:
        client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_connections_spread_over_the_workers_and_messages_cross_them(supervised):
    running = supervised().start()
    received: dict[int, list[bytes]] = {}
    subscribers = []
    for index in range(30):
        received[index] = []
        client = paho_client(running.port, f"sub-{index}",
                             lambda c, u, message, index=index:
                             received[index].append(message.payload))
        client.subscribe("t/#", qos=1)[1]
        subscribers.append(client)
    # The kernel spread the connections: every worker has some.
    poll(lambda: all(node["clients"] > 0 for node in running.nodes().values())
         and len(running.nodes()) == WORKERS, "clients on every worker")
    assert sum(node["clients"] for node in running.nodes().values()) == 30
    time.sleep(0.2)  # the last SUBACKs' subscriptions reach NATS
    publishers = [paho_client(running.port, f"pub-{index}") for index in range(3)]
    sent = set()
    for index, publisher in enumerate(publishers):
        for seq in range(10):
            payload = f"{index}:{seq}".encode()
            publisher.publish(f"t/{index}", payload, qos=1).wait_for_publish(TIMEOUT)
            sent.add(payload)
    poll(lambda: all(len(got) >= len(sent) for got in received.values()),
         "every message at every subscriber")
    time.sleep(0.2)
    for got in received.values():
        assert sorted(got) == sorted(sent)  # each once, whichever worker it crossed from
    for client in subscribers + publishers:
        client.disconnect()
        client.loop_stop()
    assert running.terminate() == 0


def test_workers_start_where_a_bastionmq_folder_would_shadow_the_package(supervised, tmp_path):
    """Run from a directory holding a bastionmq/ folder (a checkout, with
    the package installed from it): the workers import the installed
    package, not the folder."""
    here = tmp_path / "checkout"
    (here / "bastionmq").mkdir(parents=True)
    (here / "bastionmq" / "__init__.py").write_text('raise SystemExit("the folder was imported")\n')
    running = supervised().start(cwd=here)
    assert sorted(running.worker_pids()) == [1, 2, 3]
    assert "the folder was imported" not in running.log
    assert running.terminate() == 0


def test_a_crashed_worker_is_started_again_under_its_name(supervised):
    running = supervised().start()
    before = running.worker_pids()
    assert sorted(before) == [1, 2, 3]
    started = running.nodes()["t-w2"]["started_at"]
    os.kill(before[2], signal.SIGKILL)
    poll(lambda: running.worker_pids().get(2) not in (None, before[2]),
         "worker 2 started again")
    poll(lambda: running.nodes().get("t-w2", {}).get("started_at", started) != started,
         "t-w2 back in the cluster")
    after = running.worker_pids()
    assert after[1] == before[1] and after[3] == before[3]
    assert "worker 2 (t-w2" in running.log and "exited (signal SIGKILL)" in running.log
    # It serves: a message goes round between clients wherever they landed.
    got: list[bytes] = []
    subscriber = paho_client(running.port, "after", lambda c, u, m: got.append(m.payload))
    subscriber.subscribe("again", qos=1)
    time.sleep(0.2)
    for index in range(6):
        publisher = paho_client(running.port)
        publisher.publish("again", str(index), qos=1).wait_for_publish(TIMEOUT)
        publisher.disconnect()
        publisher.loop_stop()
    poll(lambda: len(got) == 6, "the messages")
    subscriber.disconnect()
    subscriber.loop_stop()
    assert running.terminate() == 0


def test_signals_reach_every_worker(supervised, tmp_path):
    log_file = tmp_path / "bastionmq.log"
    running = supervised(extra=f'log.file.path = "{log_file}"').start()
    pids = running.worker_pids()
    running.config.write_text(running.config.read_text() + "mqtt.max_awaiting_rel = 17\n")
    running.process.send_signal(signal.SIGHUP)
    poll(lambda: running.log.count("(SIGHUP): mqtt.max_awaiting_rel") == WORKERS,
         "every worker reloaded")
    for index in range(1, WORKERS + 1):
        assert f"[t-w{index}] bastionmq: reloaded" in running.log
    # One writer: the supervisor writes the workers' lines to the file too.
    assert log_file.read_text().count("(SIGHUP): mqtt.max_awaiting_rel") == WORKERS
    # The reloaded value is the one each worker's clients get.
    for _ in range(6):
        client = RawClient(running.port, MQTT_5)
        assert client.connect("reload-check").properties["receive_maximum"] == 17
        client.close()
    # SIGTERM: every worker stops its clients (5.0: DISCONNECT 0x8B) and
    # exits, then the supervisor and its nats-server.
    client = RawClient(running.port, MQTT_5)
    client.connect("last")
    code = running.terminate()
    assert code == 0, running.log
    assert client.closing_reasons() == [0x8B]
    client.close()
    for pid in [*pids.values(), running.nats_pid]:
        poll(lambda pid=pid: not alive(pid), f"process {pid} gone")
    assert "did not stop" not in running.log


def test_workers_do_not_outlive_their_supervisor(supervised):
    running = supervised().start()
    pids = running.worker_pids()
    running.process.kill()
    running.process.wait(TIMEOUT)
    for pid in pids.values():
        poll(lambda pid=pid: not alive(pid), f"worker {pid} gone")


def test_a_listener_that_cannot_bind_stops_start_up(supervised):
    running = supervised()
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody can share it
        taken.bind(("127.0.0.1", running.port))
        taken.listen()
        running.start(wait=False)
        code = running.process.wait(4 * TIMEOUT)
    assert code == 1
    log = running.log
    assert "cannot open a listener" in log and "tcp:default" in log
    assert "worker 1 (t-w1) did not start" in log
    assert "workers serving" not in log and "--index 2" not in log
    # Nothing is left behind: the embedded nats-server went with it.
    poll(lambda: not _answers(running.nats_port), "the embedded nats-server gone")


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_second_supervisor_on_the_same_data_is_refused(supervised):
    first = supervised().start()
    second = Supervised.__new__(Supervised)
    second.__dict__.update(first.__dict__)
    second.process = None
    second.log_path = first.log_path.with_name("second.log")
    second.start(wait=False)
    assert second.process.wait(4 * TIMEOUT) == 1
    assert "another bastionmq supervisor runs with node.data_dir" in second.log
    assert first.process.poll() is None
    assert first.terminate() == 0


@pytest.mark.parametrize("config, workers, where", [
    ("node.workers = 0", None, "node.workers"),
    ("", "1000", "--workers"),
])
def test_bad_worker_counts_are_refused(tmp_path, config, workers, where):
    path = write_config(tmp_path, free_port(), free_port(), free_port(), config)
    command = [*broker_command(), "start", "-c", str(path)]
    if workers is not None:
        command += ["--workers", workers]
    result = subprocess.run(command, env=broker_env(), capture_output=True, text=True,
                            timeout=4 * TIMEOUT)
    assert result.returncode != 0
    assert where in result.stderr


def test_port_zero_cannot_be_shared_by_workers(tmp_path):
    path = tmp_path / "zero.conf"
    path.write_text(f'node.data_dir = "{tmp_path}"\nallow_anonymous = true\n'
                    'listeners.tcp.default.bind = "127.0.0.1:0"\n')
    result = subprocess.run([*broker_command(), "start", "-c", str(path), "--workers", "2"],
                            env=broker_env(), capture_output=True, text=True,
                            timeout=4 * TIMEOUT)
    assert result.returncode == 1
    assert "listeners.tcp.default.bind: port 0 gives each worker a port" in result.stderr


def test_a_persistent_session_follows_its_client_across_workers(supervised):
    """Reconnecting lands on any worker: Session Present 1 every time, and
    every message published meanwhile arrives once."""
    running = supervised().start()
    sender = paho_client(running.port, "sender")
    received: list[bytes] = []
    sent = []
    for index in range(20):
        client = RawClient(running.port, MQTT_5)
        connack = client.connect("roaming", clean_start=False,
                                 properties={"session_expiry_interval": 300})
        assert connack.reason_code == 0 and connack.session_present == (index > 0), index
        if index == 0:
            client.send(Subscribe(1, [Subscription("roam/#", qos=1)]))
            client.receive()  # SUBACK
        # What was queued while it was away (on whichever worker), then
        # one more message while it is connected here.
        payload = f"{index}".encode()
        sender.publish("roam/x", payload, qos=1).wait_for_publish(TIMEOUT)
        sent.append(payload)
        while len(received) < len(sent):
            packet = client.receive()
            if isinstance(packet, Publish):
                received.append(packet.payload)
                client.send(Puback(packet.packet_id))
        client.send(Disconnect(0))
        client.close()
        sender.publish("roam/x", f"{index}-away".encode(), qos=1).wait_for_publish(TIMEOUT)
        sent.append(f"{index}-away".encode())
    assert sorted(received) == sorted(sent[:-1])
    sender.disconnect()
    sender.loop_stop()
    assert running.terminate() == 0


def will_watcher(port: int) -> RawClient:
    """A client subscribed to the storms' wills, its subscription at NATS."""
    watcher = RawClient(port, MQTT_5)
    watcher.connect("will-watcher")
    watcher.send(Subscribe(1, [Subscription("storm/will", qos=1)]))
    watcher.receive()  # SUBACK
    time.sleep(0.2)
    return watcher


def storm(port: int, rounds: int, options: Any) -> tuple[list[Any], RawClient]:
    """Connect client id "storm" ``rounds`` times, with ``options(index)``,
    each time on whichever worker the kernel picks: each connection before
    the next must be closed as taken over (0x8E), wherever it was. The
    CONNACKs, and the last connection (still open)."""
    connacks = []
    previous = None
    for index in range(rounds):
        client = RawClient(port, MQTT_5)
        connacks.append(client.connect("storm", **options(index)))
        if previous is not None:
            assert previous.closing_reasons() == [0x8E], index
            previous.close()
        previous = client
    assert previous is not None
    return connacks, previous


def test_takeover_storm_across_workers(supervised):
    """One client id connecting again and again, each time on whichever
    worker the kernel picks: each earlier connection is closed with 0x8E,
    its will published exactly once, and one connection is left."""
    running = supervised().start()
    watcher = will_watcher(running.port)
    rounds = 1000
    connacks, last = storm(running.port, rounds, lambda index: {
        "will": Will("storm/will", str(index).encode(), qos=1)})
    assert all(c.reason_code == 0 and not c.session_present for c in connacks)
    wills = []
    while len(wills) < rounds - 1:
        packet = watcher.receive()
        if isinstance(packet, Publish):
            wills.append(int(packet.payload))
            if packet.qos:
                watcher.send(Puback(packet.packet_id))
    assert sorted(wills) == list(range(rounds - 1))
    last.send(Disconnect(0))
    last.close()
    # No more wills: the normal DISCONNECT of the last discards its will.
    watcher.sock.settimeout(0.5)
    with pytest.raises(OSError):
        watcher.sock.recv(1)
    watcher.close()
    assert running.terminate() == 0


def test_persistent_takeover_storm_across_workers(supervised):
    """The same storm with a persistent session and a delayed will: every
    takeover resumes the session (Session Present 1, wherever it was), no
    will goes out while the client keeps coming back, and when the last
    connection drops the will is published once, after its delay."""
    running = supervised().start()
    watcher = will_watcher(running.port)
    connacks, last = storm(running.port, 300, lambda index: {
        "clean_start": False, "keepalive": 0, "properties": {"session_expiry_interval": 300},
        "will": Will("storm/will", b"gone", qos=1, properties={"will_delay_interval": 1})})
    assert all(c.reason_code == 0 for c in connacks)
    assert [c.session_present for c in connacks] == [False] + [True] * 299
    last.close()  # dropped without DISCONNECT: the will, after its delay
    packet = watcher.receive()
    assert isinstance(packet, Publish) and packet.payload == b"gone"
    watcher.send(Puback(packet.packet_id))
    # Once: nothing else comes within a few will delays.
    with pytest.raises(OSError):
        watcher.receive(3.0)
    watcher.close()
    assert running.terminate() == 0
