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
            "npm": "npm", "promtool": "prometheus"}


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


@contextlib.contextmanager
def running_mosquitto(directory: Path, settings: str) -> Iterator[int]:
    """A mosquitto with ``settings`` (mosquitto.conf lines) listening on a free
    loopback port, which is yielded; stopped afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mosquitto did not start:\n{log.read_text()}")
                time.sleep(0.01)
        yield port
    finally:
        process.terminate()
        process.wait(TIMEOUT)
