"""Durable sessions survive the broker's death: what was acknowledged is delivered.

The broker runs as a real ``bastionmq start`` process with ``durable_sessions``
on. Persistent-session subscribers (MQTT 5 with a Session Expiry Interval, and
MQTT 3.1.1 with clean session = 0) subscribe and go offline; a publisher sends
QoS 1, QoS 2 and retained messages and waits for every acknowledgement; a
second burst is cut short by SIGKILL (or SIGTERM) at a random point. After a
restart every acknowledged message must reach every subscriber of it (QoS 2
exactly once, QoS 1 at least once) and every acknowledged retained value must
be there, or a later one, never an older one.

The random kill point comes from a seed printed at the start of each test;
``DURABLE_CRASH_SEED=<seed>`` in the environment replays one.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import paho.mqtt.client as paho
import pytest

from conftest import Client

#: The ``clients`` fixture of conftest: makes a connected Client, disconnected at teardown.
MakeClient = Callable[..., Client]

#: Seconds for one client operation, and for the broker to start or stop.
TIMEOUT = 20.0
#: Seconds the subscribers have, after the restart, to receive what they are owed.
DELIVERY_DEADLINE = 20.0
SESSION_EXPIRY = 3600

#: Messages of each QoS in the first burst, all acknowledged before the second.
FIRST_BURST = 200
#: Rounds of the second burst: one QoS 1 and one QoS 2 message each, and a
#: retained update every RETAINED_EVERY rounds; the broker dies within it.
SECOND_BURST = 300
RETAINED_EVERY = 5
RETAINED_TOPICS = 20
#: paho's in-flight limit, and how many publishes may await their
#: acknowledgement at once: small, so that acknowledgements come in steadily
#: during a burst rather than all at its end.
PAHO_INFLIGHT = 20
PUBLISH_WINDOW = 30

#: The group commit interval (the default, stated because KILL_JITTER is sized
#: to it).
COMMIT_INTERVAL_MS = 5
#: Seconds the stop may come after the publish chosen at random: up to one
#: commit interval, so that it lands anywhere between an acknowledgement's
#: arrival and the commits that follow, where an acknowledgement sent before
#: its commit would be caught. Longer jitter mostly lands after the commit.
KILL_JITTER = COMMIT_INTERVAL_MS / 1000

BURST_Q1 = "crash/burst/q1"
BURST_Q2 = "crash/burst/q2"
RETAINED_FILTER = "crash/retained/+"
MARKER = b"marker"


def retained_topic(index: int) -> str:
    return f"crash/retained/{index:02d}"


def retained_payload(index: int, seq: int) -> bytes:
    return f"retained-{index:02d}-seq-{seq:04d}".encode()


def retained_seq(payload: bytes) -> int:
    return int(payload.rsplit(b"-", 1)[1])


@dataclass(frozen=True)
class SubscriberSpec:
    client_id: str
    version: int
    #: (filter, QoS) pairs.
    subscriptions: tuple[tuple[str, int], ...]

    @property
    def qos2_exactly_once(self) -> bool:
        """Whether QoS 2 messages reach it at QoS 2 (else downgraded to QoS 1)."""
        return max(qos for topic_filter, qos in self.subscriptions
                   if paho.topic_matches_sub(topic_filter, BURST_Q2)) == 2


SUBSCRIBERS = (
    SubscriberSpec("durable-v5-qos1", paho.MQTTv5, (("crash/burst/+", 1),)),
    SubscriberSpec("durable-v5-qos2", paho.MQTTv5, (("crash/burst/+", 2),)),
    SubscriberSpec("durable-v311", paho.MQTTv311, ((BURST_Q1, 1), (BURST_Q2, 2))),
)


# ------------------------------------------------------------------ the broker process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_command() -> list[str]:
    """``bastionmq`` as an operator runs it (bastionmq.cli has no ``__main__``)."""
    path = shutil.which("bastionmq")
    assert path is not None, "the bastionmq console script is not installed (pip install -e .)"
    return [path]


def broker_env() -> dict[str, str]:
    """The test's environment without BASTIONMQ_* overrides that would change the config."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("BASTIONMQ_")}


def write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "bastionmq.conf"
    config.write_text(f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
allow_anonymous = true
log.level = info
# Every message counts here: no queue limit may drop the oldest (default 1000).
mqtt.max_mqueue_len = 0
durable_sessions {{
  enable = true
  data_dir = "{tmp_path / 'store'}"
  commit_interval = {COMMIT_INTERVAL_MS}ms
}}
""", encoding="utf-8")
    return config


class BrokerProcess:
    """``bastionmq start -c CONFIG``, started again as often as needed; each
    run's stderr goes to its own file."""

    def __init__(self, config: Path, port: int, log_dir: Path) -> None:
        self.config = config
        self.port = port
        self.log_dir = log_dir
        self.logs: list[Path] = []
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.log_dir / f"broker-stderr-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [*broker_command(), "start", "-c", str(self.config)], env=broker_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"bastionmq exited with {self.process.returncode}:\n{self.stderr}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT).close()
                return
            except ConnectionRefusedError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bastionmq did not listen on {self.port} within {TIMEOUT}s:\n"
                            f"{self.stderr}")
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        """The current (last) run's stderr."""
        return self.logs[-1].read_text(encoding="utf-8", errors="replace") if self.logs else ""

    def all_stderr(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(encoding='utf-8', errors='replace')}"
                         for log in self.logs)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(TIMEOUT)

    def terminate(self) -> None:
        """SIGTERM, the graceful stop: it must exit on its own with status 0."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(TIMEOUT)
        assert code == 0, f"bastionmq exited with {code} after SIGTERM:\n{self.stderr}"

    def restored_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if "restored from" in line]
        assert len(lines) == 1, f"expected one 'restored from' line:\n{self.stderr}"
        return lines[0]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    port = free_port()
    process = BrokerProcess(write_config(tmp_path, port), port, tmp_path)
    try:
        yield process
    finally:
        process.close()


# ------------------------------------------------------------------ the publisher


@dataclass
class Sent:
    """One publish and paho's record of its acknowledgement."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    info: paho.MQTTMessageInfo

    @property
    def acknowledged(self) -> bool:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) came back."""
        try:
            return self.info.is_published()
        except (RuntimeError, ValueError):  # paho never sent it: the connection was gone
            return False


class Publisher:
    """An MQTT 5 publisher that keeps at most PUBLISH_WINDOW publishes awaiting
    their acknowledgement, and remembers every publish."""

    def __init__(self, port: int) -> None:
        self.paho = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="crash-publisher",
                                protocol=paho.MQTTv5)
        self.paho.max_inflight_messages_set(PAHO_INFLIGHT)
        self.sent: list[Sent] = []
        #: Acknowledgements with an error reason code: none is expected.
        self.refusals: list[tuple[int, str]] = []
        self._window: deque[Sent] = deque()
        connacks: queue.Queue = queue.Queue()
        self.paho.on_connect = lambda client, userdata, flags, rc, props: connacks.put(rc)
        self.paho.on_publish = self._on_publish
        self.paho.connect("127.0.0.1", port, clean_start=True)
        self.paho.loop_start()
        reason = connacks.get(timeout=TIMEOUT)
        assert not reason.is_failure, f"publisher refused: {reason}"

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason_code: paho.ReasonCode, properties: object) -> None:
        if reason_code.is_failure:
            self.refusals.append((mid, str(reason_code)))

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                stop: threading.Event | None = None) -> bool:
        """Publish once the window has room; False when ``stop`` is set first."""
        if not self._make_room(stop):
            return False
        info = self.paho.publish(topic, payload, qos, retain)
        sent = Sent(topic, payload, qos, retain, info)
        self.sent.append(sent)
        self._window.append(sent)
        return True

    def _make_room(self, stop: threading.Event | None) -> bool:
        """Wait for the oldest publishes' acknowledgements. Without ``stop``
        (the broker is meant to be up) they must come within TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while len(self._window) >= PUBLISH_WINDOW:
            oldest = self._window[0]
            if oldest.acknowledged:
                self._window.popleft()
                continue
            if stop is not None and stop.is_set():
                return False
            if stop is None and time.monotonic() > deadline:
                raise AssertionError(f"no acknowledgement of {oldest.payload!r} "
                                     f"within {TIMEOUT}s")
            try:
                oldest.info.wait_for_publish(0.05)
            except RuntimeError:  # never sent: the broker is gone, wait for ``stop``
                if stop is None:
                    raise
                stop.wait(0.05)
        return True

    def wait_all_acknowledged(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        for sent in self.sent:
            sent.info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            assert sent.acknowledged, f"no acknowledgement of {sent.payload!r} within {TIMEOUT}s"
        self._window.clear()

    def acknowledged(self) -> list[Sent]:
        return [sent for sent in self.sent if sent.acknowledged]

    def close(self) -> None:
        """Stop the network thread, so that paho never reconnects (to the
        restarted broker) and resends what was not acknowledged."""
        self.paho.disconnect()
        self.paho.loop_stop()


# ------------------------------------------------------------------ the scenario


@dataclass
class SecondBurst:
    """The burst the broker dies in: published from a thread, cut short by ``stop``."""

    publisher: Publisher
    #: How many publishes before the broker is stopped (the random point).
    stop_after: int
    stop: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    #: The last retained value published per topic index.
    retained_updates: dict[int, int] = field(default_factory=dict)

    def run(self) -> None:
        try:
            self._publish_all()
        except BaseException as exc:  # reported by the test's thread
            self.errors.append(exc)
        finally:
            self.reached.set()

    def _publish_all(self) -> None:
        count = 0
        for n in range(SECOND_BURST):
            batch = [(BURST_Q1, f"q1-burst2-{n}".encode(), 1, False),
                     (BURST_Q2, f"q2-burst2-{n}".encode(), 2, False)]
            if n % RETAINED_EVERY == 0:
                index = (n // RETAINED_EVERY) % RETAINED_TOPICS
                seq = self.retained_updates[index] = self.retained_updates.get(index, 0) + 1
                # Alternate the QoS of retained updates so both flows are covered.
                batch.append((retained_topic(index), retained_payload(index, seq),
                              1 + seq % 2, True))
            for topic, payload, qos, retain in batch:
                if not self.publisher.publish(topic, payload, qos, retain, self.stop):
                    return
                count += 1
                if count == self.stop_after:
                    self.reached.set()

    @staticmethod
    def total() -> int:
        return 2 * SECOND_BURST + len(range(0, SECOND_BURST, RETAINED_EVERY))


def subscribe_and_go_offline(port: int, clients: MakeClient) -> None:
    """Every persistent subscriber subscribes (SUBACK awaited) and disconnects cleanly."""
    for spec in SUBSCRIBERS:
        client = connect_subscriber(port, clients, spec)
        assert not client.session_present, f"{spec.client_id}: a stale session"
        for topic_filter, qos in spec.subscriptions:
            assert client.subscribe(topic_filter, qos) == [qos]
        client.disconnect()


def connect_subscriber(port: int, clients: MakeClient, spec: SubscriberSpec) -> Client:
    """Connect with clean start / clean session off, and (5.0) a session expiry."""
    expiry = SESSION_EXPIRY if spec.version == paho.MQTTv5 else None
    return clients(port, client_id=spec.client_id, version=spec.version, clean=False,
                   session_expiry=expiry)


def publish_first_burst(publisher: Publisher) -> None:
    """FIRST_BURST messages of each QoS and every retained topic, all acknowledged."""
    for n in range(FIRST_BURST):
        publisher.publish(BURST_Q1, f"q1-burst1-{n}".encode(), 1)
        publisher.publish(BURST_Q2, f"q2-burst1-{n}".encode(), 2)
    for index in range(RETAINED_TOPICS):
        publisher.publish(retained_topic(index), retained_payload(index, 0), 1 + index % 2,
                          retain=True)
    publisher.wait_all_acknowledged()
    assert publisher.refusals == []


def stop_during_second_burst(publisher: Publisher, rng: random.Random,
                             stop_broker: Callable[[], None]) -> SecondBurst:
    """Publish the second burst in a thread and stop the broker at a random point of it."""
    burst = SecondBurst(publisher, stop_after=rng.randrange(1, SecondBurst.total()))
    jitter = rng.uniform(0.0, KILL_JITTER)
    thread = threading.Thread(target=burst.run, daemon=True)
    thread.start()
    try:
        assert burst.reached.wait(TIMEOUT), "the second burst did not reach its stop point"
        time.sleep(jitter)
        stop_broker()
    finally:
        burst.stop.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive(), "the publishing thread did not stop"
    if burst.errors:
        raise burst.errors[0]
    print(f"broker stopped after {burst.stop_after} of the second burst's "
          f"{SecondBurst.total()} publishes (+{jitter * 1000:.1f} ms)")
    return burst


def collect(client: Client, expected: set[bytes], deadline: float) -> list[paho.MQTTMessage]:
    """Messages until every payload in ``expected`` and then the marker have
    arrived, or the deadline passes. The marker is published after the
    restart, so it queues behind everything restored: whatever comes before
    it is all the broker kept, duplicates included."""
    got: list[paho.MQTTMessage] = []
    missing = set(expected)
    marker_seen = False
    while missing or not marker_seen:
        # The deadline is shared by all subscribers, which receive at the
        # same time: once it has passed, take what has already arrived.
        remaining = deadline - time.monotonic()
        try:
            message = (client.messages.get(timeout=remaining) if remaining > 0
                       else client.messages.get_nowait())
        except queue.Empty:
            break
        got.append(message)
        missing.discard(message.payload)
        marker_seen = marker_seen or message.payload == MARKER
    return got


def retained_values(port: int, clients: MakeClient) -> dict[str, bytes]:
    """What a fresh subscriber to the retained topics gets (the last value per topic)."""
    client = clients(port, client_id="retained-reader", version=paho.MQTTv5)
    assert client.subscribe(RETAINED_FILTER, 1) == [1]
    values: dict[str, bytes] = {}
    deadline = time.monotonic() + DELIVERY_DEADLINE
    while len(values) < RETAINED_TOPICS and time.monotonic() < deadline:
        try:
            message = client.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        assert message.retain, f"{message.topic} {message.payload!r} without the retain flag"
        values[message.topic] = message.payload
    return values


def sample(items: set[bytes], limit: int = 10) -> list[bytes]:
    return sorted(items)[:limit]


def check_deliveries(port: int, clients: MakeClient, publisher: Publisher,
                     context: str) -> None:
    """After the restart: each subscriber gets every acknowledged message owed to
    it (QoS 2 exactly once where subscribed at QoS 2, else at least once)."""
    acknowledged = publisher.acknowledged()
    ack_q1 = {sent.payload for sent in acknowledged if sent.topic == BURST_Q1}
    ack_q2 = {sent.payload for sent in acknowledged if sent.topic == BURST_Q2}
    published = {sent.payload for sent in publisher.sent} | {MARKER}
    print(f"acknowledged before the stop: {len(ack_q1)} QoS 1 and {len(ack_q2)} QoS 2 "
          f"of {len(publisher.sent)} publishes")

    subscribers = {}
    for spec in SUBSCRIBERS:
        client = subscribers[spec] = connect_subscriber(port, clients, spec)
        assert client.session_present, f"{spec.client_id}: the session was not restored"
    # Queued behind everything restored; see ``collect``.
    marker = clients(port, client_id="crash-marker", version=paho.MQTTv5)
    marker.publish(BURST_Q2, MARKER, qos=2)

    deadline = time.monotonic() + DELIVERY_DEADLINE
    problems: list[str] = []
    for spec, client in subscribers.items():
        got = collect(client, ack_q1 | ack_q2, deadline)
        counts = Counter(message.payload for message in got)
        missing = (ack_q1 | ack_q2) - set(counts)
        unknown = set(counts) - published
        if missing:
            problems.append(f"{spec.client_id}: {len(missing)} acknowledged messages missing, "
                            f"e.g. {sample(missing)}")
        if unknown:
            problems.append(f"{spec.client_id}: messages never published: {sample(unknown)}")
        if MARKER not in counts:
            problems.append(f"{spec.client_id}: the marker published after the restart "
                            "did not arrive")
        if spec.qos2_exactly_once:
            # Exactly once holds for every QoS 2 message, acknowledged or not.
            twice = {payload for payload, count in counts.items()
                     if count > 1 and payload.startswith(b"q2-")}
            if twice:
                problems.append(f"{spec.client_id}: {len(twice)} QoS 2 messages delivered "
                                f"more than once, e.g. {sample(twice)}")
            downgraded = {message.payload for message in got
                          if message.topic == BURST_Q2 and message.qos != 2}
            if downgraded:
                problems.append(f"{spec.client_id}: QoS 2 messages delivered at a lower QoS, "
                                f"e.g. {sample(downgraded)}")
    assert not problems, "\n".join([context, *problems])


def check_retained(port: int, clients: MakeClient, publisher: Publisher,
                   context: str) -> None:
    """Each retained topic holds its last acknowledged value or a later one published."""
    last_acknowledged: dict[str, int] = {}
    last_published: dict[str, int] = {}
    for sent in publisher.sent:
        if sent.retain:
            seq = retained_seq(sent.payload)
            last_published[sent.topic] = max(seq, last_published.get(sent.topic, -1))
            if sent.acknowledged:
                last_acknowledged[sent.topic] = max(seq, last_acknowledged.get(sent.topic, -1))
    assert len(last_acknowledged) == RETAINED_TOPICS  # the first burst set them all

    values = retained_values(port, clients)
    problems = []
    for topic, acked in sorted(last_acknowledged.items()):
        value = values.get(topic)
        if value is None:
            problems.append(f"{topic}: no retained message (value {acked} was acknowledged)")
            continue
        seq = retained_seq(value)
        if not acked <= seq <= last_published[topic]:
            problems.append(f"{topic}: retained value {seq}, but {acked} was acknowledged "
                            f"and {last_published[topic]} was the last published")
    assert not problems, "\n".join([context, *problems])


def run_scenario(broker: BrokerProcess, clients: MakeClient, stop: Callable[[], None],
                 how: str) -> None:
    """Subscribe and go offline, publish two bursts, ``stop`` the broker during
    the second, restart it and check everything acknowledged is there."""
    seed = int(os.environ.get("DURABLE_CRASH_SEED") or random.randrange(2**32))
    print(f"seed {seed} (DURABLE_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)

    broker.start()
    subscribe_and_go_offline(broker.port, clients)
    publisher = Publisher(broker.port)
    try:
        publish_first_burst(publisher)
        stop_during_second_burst(publisher, rng, stop)
    finally:
        publisher.close()
    assert publisher.refusals == [], "acknowledgements with an error reason code"

    broker.start()
    restored = broker.restored_line()
    print(restored)
    assert f"{len(SUBSCRIBERS)} sessions with " \
           f"{sum(len(spec.subscriptions) for spec in SUBSCRIBERS)} subscriptions" in restored
    assert f"{RETAINED_TOPICS} retained messages" in restored

    context = f"seed {seed}, broker {how}; broker logs:\n{broker.all_stderr()}"
    check_deliveries(broker.port, clients, publisher, context)
    check_retained(broker.port, clients, publisher, context)
    assert "Traceback" not in broker.all_stderr(), broker.all_stderr()


def test_acknowledged_messages_survive_sigkill(broker: BrokerProcess,
                                               clients: MakeClient) -> None:
    """SIGKILL at a random point of the second burst: whatever was acknowledged
    before it is delivered after the restart."""
    run_scenario(broker, clients, broker.kill, "killed with SIGKILL")


def test_acknowledged_messages_survive_a_graceful_stop(broker: BrokerProcess,
                                                       clients: MakeClient) -> None:
    """SIGTERM at a random point of the second burst: the broker exits with
    status 0, and after the restart every message published and acknowledged
    is delivered."""
    run_scenario(broker, clients, broker.terminate, "stopped with SIGTERM")


def test_the_wills_of_clients_cut_off_by_sigkill_are_published_after_the_restart(
        broker: BrokerProcess, clients: MakeClient, tmp_path: Path) -> None:
    """A crash ends every connection without DISCONNECT: after the restart
    the wills of the clients it cut off are published, a retained one stays
    retained."""
    broker.start()
    watcher = clients(broker.port, client_id="will-watcher", version=paho.MQTTv5, clean=False,
                      session_expiry=SESSION_EXPIRY)
    watcher.subscribe("crash/status/+", 1)
    watcher.disconnect()
    for n, version in enumerate((paho.MQTTv311, paho.MQTTv5)):
        clients(broker.port, client_id=f"device-{n}", version=version,
                will=(f"crash/status/device-{n}", b"offline", 1, True))
    # Recorded at CONNECT, written by the next commit, a few milliseconds on.
    assert sqlite3_rows(tmp_path / "store" / "sessions.sqlite3",
                        "SELECT count(*) FROM wills", expect=[(2,)]) == [(2,)]
    broker.kill()

    broker.start()
    assert "2 wills fell due" in broker.restored_line()
    watcher = clients(broker.port, client_id="will-watcher", version=paho.MQTTv5, clean=False,
                      session_expiry=SESSION_EXPIRY)
    got = sorted((m.topic, m.payload) for m in watcher.expect(2, timeout=TIMEOUT))
    assert got == [("crash/status/device-0", b"offline"), ("crash/status/device-1", b"offline")]
    reader = clients(broker.port)
    reader.subscribe("crash/status/+", 1)
    assert sorted(m.payload for m in reader.expect(2)) == [b"offline", b"offline"]


def test_a_will_restored_after_sigkill_is_authorized_as_its_client(
        broker: BrokerProcess, clients: MakeClient, tmp_path: Path) -> None:
    """The store keeps the listener (and address, certificate, superuser
    flag) of a will's client: a rule on the listener denies the will after
    a crash as it would have on a normal disconnect."""
    public = free_port()
    acl = tmp_path / "acl.conf"
    acl.write_text('{deny, {listener, "tcp:public"}, publish, ["crash/#"]}.\n{allow, all}.\n')
    with open(broker.config, "a", encoding="utf-8") as config:
        config.write(f'listeners.tcp.public {{ bind = "127.0.0.1:{public}" }}\n'
                     f'authorization {{ sources = [ {{ type = file, path = "{acl}" }} ] }}\n')
    broker.start()
    watcher = clients(broker.port, client_id="will-watcher", version=paho.MQTTv5, clean=False,
                      session_expiry=SESSION_EXPIRY)
    watcher.subscribe("crash/status/+", 1)
    watcher.disconnect()
    clients(public, client_id="outside", will=("crash/status/outside", b"offline", 1, False))
    clients(broker.port, client_id="inside", will=("crash/status/inside", b"offline", 1, False))
    assert sqlite3_rows(tmp_path / "store" / "sessions.sqlite3",
                        "SELECT count(*) FROM wills", expect=[(2,)]) == [(2,)]
    broker.kill()

    broker.start()
    watcher = clients(broker.port, client_id="will-watcher", version=paho.MQTTv5, clean=False,
                      session_expiry=SESSION_EXPIRY)
    got = [(m.topic, m.payload) for m in watcher.expect(1, timeout=TIMEOUT)]
    assert got == [("crash/status/inside", b"offline")]
    watcher.expect_nothing_more("crash/status/marker")
    assert "not publishing the will of 'outside'" in broker.stderr


def sqlite3_rows(path: Path, query: str, expect: list[tuple]) -> list[tuple]:
    """``query``'s rows once they are ``expect`` (the broker commits within
    milliseconds), or what they are after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        db = sqlite3.connect(path)
        try:
            found = db.execute(query).fetchall()
        finally:
            db.close()
        if found == expect or time.monotonic() > deadline:
            return found
        time.sleep(0.02)
