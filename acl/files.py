"""Reading rule files."""

from __future__ import annotations

import os
from typing import Callable


def read_utf8(path: str | os.PathLike[str],
              error: Callable[[str, int, str], Exception]) -> tuple[str, str]:
    """(source name, text) of a UTF-8 file; ``error(source, line, message)``
    makes the exception raised for bytes that are not UTF-8. OSError when
    the file cannot be read."""
    source = os.fspath(path)
    with open(source, "rb") as file:
        data = file.read()
    try:
        return source, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(source, line, "the file is not UTF-8 text") from None
