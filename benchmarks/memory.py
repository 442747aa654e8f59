"""What one client's subscriptions and many distinct topics cost a broker in
memory, beside Mosquitto in the same run.

    python benchmarks/memory.py [--brokers bastionmq,mosquitto] [--runs 3]

For each broker (started fresh, pinned to core 0, on a free loopback port):
- subscriptions: one client subscribes to --subscriptions distinct filters
  (``m/<n>/+``, 1,000 per SUBSCRIBE); the figure is the growth of the
  broker's resident memory, per subscription;
- topics: one client publishes QoS 0 to --topics distinct topic names
  (``t/<n>``) with nobody subscribed; the figure is the growth, per topic
  (what the routing match cache keeps of topics nobody reads);
- long topics: the same with --long-topics names of 60,000 characters.
Resident memory is read from /proc/PID/status (VmRSS) once the broker has
answered a PINGREQ sent after the load. Prints a table of medians and the
bastionmq/mosquitto ratios.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import loadgen  # noqa: E402


def _client(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(loadgen.connect(client_id))
    assert sock.recv(4) == loadgen.CONNACK_OK
    return sock


def _settled(sock: socket.socket) -> None:
    """Everything sent before has been handled: the PINGRESP is behind it."""
    sock.sendall(b"\xc0\x00")
    data = b""
    while not data.endswith(b"\xd0\x00"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the broker")
        data += chunk


def _subscribe_many(port: int, count: int) -> None:
    sock = _client(port, "memory-subscriber")
    for start in range(0, count, 1000):
        body = b"\x00\x01" + b"".join(loadgen._str(f"m/{n}/+") + b"\x00"
                                      for n in range(start, min(count, start + 1000)))
        sock.sendall(loadgen._packet(0x82, body))
    _settled(sock)
    sock.close()


def _publish_topics(port: int, names) -> None:
    sock = _client(port, "memory-publisher")
    batch = []
    for name in names:
        batch.append(loadgen.publish(name, b"x"))
        if len(batch) == 1000:
            sock.sendall(b"".join(batch))
            batch.clear()
    sock.sendall(b"".join(batch))
    _settled(sock)
    sock.close()


def measure(name: str, cmd: str, args, tmp: Path) -> dict:
    loads = {
        "subscriptions": (args.subscriptions, lambda port: _subscribe_many(port, args.subscriptions)),
        "topics": (args.topics, lambda port: _publish_topics(
            port, (f"t/{n}" for n in range(args.topics)))),
        "long topics": (args.long_topics, lambda port: _publish_topics(
            port, (f"l/{n}/" + "x" * 60_000 for n in range(args.long_topics)))),
    }
    result = {}
    for what, (count, load) in loads.items():
        with compare.Broker(name, cmd, args.broker_cpu, tmp, None, "", False, tmp, what) as broker:
            _settled(_client(broker.port, "memory-probe"))
            before = loadgen.rss_kib(broker.proc.pid)
            load(broker.port)
            time.sleep(0.5)
            after = loadgen.rss_kib(broker.proc.pid)
        result[what] = {"count": count, "rss_before_kib": before, "rss_after_kib": after,
                        "bytes_each": round((after - before) * 1024 / count)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brokers", default="bastionmq,mosquitto")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--subscriptions", type=int, default=10_000)
    p.add_argument("--topics", type=int, default=100_000)
    p.add_argument("--long-topics", type=int, default=1_000)
    p.add_argument("--bastionmq-cmd", default="bastionmq start -c {conf}")
    p.add_argument("--mosquitto-cmd", default="mosquitto -c {conf}")
    p.add_argument("--broker-cpu", type=int, default=0)
    args = p.parse_args()
    brokers = [b for b in args.brokers.split(",") if b]
    cmds = {"bastionmq": args.bastionmq_cmd, "mosquitto": args.mosquitto_cmd}
    runs: dict[str, list[dict]] = {b: [] for b in brokers}
    with tempfile.TemporaryDirectory(prefix="bastionmq-memory-") as tmp:
        for run in range(args.runs):
            for b in brokers if run % 2 == 0 else brokers[::-1]:
                r = measure(b, cmds[b], args, Path(tmp))
                runs[b].append(r)
                print(f"run {run + 1}/{args.runs} {b:10} " + "  ".join(
                    f"{what}: {v['count']:,} -> +{(v['rss_after_kib'] - v['rss_before_kib']) / 1024:.1f} MiB"
                    f" ({v['bytes_each']:,} B each)" for what, v in r.items()), flush=True)
    print()
    print(f"{'':16}" + "".join(f"{b + ' B each':>22}" for b in brokers)
          + ("   bastionmq/mosquitto" if {"bastionmq", "mosquitto"} <= set(brokers) else ""))
    for what in ("subscriptions", "topics", "long topics"):
        medians = {b: statistics.median(r[what]["bytes_each"] for r in runs[b]) for b in brokers}
        line = f"{what:16}" + "".join(f"{medians[b]:>22,.0f}" for b in brokers)
        if {"bastionmq", "mosquitto"} <= set(brokers) and medians["mosquitto"]:
            line += f"   {medians['bastionmq'] / medians['mosquitto']:.2f}"
        print(line)


if __name__ == "__main__":
    main()
