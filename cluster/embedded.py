"""All-in-one mode: a nats-server with JetStream run by the broker itself.

For one machine (development, tests, a single box). It listens on loopback
only, at the port of the first configured server, keeps its JetStream store
in node.data_dir/nats, writes its log there, and is restarted if it exits
while the broker runs. When something already answers as a NATS server at
that address (another broker's embedded server, say), that one is used and
none is started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from pathlib import Path

log = logging.getLogger("bastionmq.cluster")

#: How long a start waits for the server to answer, and a stop for it to exit.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

#: Waits before a server that exited on its own is started again.
RESTART_WAITS = (0.1, 0.5, 1.0, 2.0, 5.0)


class EmbeddedError(Exception):
    """The embedded server could not be started (the reason for an operator)."""


def find_binary(name: str) -> str:
    """The path of the nats-server program; EmbeddedError when absent."""
    # /usr/sbin (where Debian puts nats-server) is not on every user's PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise EmbeddedError(f"{name} is not installed (Debian: apt-get install nats-server)")
    return path


async def answers_as_nats(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a NATS server listens at host:port (it speaks first: INFO)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.startswith(b"INFO ")
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


class EmbeddedNats:
    """One nats-server child process, supervised."""

    def __init__(self, binary: str, port: int, directory: str, name: str) -> None:
        self.binary = find_binary(binary)
        self.port = port
        self.directory = Path(directory)
        self.name = name
        self.process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

    def _write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "nats-server.conf"
        # JSON strings are valid NATS configuration strings (quotes, escapes).
        path.write_text(
            f"server_name: {json.dumps(self.name)}\n"
            f"listen: \"127.0.0.1:{self.port}\"\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.directory / 'jetstream'))} }}\n")
        return path

    async def start(self) -> bool:
        """Start the server unless one answers already; whether it was started."""
        if await answers_as_nats("127.0.0.1", self.port):
            log.info("a NATS server answers at 127.0.0.1:%d: using it, not starting one",
                     self.port)
            return False
        await self._spawn()
        self._watch = asyncio.get_running_loop().create_task(
            self._supervise(), name="bastionmq embedded nats-server")
        return True

    async def _spawn(self) -> None:
        config = self._write_config()
        with open(self.log_path, "ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                self.binary, "-c", str(config), stdin=asyncio.subprocess.DEVNULL,
                stdout=output, stderr=output,
                # Its own session: a Ctrl-C at the terminal stops the broker,
                # which stops the server, instead of killing it under the broker.
                start_new_session=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await answers_as_nats("127.0.0.1", self.port):
            if self.process.returncode is not None or loop.time() > deadline:
                await self._end()
                raise EmbeddedError(
                    f"nats-server did not start on 127.0.0.1:{self.port}: "
                    f"{self._log_tail() or 'no output'} (log: {self.log_path})")
            await asyncio.sleep(0.05)
        log.info("started nats-server (pid %d) on 127.0.0.1:%d, JetStream store in %s",
                 self.process.pid, self.port, self.directory / "jetstream")

    async def _supervise(self) -> None:
        attempt = 0
        while not self._stopping:
            process = self.process
            assert process is not None
            code = await process.wait()
            if self._stopping:
                return
            log.error("nats-server exited (%s); starting it again: %s", code,
                      self._log_tail() or "no output")
            await asyncio.sleep(RESTART_WAITS[min(attempt, len(RESTART_WAITS) - 1)])
            attempt += 1
            try:
                await self._spawn()
                attempt = 0
            except EmbeddedError as exc:
                log.error("%s", exc)

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it does not go in time)."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await self._end()

    async def _end(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:])


def embedded_directory(data_dir: str) -> str:
    return os.path.join(data_dir, "nats")
