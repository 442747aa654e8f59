"""A pytest plugin: test an application against an embedded bastionmq broker.

Registered through the ``pytest11`` entry point, so installing bastionmq is
enough. Fixtures (docs/testing.md):

- ``mqtt_broker``: an anonymous broker on 127.0.0.1, ephemeral port;
- ``mqtt_broker_factory``: brokers from a HOCON text, as many as a test needs;
- ``mqtt_pki``: a throwaway CA with server and client certificates, a CRL,
  and ready client ``ssl.SSLContext``s.

Each broker runs in a thread of its own with its own event loop (see
bastionmq.testkit), so a threaded client (paho-mqtt) and an asyncio client in
the test's loop (pytest-asyncio, anyio) both simply connect to its address.
The records of the ``bastionmq`` logger during a test go into the report of
a failing test.

pytest loads this module in every project that has bastionmq installed, so
it imports only what pytest has loaded already; the broker, asyncio and the
rest come with the first fixture a test asks for.

PYTEST_DONT_REWRITE: there is no assert here to rewrite, and a nested pytest
run (pytester) that finds this module imported already must not warn.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from bastionmq.testkit import BrokerFactory, Pki, RunningBroker

__all__ = ["LOG_SECTION"]

#: The report section that holds the broker's log when a test fails.
LOG_SECTION = "bastionmq broker log"


# ------------------------------------------------------------------ the log


class _LogCapture(logging.Handler):
    """The ``bastionmq`` logger's records while a test's brokers run."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(_format(record) for record in self.records)


def _format(record: logging.LogRecord) -> str:
    # The thread's name tells which broker (or the test itself) logged.
    moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
    return f"{moment} {record.threadName} {record.levelname} {record.getMessage()}"


_LOG_KEY = pytest.StashKey[_LogCapture]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("bastionmq_log_level",
                  "level of the bastionmq logger while an mqtt_broker fixture runs "
                  "(its records go into the report of a failing test)", default="INFO")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    capture = item.stash.get(_LOG_KEY, None)
    if capture is not None and report.failed and capture.records:
        report.sections.append((LOG_SECTION, capture.text()))
    return report


@pytest.fixture
def _bastionmq_log(request: pytest.FixtureRequest) -> Iterator[_LogCapture]:
    """Captures the bastionmq logger for the test; set up before any broker
    starts, so that start-up problems are in it too."""
    logger = logging.getLogger("bastionmq")
    capture = _LogCapture()
    level = logging.getLevelName(str(request.config.getini("bastionmq_log_level")).upper())
    if not isinstance(level, int):
        raise pytest.UsageError(f"bastionmq_log_level: unknown level {level!r}")
    previous = logger.level
    # Lowered, never raised: an application that logs bastionmq at DEBUG keeps it.
    logger.setLevel(min(level, previous) if previous else level)
    logger.addHandler(capture)
    request.node.stash[_LOG_KEY] = capture
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(previous)


@pytest.fixture
def mqtt_broker_factory(_bastionmq_log: _LogCapture,
                        tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start brokers from HOCON texts: ``mqtt_broker_factory(config)``."""
    from bastionmq.testkit import BrokerFactory
    factory = BrokerFactory(tmp_path / "bastionmq")
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def mqtt_broker(mqtt_broker_factory: BrokerFactory) -> RunningBroker:
    """An anonymous broker on 127.0.0.1, port ``mqtt_broker.port``."""
    return mqtt_broker_factory()


@pytest.fixture
def mqtt_pki(tmp_path: Path) -> Pki:
    """A fresh CA in ``tmp_path/pki`` with a server certificate and an empty CRL."""
    from bastionmq.testkit import new_pki
    return new_pki(tmp_path / "pki")


#: bastionmq.testkit's names, importable from here too.
_KIT = frozenset({"BrokerFactory", "ClientCert", "DEFAULT_CONFIG", "Pki", "RunningBroker",
                  "ServerCert", "TIMEOUT", "embedded_config", "new_pki"})


def __getattr__(name: str) -> Any:
    # Checked before importing: pytest looks up names such as pytest_plugins
    # here in every run, and those must not load the kit.
    if name not in _KIT:
        raise AttributeError(f"module 'bastionmq.testing' has no attribute {name!r}")
    import bastionmq.testkit
    return getattr(bastionmq.testkit, name)
