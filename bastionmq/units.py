"""Values in EMQX notation: sizes ("1MB", "64KB") and durations ("15s",
"100ms", "1h30m"), read and written back the way an operator writes them."""

from __future__ import annotations

import datetime
import re
from typing import Any

from pyhocon.config_tree import NoneValue

try:
    # pyhocon turns unquoted durations such as ``15s`` into relativedelta
    # objects when python-dateutil is installed, and into timedelta otherwise.
    from dateutil.relativedelta import relativedelta as _RelativeDelta
except ImportError:  # pragma: no cover - depends on an optional package
    _RelativeDelta = None


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_SIZE_RE = re.compile(r"(\d+)\s*(b|kb|mb|gb)?", re.IGNORECASE)
_SIZE_HINT = "is not a size (e.g. 1MB, 64KB, 512B; a bare integer is bytes)"

_DURATION_MS = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
# "ms" comes before "m" and "s" so that 100ms is not read as 100 minutes.
_DURATION_PART = r"(\d+)\s*(ms|w|d|h|m|s)"
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART}\s*)+", re.IGNORECASE)
_CALENDAR_RE = re.compile(r"\d+\s*(mo|mon|month|months|y|year|years)", re.IGNORECASE)
_NOT_FIXED = "is not a fixed duration: months and years vary in length (use w, d, h, m, s or ms)"
_DURATION_HINT = "is not a duration (e.g. 15s, 100ms, 2h, 1h30m; a bare integer is milliseconds)"


def parse_size(value: int | str) -> int:
    """Read a size in EMQX notation as bytes: ``1MB`` = 1048576, ``64KB``, ``512B``.

    Units are case-insensitive and binary (1KB = 1024 bytes); a bare integer
    is a number of bytes. Raises ValueError with a message for an operator.
    """
    if isinstance(value, bool):
        raise ValueError(f"{show_value(value)} {_SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{show_value(value)} {_SIZE_HINT}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            return int(match[1]) * _SIZE_UNITS[(match[2] or "").lower()]
    raise ValueError(f"{show_value(value)} {_SIZE_HINT}")


def parse_duration(value: int | str | datetime.timedelta | Any) -> float:
    """Read a duration in EMQX notation as seconds: ``15s``, ``100ms``, ``2h``, ``1h30m``.

    Units are ms, s, m, h, d, w (case-insensitive) and may be combined; a bare
    integer is milliseconds, as in EMQX. Also takes the timedelta and
    relativedelta objects pyhocon makes of unquoted durations. Raises
    ValueError with a message for an operator.
    """
    if isinstance(value, bool):
        raise ValueError(f"{show_value(value)} {_DURATION_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{show_value(value)} {_DURATION_HINT}")
        return value / 1000
    if isinstance(value, datetime.timedelta):
        if value < datetime.timedelta(0):
            raise ValueError(f"{show_value(value)} {_DURATION_HINT}")
        return value.total_seconds()
    if _RelativeDelta is not None and isinstance(value, _RelativeDelta):
        if value.years or value.months:
            raise ValueError(f"{show_value(value)} {_NOT_FIXED}")
        seconds = relativedelta_seconds(value)
        if seconds < 0:
            raise ValueError(f"{show_value(value)} {_DURATION_HINT}")
        return seconds
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text) / 1000
        if _DURATION_RE.fullmatch(text):
            # Summed in whole milliseconds so that 100ms is exactly 0.1.
            total_ms = sum(int(number) * _DURATION_MS[unit.lower()]
                           for number, unit in re.findall(_DURATION_PART, text, re.IGNORECASE))
            return total_ms / 1000
        if _CALENDAR_RE.fullmatch(text):
            # pyhocon turns "1 month" into a relativedelta only when dateutil is
            # installed; the same words must get the same answer without it.
            raise ValueError(f"{show_value(value)} {_NOT_FIXED}")
    raise ValueError(f"{show_value(value)} {_DURATION_HINT}")


def relativedelta_seconds(delta: Any) -> float:
    return (delta.days * 86_400 + delta.hours * 3_600 + delta.minutes * 60
            + delta.seconds + delta.microseconds / 1_000_000)


def format_size(size: int) -> str:
    for unit in ("GB", "MB", "KB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def format_duration(seconds: float) -> str:
    total_ms = round(seconds * 1000)
    if total_ms == 0:
        return "0s" if seconds == 0 else f"{seconds}s"
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        count, total_ms = divmod(total_ms, _DURATION_MS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def show_value(value: Any) -> str:
    """A value as the operator wrote it, for error messages."""
    if value is None or isinstance(value, NoneValue):
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.timedelta):
        return format_duration(value.total_seconds())
    if _RelativeDelta is not None and isinstance(value, _RelativeDelta):
        if value.years or value.months:
            return "".join(f"{count}{unit}" for count, unit in
                           ((value.years, "y"), (value.months, "mo")) if count)
        return format_duration(relativedelta_seconds(value))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
