"""Debian's nats-server as a real peer in tests: one server, or a routed
cluster with JetStream, on free loopback ports, each from a configuration
file written into the test's temporary directory.

Every wait is bounded and fails with the servers' logs; every process is
stopped when its context ends, so a failing test leaves none behind. The
monitoring port (``http``) is what readiness is read from: /healthz, and
/jsz for the JetStream meta group of a cluster.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from mosquitto_peer import free_port, stop, tool

#: The bound on every wait: start, JetStream ready, a cluster's meta leader, stop.
TIMEOUT = 15.0

#: Signals after which the process is gone, so ``kill`` waits for it.
_FATAL = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def nats_server_binary() -> str:
    """The nats-server executable (Debian puts it in /usr/sbin); a test
    without it is skipped, or fails in CI (mosquitto_peer.missing)."""
    return tool("nats-server")


def _quoted(value: object) -> str:
    return json.dumps(str(value))  # a valid string in nats-server's configuration syntax


class NatsServer:
    """One nats-server with a generated configuration in ``directory``.

    Ports are chosen once, so ``restart`` (or ``start`` after ``kill``)
    brings the same server back on the same port with the same JetStream
    store. Use as a context manager, or call ``start`` and ``stop``.
    ``cluster_name``, ``cluster_port`` and ``routes`` (the other servers'
    cluster ports) make it a member of a routed cluster; ``extra`` is added
    to the configuration as it is (``max_payload: 4096``, authorization...).
    """

    def __init__(self, directory: Path, name: str = "nats", *, jetstream: bool = False,
                 cluster_name: str | None = None, cluster_port: int | None = None,
                 routes: Sequence[int] = (), extra: str = "") -> None:
        self.binary = nats_server_binary()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.jetstream = jetstream
        self.cluster_name = cluster_name
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port = cluster_port if cluster_port or not cluster_name else free_port()
        self.store_dir = directory / "jetstream" if jetstream else None
        self.config_path = directory / f"{name}.conf"
        self.log_path = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        lines = [f"server_name: {_quoted(name)}",
                 f"listen: {_quoted(f'127.0.0.1:{self.port}')}",
                 f"http: {_quoted(f'127.0.0.1:{self.monitor_port}')}"]
        if self.store_dir is not None:
            # Explicit limits: by default JetStream reserves 75% of the
            # machine's memory and of the disk's free space.
            lines.append(f"jetstream {{ store_dir: {_quoted(self.store_dir)}, "
                         "max_mem: 64MB, max_file: 256MB }")
        if cluster_name:
            urls = ", ".join(_quoted(f"nats://127.0.0.1:{port}") for port in routes
                             if port != self.cluster_port)
            lines.append(f"cluster {{ name: {_quoted(cluster_name)}, "
                         f"listen: {_quoted(f'127.0.0.1:{self.cluster_port}')}, "
                         f"routes: [{urls}] }}")
        lines.append(extra)
        self.config_path.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------ facts

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def monitor_json(self, path: str) -> dict[str, Any]:
        """The JSON object at ``path`` of the monitoring port ({} if it is not one)."""
        body = self.monitor(path)[1]
        return body if isinstance(body, dict) else {}

    def monitor(self, path: str) -> tuple[int, Any]:
        """GET ``path`` from the monitoring port: (HTTP status, decoded JSON,
        or the text when it is not JSON). Raises OSError when nothing listens."""
        connection = http.client.HTTPConnection("127.0.0.1", self.monitor_port, timeout=2)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode(errors="replace")

    # ------------------------------------------------------------ life

    def start(self, wait: bool = True) -> NatsServer:
        """Start the process; with ``wait``, return once it accepts clients
        and /healthz says ready (JetStream included). A cluster's servers
        start with ``wait=False``: a member's JetStream is not ready until
        enough of the others are up to elect a meta leader."""
        assert not self.running, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        """Wait until the server accepts connections and /healthz answers 200:
        for JetStream, that it is enabled and (in a cluster) in contact with
        its meta leader."""
        deadline = time.monotonic() + timeout
        pauses = _backoff()
        while True:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError as exc:
                last = f"client port {self.port}: {exc}"
            else:
                try:
                    status, body = self.monitor("/healthz")
                except OSError as exc:
                    last = f"monitoring port {self.monitor_port}: {exc}"
                else:
                    if status == 200:
                        return
                    last = f"/healthz {status}: {body}"
            if time.monotonic() > deadline:
                self.fail(f"not ready within {timeout} s ({last})")
            time.sleep(next(pauses))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; after one that ends the process, wait until it has."""
        assert self.process is not None, f"{self.name} was never started"
        if self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        if sig in _FATAL:
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.fail(f"still running {TIMEOUT} s after signal {sig}")

    def stop(self) -> None:
        """Stop the process: asked (SIGTERM) first, killed if it does not go
        in time. Does nothing when it is not running."""
        process = self.process
        if process is not None and process.poll() is None:
            stop(process)

    def restart(self, wait: bool = True) -> NatsServer:
        """Stop and start again: same configuration, port and store."""
        self.stop()
        return self.start(wait)

    def fail(self, message: str) -> None:
        pytest.fail(f"nats-server {self.name}: {message}\n--- {self.log_path}\n{self.log()}",
                    pytrace=False)

    def _check_alive(self) -> None:
        if self.process is None:
            self.fail("not started")
        elif self.process.poll() is not None:
            self.fail(f"exited with {self.process.returncode}")

    def __enter__(self) -> NatsServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NatsServer {self.name} {self.url} pid={self.pid}>"


def _backoff(first: float = 0.01, most: float = 0.25) -> Iterator[float]:
    """Pauses between polls: short at first, as a server is usually ready
    within milliseconds, then longer, as nats-server logs a warning for each
    failed /healthz."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 1.5, most)


def _stop_all(servers: Sequence[NatsServer]) -> None:
    # Asked all at once, then waited for: a cluster's members shut down in parallel.
    for server in servers:
        if server.running:
            assert server.process is not None
            server.process.terminate()
    for server in servers:
        server.stop()


def wait_for_cluster(servers: Sequence[NatsServer], timeout: float = TIMEOUT) -> str:
    """Wait until ``servers`` are routed to each other and agree on a
    JetStream meta leader that sees every other one as current; its name is
    returned. (In 2.9 /jsz gives ``meta_cluster``: the leader's name on every
    server, and on the leader its ``replicas`` with ``current``.)"""
    deadline = time.monotonic() + timeout
    names = {server.name for server in servers}
    state: dict[str, Any] = {}
    pauses = _backoff()
    while True:
        for server in servers:
            server._check_alive()
        try:
            for server in servers:
                state[server.name] = {
                    "healthz": server.monitor("/healthz"),
                    "routes": server.monitor_json("/routez").get("num_routes", 0),
                    "meta": server.monitor_json("/jsz").get("meta_cluster", {}),
                }
        except OSError as exc:
            state["error"] = str(exc)
        else:
            state.pop("error", None)
            leaders = {entry["meta"].get("leader") for entry in state.values()}
            if len(leaders) == 1 and (leader := leaders.pop()) in names:
                replicas = state[leader]["meta"].get("replicas", [])
                current = {replica["name"] for replica in replicas if replica.get("current")}
                if (current == names - {leader}
                        and all(entry["healthz"][0] == 200 and entry["routes"] >= len(servers) - 1
                                for entry in state.values())):
                    return leader
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {server.log_path}\n{server.log()}" for server in servers)
            pytest.fail(f"no JetStream meta leader seeing all of {sorted(names)} within "
                        f"{timeout} s: {state}\n{logs}", pytrace=False)
        time.sleep(next(pauses))


@contextlib.contextmanager
def nats_cluster(directory: Path, n: int = 3, *, name: str = "bastionmq",
                 extra: str = "") -> Iterator[list[NatsServer]]:
    """``n`` nats-servers with JetStream routed into cluster ``name``, each
    with its own store under ``directory``, yielded once they have a meta
    leader; all stopped afterwards, whatever happened."""
    cluster_ports = [free_port() for _ in range(n)]
    servers = [NatsServer(directory / f"n{index + 1}", f"n{index + 1}", jetstream=True,
                          cluster_name=name, cluster_port=port, routes=cluster_ports,
                          extra=extra)
               for index, port in enumerate(cluster_ports)]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready()
        wait_for_cluster(servers)
        yield servers
    finally:
        _stop_all(servers)


def poll(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT,
         interval: float = 0.02) -> Any:
    """Call ``condition`` until it returns something true, which is returned;
    fail after ``timeout`` seconds, saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s", pytrace=False)
        time.sleep(interval)
