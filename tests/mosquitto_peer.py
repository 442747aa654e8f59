"""Debian's mosquitto as a reference peer in tests: find its tools, run a
broker with a given configuration on a free loopback port."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

TIMEOUT = 10.0


#: The Debian package of each outside tool the tests use.
PACKAGES = {"mosquitto": "mosquitto", "mosquitto_passwd": "mosquitto",
            "mosquitto_pub": "mosquitto-clients", "mosquitto_sub": "mosquitto-clients",
            "openssl": "openssl", "chromium": "chromium", "certutil": "libnss3-tools",
            "npm": "npm", "promtool": "prometheus", "haproxy": "haproxy", "nginx": "nginx",
            "nats-server": "nats-server"}


def missing(what: str) -> None:
    """A tool a test needs is absent: in CI (CI=true), where .ci/run installs
    every one, that is a failure; elsewhere the test is skipped with the
    reason, so that a plain ``pytest`` on a machine without it still runs
    the rest."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (.ci/run installs it)")
    pytest.skip(f"{what} (.ci/run installs it)")


def tool(name: str) -> str:
    # /usr/sbin (where Debian puts mosquitto) is not on every user's PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        missing(f"{name} is not installed: apt-get install {PACKAGES.get(name, name)}")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    """Wait until ``process`` (its output in ``log``) listens on ``port``."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode}: "
                        f"{log.read_text() if log.exists() else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    pytest.fail(f"nothing listens on {port}: {log.read_text() if log.exists() else ''}")


def stop(process: subprocess.Popen) -> None:
    """Stop a peer process: asked first, killed if it does not go in time."""
    process.terminate()
    try:
        process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def nginx_config(prefix: Path, body: str, modules: tuple[Path, ...] = ()) -> str:
    """An nginx.conf running in the foreground, one worker, its pid and log
    in ``prefix``, with ``body`` (stream or http blocks) and ``modules``."""
    loads = "".join(f"load_module {module};\n" for module in modules)
    # root: nginx would otherwise switch to a user that cannot read tmp_path.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""{loads}{user}
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 64; }}
{body}
"""


@contextlib.contextmanager
def running_mosquitto(directory: Path, settings: str) -> Iterator[int]:
    """A mosquitto with ``settings`` (mosquitto.conf lines) listening on a free
    loopback port, which is yielded; stopped afterwards."""
    port = free_port()
    config = directory / "mosquitto.conf"
    # user: mosquitto started as root would otherwise switch to the mosquitto
    # user, which cannot read the test's private temporary directory.
    config.write_text(f"listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\n"
                      f"user {getpass.getuser()}\n{settings}")
    log = directory / "mosquitto.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([tool("mosquitto"), "-c", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(port, process, log)
        yield port
    finally:
        stop(process)
