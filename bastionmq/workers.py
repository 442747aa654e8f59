"""``node.workers``: one machine's cores, as nodes of a cluster on NATS.

``bastionmq start --workers N`` runs a supervisor (this module) and N worker
processes. Each worker is a complete broker and a node of the cluster
(docs/cluster.md): it binds every listener with SO_REUSEPORT, so that the
kernel spreads new connections over the workers, and reaches the others
through NATS, as nodes on several machines do. Without a ``cluster`` block
the workers use an all-in-one nats-server that the supervisor starts.

The supervisor checks the configuration before anything starts, starts
worker 1 and waits for its listeners to be open (a port in use, a store that
does not open: start-up stops there, with the worker's error), then the
others. A worker that exits while the broker runs is started again under the
same node name. SIGTERM and SIGINT stop every worker, SIGHUP makes every
worker reload. The workers' log lines pass through the supervisor, which alone
writes the log file (one writer, one rotation), each line naming its worker.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Sequence

import attrs

from bastionmq.app import start_embedded_nats
from bastionmq.cluster.embedded import RESTART_WAITS, EmbeddedNats
from bastionmq.config import Config
from bastionmq.ops.logs import relay

log = logging.getLogger("bastionmq")

#: How long a stopping worker has to disconnect its clients and flush its
#: store before it is killed.
STOP_TIMEOUT = 30.0


def base_name(config: Config) -> str:
    """What the workers' node names start with: cluster.node_name, or the
    host name (stable across restarts, unlike a process id), in the
    characters and length a node name allows with "-wN" after it."""
    name = config.cluster.node_name or re.sub(r"[^A-Za-z0-9_.@-]", "-", socket.gethostname())
    return name[:58]


def worker_name(config: Config, index: int) -> str:
    return f"{base_name(config)}-w{index}"


def with_workers(config: Config, workers: int | None) -> Config:
    """``config`` with ``--workers`` applied, and the cluster it implies:
    more than one worker without a ``cluster`` block is an all-in-one
    cluster on the embedded nats-server."""
    if workers is not None:
        config = attrs.evolve(config, node=attrs.evolve(config.node, workers=workers))
    cluster = config.cluster
    if config.node.workers > 1 and not cluster.enable:
        cluster = attrs.evolve(cluster, enable=True,
                               nats=attrs.evolve(cluster.nats, embedded=True))
        config = attrs.evolve(config, cluster=cluster)
    return config


def problems(config: Config) -> list[tuple[str, str]]:
    """What cannot work with several workers, as (key path, reason)."""
    found = []
    for kind, name, block in config.enabled_listeners():
        if block.bind.port == 0:
            found.append((f"listeners.{kind}.{name}.bind",
                          "port 0 gives each worker a port of its own: with node.workers "
                          "> 1 every listener needs a fixed port"))
    if config.http_api.enable and config.http_api.bind.port == 0:
        found.append(("http_api.bind", "with node.workers > 1 it needs a fixed port"))
    return found


def for_worker(config: Config, index: int, workers: int | None = None) -> Config:
    """The configuration worker ``index`` runs (and reloads) with: its own
    node name and durable store, the supervisor's nats-server, its lines
    on stderr for the supervisor to relay; worker 1 alone serves the
    management API (the others are reached through NATS)."""
    config = with_workers(config, workers)
    name = worker_name(config, index)
    cluster = config.cluster
    durable = config.durable_sessions
    assert durable.data_dir is not None  # load_config resolves it
    return attrs.evolve(
        config,
        cluster=attrs.evolve(cluster, node_name=name,
                             nats=attrs.evolve(cluster.nats, embedded=False)),
        durable_sessions=attrs.evolve(durable, data_dir=os.path.join(durable.data_dir,
                                                                     f"worker-{index}")),
        http_api=attrs.evolve(config.http_api, enable=config.http_api.enable and index == 1),
        log=attrs.evolve(config.log, to_stderr=True, node=name,
                         file=attrs.evolve(config.log.file, path=None)))


@attrs.define(slots=True, eq=False)
class Worker:
    """One worker process and what the supervisor knows of it."""

    index: int
    process: asyncio.subprocess.Process | None = None
    #: The end of the pipe the worker watches: when the supervisor is gone
    #: (however it ended), the worker sees end of file and stops.
    life_fd: int = -1
    relaying: asyncio.Task[None] | None = None


class SupervisorError(Exception):
    """The workers cannot be started (the reason for an operator)."""


class Supervisor:
    """Starts, watches, restarts and stops the workers (and the embedded
    nats-server, when there is one)."""

    def __init__(self, config: Config, command: Sequence[str]) -> None:
        self.config = config
        #: The command that runs a worker, to which ``--index N`` is added.
        self.command = list(command)
        self.workers = [Worker(index) for index in range(1, config.node.workers + 1)]
        self.embedded: EmbeddedNats | None = None
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status (0: stopped as asked)."""
        loop = asyncio.get_running_loop()
        lock = self._lock()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        try:
            if self.config.cluster.nats.embedded:
                self.embedded = await start_embedded_nats(self.config)
            # Worker 1 alone first: what stops one stops all, and it finds it
            # before the others open ports or race to make the same files.
            if not await self._start(self.workers[0]):
                return 1
            started = await asyncio.gather(*(self._start(worker)
                                             for worker in self.workers[1:]))
            if not all(started):
                return 1
            log.info("%d workers serving: %s", len(self.workers), ", ".join(
                f"{worker_name(self.config, w.index)} (pid {self._pid(w)})"
                for w in self.workers))
            watches = [loop.create_task(self._watch(worker)) for worker in self.workers]
            await self.stopping.wait()
            for watch in watches:
                watch.cancel()
            log.info("stopping %d workers", len(self.workers))
            return 0
        finally:
            await self._stop_all()
            os.close(lock)

    def _lock(self) -> int:
        """Hold node.data_dir's lock: SO_REUSEPORT would let a second
        supervisor started by mistake share the ports with this one and
        take half of its connections, silently."""
        directory = self.config.node.directory
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "workers.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SupervisorError(f"another bastionmq supervisor runs with node.data_dir "
                                  f"{directory} ({path} is locked)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    @staticmethod
    def _pid(worker: Worker) -> int | None:
        return worker.process.pid if worker.process is not None else None

    async def _start(self, worker: Worker) -> bool:
        """Start ``worker``; whether its listeners opened."""
        ready_read, ready_write = os.pipe()
        life_read, life_write = os.pipe()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self.command, "--index", str(worker.index), "--ready-fd", str(ready_write),
                "--life-fd", str(life_read), pass_fds=(ready_write, life_read),
                stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                # Its own session: a Ctrl-C at the terminal reaches the
                # supervisor only, which stops the workers in order.
                start_new_session=True)
        finally:
            os.close(ready_write)
            os.close(life_read)
        worker.life_fd = life_write
        worker.relaying = asyncio.get_running_loop().create_task(self._relay(worker))
        ready = await asyncio.get_running_loop().run_in_executor(None, _read_ready, ready_read)
        if not ready:
            code = await worker.process.wait()
            log.error("worker %d (%s) did not start (exit status %s)", worker.index,
                      worker_name(self.config, worker.index), code)
        return ready

    async def _relay(self, worker: Worker) -> None:
        process = worker.process
        assert process is not None and process.stderr is not None
        while line := await process.stderr.readline():
            relay(line.decode(errors="replace").rstrip("\n"))

    async def _watch(self, worker: Worker) -> None:
        """Start ``worker`` again whenever it exits on its own."""
        attempt = 0
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            if worker.relaying is not None:
                await worker.relaying  # its last words first
            self._close_life(worker)
            log.error("worker %d (%s, pid %d) exited (%s); starting it again",
                      worker.index, worker_name(self.config, worker.index), process.pid,
                      _describe(code))
            await asyncio.sleep(RESTART_WAITS[min(attempt, len(RESTART_WAITS) - 1)])
            if await self._start(worker):
                attempt = 0
                log.info("worker %d started again (pid %s)", worker.index, self._pid(worker))
            else:
                attempt += 1

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    @staticmethod
    def _close_life(worker: Worker) -> None:
        if worker.life_fd >= 0:
            os.close(worker.life_fd)
            worker.life_fd = -1

    async def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.error("worker %d did not stop in %g s: killing it", worker.index,
                          STOP_TIMEOUT)
                process.kill()
                await process.wait()
            if worker.relaying is not None:
                await worker.relaying
            self._close_life(worker)
        if self.embedded is not None:
            await self.embedded.stop()
            self.embedded = None


def _read_ready(fd: int) -> bool:
    """Wait for a worker's word that its listeners are open (False: it
    ended without saying so). Blocking: run in a thread."""
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read(1) == b"1"


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def ready(fd: int) -> None:
    """In a worker: tell the supervisor the listeners are open."""
    os.write(fd, b"1")
    os.close(fd)


def watch_supervisor(fd: int, gone: asyncio.Event) -> None:
    """In a worker: set ``gone`` when the supervisor's end of ``fd`` closes
    (it stopped, or was killed: a worker never outlives its supervisor)."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        if not os.read(fd, 64):
            loop.remove_reader(fd)
            gone.set()
    loop.add_reader(fd, readable)


def worker_command(config_file: str | None, workers: int) -> list[str]:
    # -P: the working directory is not put first on the module path, where
    # a checkout's bastionmq/ folder (the application part alone: the
    # installed package maps the other folders into it) would shadow the
    # installed package.
    command = [sys.executable, "-P", "-m", "bastionmq", "worker", "--workers", str(workers)]
    return command + (["-c", config_file] if config_file is not None else [])
