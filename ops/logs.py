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


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the
    event's fields when it has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in EVENT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: LogConfig) -> None:
    """Route the process's log as ``settings`` say (replacing what was set)."""
    formatter: logging.Formatter = (JsonFormatter() if settings.format == "json"
                                    else logging.Formatter(TEXT_FORMAT))
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
