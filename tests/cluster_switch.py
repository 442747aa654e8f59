"""The end-to-end suite against a cluster of workers (``--cluster-workers``).

``pytest --cluster-workers 3`` makes every broker the ``start_broker`` and
``broker`` fixtures give three nodes, as ``bastionmq start --workers 3``
runs them: each node is configured by bastionmq.workers.for_worker from the
test's configuration, binds every listener on the same port (SO_REUSEPORT:
the kernel gives each connection to one of them, so a test's clients land
on different nodes), keeps its own durable store, and talks to the others
through a nats-server with JetStream started for this broker alone (so that
nothing a test leaves in the streams reaches the next). Node 1 alone serves
the management API, as worker 1 does.

A test reaches the cluster as a client does, through the shared port; what
it asks of the broker object itself (its core, a coroutine run in its loop)
is node 1's, since a test written for one broker cannot say which node it
means; ``on_every_node`` does what SIGHUP does to every worker. A test that
looks at one node's insides that way, or holds a promise that is one
node's by design (a listener's max_connections, $SYS figures, the counters
of /metrics), says so with ``@pytest.mark.one_node("why")`` and is left out
of that run, as is a test that starts no broker through the fixtures.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import attrs
import pytest

from bastionmq.config import Bind
from bastionmq.testkit import RunningBroker, embedded_config
from bastionmq.workers import for_worker
from nats_peer import NatsServer

T = TypeVar("T")
K = TypeVar("K")

#: How long the nodes of a new cluster have to hear each other.
MEET_TIMEOUT = 10.0


class RunningCluster:
    """``workers`` nodes serving one configuration on shared ports; what is
    not here is node 1's (a RunningBroker)."""

    def __init__(self, config: Any, workers: int, **broker_options: Any) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="bastionmq-cluster-")
        directory = Path(self._directory.name)
        self.nodes: list[RunningBroker] = []
        self.nats: NatsServer | None = None
        try:
            self.nats = _nats_server(directory)
            base = embedded_config(config, directory / "data")
            cluster = base.cluster
            base = attrs.evolve(base, cluster=attrs.evolve(
                cluster, enable=True, heartbeat=0.25,
                nats=attrs.evolve(cluster.nats, servers=(f"127.0.0.1:{self.nats.port}",))))
            first = RunningBroker(for_worker(base, 1, workers), name="w1", **broker_options)
            self.nodes.append(first)
            fixed = self._on_ports_of(base, first)
            for index in range(2, workers + 1):
                self.nodes.append(RunningBroker(for_worker(fixed, index, workers),
                                                name=f"w{index}", **broker_options))
            self._meet()
        except BaseException:
            self.stop()
            raise

    def _meet(self) -> None:
        """Return once every node has heard every other (a test's first
        message must not go out before its subscriber's node is known)."""
        names = {node.broker.bus.name for node in self.nodes}
        deadline = time.monotonic() + MEET_TIMEOUT
        for node in self.nodes:
            others = names - {node.broker.bus.name}
            while not node.run(node.broker.bus.others) >= others:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} did not hear the other nodes in time")
                time.sleep(0.02)

    @staticmethod
    def _on_ports_of(config: Any, first: RunningBroker) -> Any:
        """``config`` with each listener bound where node 1's listener is."""
        listeners = config.listeners

        def fixed(kind: str, blocks: dict[str, Any]) -> dict[str, Any]:
            return {name: attrs.evolve(block, bind=Bind(*first.address_of(f"{kind}:{name}")))
                    if f"{kind}:{name}" in first.broker.listeners else block
                    for name, block in blocks.items()}

        return attrs.evolve(config, listeners=attrs.evolve(
            listeners, tcp=fixed("tcp", listeners.tcp), ssl=fixed("ssl", listeners.ssl),
            ws=fixed("ws", listeners.ws), wss=fixed("wss", listeners.wss)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.nodes[0], name)

    def on_every_node(self, function: Callable[[Any], T]) -> list[T]:
        """``function(broker)`` in each node's loop, node by node."""
        return [node.run(lambda node=node: function(node.broker)) for node in self.nodes]

    def reload_tls(self) -> dict[str, bool]:
        """Every node loads its TLS files again; a listener succeeded if it did everywhere."""
        results = self.on_every_node(lambda broker: broker.reload_tls("requested by a test"))
        return {listener: all(result[listener] for result in results)
                for listener in results[0]}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        if self.nats is not None:
            self.nats.stop()
        self._directory.cleanup()

    def __repr__(self) -> str:
        return f"<RunningCluster of {len(self.nodes)} nodes on {self.nodes[0]!r}>"


def _nats_server(directory: Path, attempts: int = 3) -> NatsServer:
    """A nats-server with JetStream, started. Its ports are found free
    before it binds them, and some other socket may take one meanwhile
    (hundreds of servers start in a run): then again on others."""
    for attempt in range(1, attempts + 1):
        server = NatsServer(directory / f"nats-{attempt}", jetstream=True)
        try:
            return server.start()
        except pytest.fail.Exception:
            if attempt == attempts or "address already in use" not in server.log():
                raise
    raise AssertionError("unreachable")


def on_every_node(broker: Any, function: Callable[[Any], T]) -> list[T]:
    """What SIGHUP does to every worker: ``function(broker)`` on each node
    of a cluster, or on the one broker there is."""
    if isinstance(broker, RunningCluster):
        return broker.on_every_node(function)
    return [broker.run(lambda: function(broker.broker))]


def gathered(broker: Any, function: Callable[[Any], list[T]]) -> list[T]:
    """The items ``function(broker)`` lists, from every node (connections
    and sessions are where the kernel and the clients put them)."""
    return [item for items in on_every_node(broker, function) for item in items]


def counted(broker: Any, function: Callable[[Any], Mapping[K, int]]) -> dict[K, int]:
    """The counts ``function(broker)`` keeps by key, added up over every node."""
    total: dict[K, int] = {}
    for counts in on_every_node(broker, lambda node: dict(function(node))):
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total
