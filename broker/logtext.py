"""What a client sent, made fit for a log line.

A client chooses its client id, topics, filters and much else, up to 65,535
characters each; written out whole, one small packet could cost the log a
thousand times its size, and a control character could forge a line. Every
client-supplied string goes through ``shown`` on its way to a log line or an
exception text.
"""

from __future__ import annotations

#: Characters of a client-supplied string a log line shows, at most.
SHOWN = 100


def shown(value: str | bytes | None, limit: int = SHOWN) -> str:
    """``value`` quoted, control characters escaped (repr), cut to ``limit``
    characters with its full length noted when it is longer."""
    if value is None:
        return "None"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def endpoint(address: tuple | None) -> str:
    """A socket address as a log line shows it: ``host:port``, or ``?``
    when the transport did not say."""
    return f"{address[0]}:{address[1]}" if address else "?"
