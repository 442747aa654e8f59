"""The broker's log: where it goes (stderr, a rotated file), in which form
(text or JSON lines), and the settings that say so (``log { ... }``).

Events an operator follows (connect, disconnect, refusal, TLS failure) are
logged at info with their facts as fields (``extra``): the text form shows
them in the message, the JSON form also as keys of their own.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import sys
from typing import Any

import attrs
from attrs import validators as v

from bastionmq.broker.settings import SIZE

LOG_LEVELS = ("debug", "info", "warning", "error")
#: The fields an event may carry (see broker.connection and listeners.tls).
EVENT_FIELDS = ("event", "listener", "peer", "client_id", "username", "reason")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@attrs.define(slots=True, frozen=True, kw_only=True)
class LogFileConfig:
    """``log.file``: a log file, rotated when it reaches ``max_size``."""

    #: Unset: no file.
    path: str | None = None
    max_size: int = attrs.field(default=10 * 1024 * 1024, metadata=SIZE, validator=v.ge(1024))
    #: Rotated files kept beside it (file.1 ... file.N).
    rotate: int = attrs.field(default=5, validator=[v.ge(0), v.le(1000)])


@attrs.define(slots=True, frozen=True, kw_only=True)
class LogConfig:
    """``log``: the least severe level written, the form, and where."""

    level: str = attrs.field(default="info", validator=v.in_(LOG_LEVELS))
    #: text: one line per record; json: one JSON object per line.
    format: str = attrs.field(default="text", validator=v.in_(("text", "json")))
    to_stderr: bool = True
    file: LogFileConfig = attrs.field(factory=LogFileConfig)
    #: Set for a worker of node.workers: its node name, on every line, so
    #: that the workers' lines can be told apart in the one log.
    node: str | None = attrs.field(default=None, metadata={"internal": True})


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the node's name when it is a worker's; a line a
    worker already formatted (relayed by the supervisor) passes as it is."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__(TEXT_FORMAT if node is None else
                         TEXT_FORMAT.replace("%(name)s", f"[{node}] %(name)s"))

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "relayed", False):
            return record.getMessage()
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the
    event's fields when it has them (and the worker's node name)."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "relayed", False):
            return record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.node is not None:
            entry["node"] = self.node
        for field in EVENT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: LogConfig) -> None:
    """Route the process's log as ``settings`` say (replacing what was set)."""
    formatter: logging.Formatter = (JsonFormatter(settings.node) if settings.format == "json"
                                    else TextFormatter(settings.node))
    handlers: list[logging.Handler] = []
    if settings.to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    if settings.file.path:
        handlers.append(logging.handlers.RotatingFileHandler(
            settings.file.path, maxBytes=settings.file.max_size,
            backupCount=settings.file.rotate, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # aiosqlite logs every statement at debug: noise to an operator who
    # asks for the broker's debug lines.
    logging.getLogger("aiosqlite").setLevel(max(root.level, logging.INFO))


def relay(line: str) -> None:
    """Write a line another process logged (a worker's, already formatted)
    through this process's handlers: one process writes and rotates the file."""
    record = logging.LogRecord("bastionmq.worker", logging.INFO, "", 0, line, None, None)
    record.relayed = True
    for handler in logging.getLogger().handlers:
        handler.handle(record)
