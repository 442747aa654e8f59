"""How long moving a client between nodes takes, and how soon a retained
message set on one node is seen on another.

- ``live``: one client id connecting again and again (1,000 times by
  default) to ``bastionmq start --workers 3``, each connection landing on
  whichever worker the kernel picks. For each: CONNECT -> CONNACK of the new
  connection, and CONNECT -> the old connection closed (DISCONNECT 0x8E),
  which is when the takeover is complete wherever the old one was. The same
  against one process (``--workers 1``) for comparison. Each twice: with a
  clean session (the takeover is the claim every node hears), and with a
  persistent one (Clean Start 0: the session, with its subscription, moves
  to the new connection's worker; Session Present 1 is checked).
- ``dead-owner``: 300 clients connected to 3 workers, one worker killed
  with SIGKILL; the clients it held reconnect at once: CONNECT -> CONNACK,
  and the time from the kill until every one is connected again.
- ``retained``: two nodes on one nats-server; a retained message set on
  node A (after its PUBACK), then, after a pause of d, a SUBSCRIBE on node B:
  the share of SUBSCRIBEs that get the new value, for each d.

Every broker-side process is pinned to one core (``--broker-cpu``), this
script to the other (``--gen-cpu``).

    python benchmarks/takeover.py --rounds 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bastionmq.broker.codec import (MQTT_5, Connect, Decoder, Publish, Subscribe,
                                    Subscription, Unsubscribe, encode)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cluster import Processes, free_port, stop, wait_port  # noqa: E402


class Raw:
    """A client on a plain socket, through the project's codec."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder(MQTT_5)
        self.pending: list = []

    def send(self, packet) -> None:
        self.sock.sendall(encode(packet, MQTT_5))

    def receive(self):
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def until_closed(self) -> None:
        try:
            while True:
                self.receive()
        except (ConnectionError, OSError):
            pass

    def close(self) -> None:
        self.sock.close()


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)
    return {"n": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)}


def start_workers(workdir: Path, workers: int, cpu: int, bastionmq: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    data = workdir / f"workers-{workers}"
    data.mkdir()
    conf = workdir / f"workers-{workers}.conf"
    conf.write_text(
        f'listeners.tcp.default {{ bind = "127.0.0.1:{port}", max_connections = infinity }}\n'
        f'allow_anonymous = true\nnode.data_dir = "{data}"\nhttp_api.enable = false\n'
        f'log.level = warning\n'
        f'cluster.nats.servers = ["127.0.0.1:{free_port()}"]\n')
    with open(workdir / f"workers-{workers}.log", "wb") as out:
        process = subprocess.Popen(["taskset", "-c", str(cpu), *bastionmq.split(), "start",
                                    "-c", str(conf), "--workers", str(workers)],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, process, "bastionmq")
    time.sleep(1.0 if workers > 1 else 0.1)  # every worker listening
    return process, port


def worker_pids(supervisor: int) -> dict[int, int]:
    found = {}
    for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "worker" in words:
            found[int(words[words.index("--index") + 1])] = int(pid)
    return found


def live(port: int, rounds: int, persistent: bool = False) -> dict:
    """``persistent``: Clean Start 0 with a Session Expiry Interval, so that
    the session moves with each takeover (1 subscription, nothing queued)."""
    connack, complete = [], []
    previous = None
    options = ({"clean_start": False, "properties": {"session_expiry_interval": 300}}
               if persistent else {})
    client_id = "bench-persistent" if persistent else "bench-takeover"
    for index in range(rounds):
        client = Raw(port)
        start = time.perf_counter()
        client.send(Connect(client_id, MQTT_5, **options))
        answer = client.receive()
        if persistent and index and not answer.session_present:
            raise AssertionError("a takeover without the session")
        connack.append(time.perf_counter() - start)
        if persistent and index == 0:
            client.send(Subscribe(1, [Subscription("bench/persistent/#", qos=1)]))
            client.receive()
        if previous is not None:
            previous.until_closed()
            complete.append(time.perf_counter() - start)
            previous.close()
        previous = client
    assert previous is not None
    previous.close()
    return {"connack": percentiles(connack), "old_closed": percentiles(complete)}


def dead_owner(supervisor: subprocess.Popen, port: int, clients: int) -> dict:
    connected = {}
    for index in range(clients):
        client = Raw(port)
        client.send(Connect(f"bench-dead-{index}", MQTT_5, keepalive=60))
        client.receive()
        connected[index] = client
    time.sleep(0.5)
    victim = worker_pids(supervisor.pid)[2]
    os.kill(victim, signal.SIGKILL)
    killed = time.perf_counter()
    # The victim's clients see their socket closed (the others' stay open)
    # and connect again at once, as a client would; done when no socket has
    # closed for 200 ms.
    lost, samples = [], []
    resets = 0
    last_back = killed
    with selectors.DefaultSelector() as selector:
        for index, client in connected.items():
            selector.register(client.sock, selectors.EVENT_READ, index)
        quiet_since = time.perf_counter()
        while time.perf_counter() - quiet_since < 0.2:
            for key, _ in selector.select(timeout=0.01):
                index = key.data
                selector.unregister(key.fileobj)
                connected[index].close()
                lost.append(index)
                start = time.perf_counter()
                while True:
                    try:
                        client = Raw(port)
                        client.send(Connect(f"bench-dead-{index}", MQTT_5))
                        client.receive()
                        break
                    except OSError:
                        # Reset: it was queued on the dead worker's socket
                        # (Linux drops those); a client tries again.
                        client.close()
                        resets += 1
                last_back = time.perf_counter()
                samples.append(last_back - start)
                connected[index] = client
                quiet_since = last_back
    everyone = last_back - killed
    for client in connected.values():
        client.close()
    return {"clients": clients, "on_killed_worker": len(lost), "reset_once_more": resets,
            "connack": percentiles(samples) if samples else None,
            "kill_to_all_back_ms": round(everyone * 1e3, 1)}


def retained(port_a: int, port_b: int, trials: int, pauses_ms: list[float]) -> dict:
    publisher, subscriber = Raw(port_a), Raw(port_b)
    publisher.send(Connect("bench-ret-pub", MQTT_5))
    publisher.receive()
    subscriber.send(Connect("bench-ret-sub", MQTT_5))
    subscriber.receive()
    seen: dict[str, float] = {}
    # A first value, on both nodes before the trials: every SUBSCRIBE on B
    # then gets one, the new value or (not yet converged) the one before.
    publisher.send(Publish("bench/retained", b"first", qos=1, retain=True, packet_id=1))
    publisher.receive()
    time.sleep(0.5)
    packet_id = 1
    for pause in pauses_ms:
        fresh = 0
        for trial in range(trials):
            packet_id = packet_id % 60000 + 1
            value = f"{pause}:{trial}".encode()
            publisher.send(Publish("bench/retained", value, qos=1, retain=True,
                                   packet_id=packet_id))
            publisher.receive()  # PUBACK
            if pause:
                time.sleep(pause / 1e3)
            subscriber.send(Subscribe(packet_id, [Subscription("bench/retained")]))
            # SUBACK, then the retained message node B has: the new value,
            # or (not yet converged) the one before.
            got = None
            while got is None:
                packet = subscriber.receive()
                if isinstance(packet, Publish):
                    got = packet.payload
                    if packet.qos:
                        raise AssertionError("subscribed at QoS 0")
            fresh += got == value
            subscriber.send(Unsubscribe(packet_id, ["bench/retained"]))
            while subscriber.receive().type != 11:  # UNSUBACK
                pass
        seen[f"{pause}ms"] = round(fresh / trials, 4)
    publisher.close()
    subscriber.close()
    return seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--pauses", default="0,0.5,1,2,5")
    parser.add_argument("--broker-cpu", type=int, default=0)
    parser.add_argument("--gen-cpu", type=int, default=1)
    parser.add_argument("--bastionmq-cmd", default=shutil.which("bastionmq") or "bastionmq")
    parser.add_argument("--nats-server", default=shutil.which("nats-server")
                        or "/usr/sbin/nats-server")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.gen_cpu})
    results: dict[str, list] = {"live-1-process": [], "live-3-workers": [],
                                "live-1-process-persistent": [],
                                "live-3-workers-persistent": [],
                                "dead-owner": [], "retained": []}
    for run in range(args.runs):
        workdir = Path(tempfile.mkdtemp(prefix="bmq-takeover-bench-"))
        try:
            for workers in (1, 3):
                process, port = start_workers(workdir, workers, args.broker_cpu,
                                              args.bastionmq_cmd)
                try:
                    key = "live-1-process" if workers == 1 else "live-3-workers"
                    results[key].append(live(port, args.rounds))
                    results[key + "-persistent"].append(live(port, args.rounds, True))
                    if workers == 3:
                        results["dead-owner"].append(dead_owner(process, port, args.clients))
                finally:
                    stop(process)
            processes = Processes(workdir, args.broker_cpu, args.bastionmq_cmd, args.nats_server)
            try:
                _, nats_port = processes.nats()
                _, port_a = processes.node("a", nats_port)
                _, port_b = processes.node("b", nats_port)
                time.sleep(0.5)
                results["retained"].append(retained(
                    port_a, port_b, args.trials, [float(p) for p in args.pauses.split(",")]))
            finally:
                processes.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(json.dumps({key: runs[-1] for key, runs in results.items()}), flush=True)
    summary = {}
    for key in ("live-1-process", "live-3-workers", "live-1-process-persistent",
                "live-3-workers-persistent"):
        for what in ("connack", "old_closed"):
            for q in ("p50_ms", "p99_ms"):
                summary[f"{key} {what} {q}"] = statistics.median(r[what][q] for r in results[key])
    summary["dead-owner connack p99_ms"] = statistics.median(
        r["connack"]["p99_ms"] for r in results["dead-owner"] if r["connack"])
    summary["dead-owner kill_to_all_back_ms"] = statistics.median(
        r["kill_to_all_back_ms"] for r in results["dead-owner"])
    for pause in results["retained"][0]:
        summary[f"retained seen after {pause}"] = statistics.median(
            r[pause] for r in results["retained"])
    print(json.dumps({"median_of_runs": summary}, indent=1))


if __name__ == "__main__":
    main()
