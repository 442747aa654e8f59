"""CPU per delivery of the protocol core alone: no sockets, no event loop,
no load generator competing for the machine.

The real BrokerCore and Connections run on the sans-IO harness of the tests
(tests/sansio.py: a manual clock, transports that discard what is written).
N subscribers take QoS 0 on one topic; one publisher's reads, each of
several PUBLISH packets, go straight into its Connection, each followed by
what it left for the loop's next turn. What is left is
the core's own cost: decoding, routing, encoding and the outboxes.

Run it with the Python of each install to compare two builds, alternated,
pinned to one core:

    taskset -c 0 .venv/bin/python benchmarks/core_cpu.py
    taskset -c 0 /path/to/other/venv/bin/python benchmarks/core_cpu.py

The figure is nanoseconds per delivery: the median and the lowest of the
rounds (the lowest is the least disturbed by the rest of the machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sansio import AllowEveryone, ListTransport, ManualClock  # noqa: E402

from bastionmq.broker.codec import (  # noqa: E402
    MQTT_3_1_1, Connect, Publish, Subscribe, Subscription, encode,
)
from bastionmq.broker.connection import Connection  # noqa: E402
from bastionmq.broker.core import BrokerCore  # noqa: E402
from bastionmq.broker.ports import PeerInfo  # noqa: E402
from bastionmq.broker.settings import MqttSettings  # noqa: E402


class DiscardingTransport(ListTransport):
    def write(self, data: bytes) -> None:
        pass


def connect(core: BrokerCore, client_id: str, port: int) -> Connection:
    transport = DiscardingTransport(("127.0.0.1", port))
    # Builds before the outbox step made their Connection through core.attach.
    attach = getattr(core, "attach", None)
    peer = PeerInfo(listener="tcp:default", address=transport.address)
    connection = attach(transport, peer) if attach else Connection(core, transport, peer)
    connection.data_received(encode(Connect(client_id, MQTT_3_1_1), MQTT_3_1_1))
    return connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--per-read", type=int, default=10, help="PUBLISH packets per read")
    parser.add_argument("--reads", type=int, default=2000, help="reads per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    clock = ManualClock()
    core = BrokerCore(MqttSettings(), AllowEveryone(), clock)
    for index in range(args.subscribers):
        subscriber = connect(core, f"sub-{index}", index)
        subscriber.data_received(encode(Subscribe(1, [Subscription("t", 0)]), MQTT_3_1_1))
    publisher = connect(core, "pub", 65000)
    data = encode(Publish("t", b"x" * 32), MQTT_3_1_1) * args.per_read
    deliveries = args.reads * args.per_read * args.subscribers
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.reads):
            publisher.data_received(data)
            clock.run_due()  # the loop's next turn: what a read left for it (call_soon)
        rounds.append((time.perf_counter() - start) / deliveries * 1e9)
    print(f"{sys.prefix}: {statistics.median(rounds):.1f} ns per delivery "
          f"(lowest {min(rounds):.1f}; {args.subscribers} subscribers, "
          f"{args.per_read} PUBLISH per read, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
