"""Sockets for tests over TLS, closed after each test whatever it did
(conftest.py calls ``close_all``), so that a failing assertion leaves no
ResourceWarning behind to confuse the next test."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

TIMEOUT = 10.0

_OPEN: list[socket.socket] = []


def ssl_listener(pki: Path, extra: str = "", **options: str) -> str:
    """HOCON for listener ssl:default on an ephemeral loopback port, with the
    development PKI in ``pki`` and ``options`` added to (or replacing) its
    ssl_options; ``extra`` is appended at the top level."""
    opts = {"cacertfile": f'"{pki / "ca.pem"}"', "certfile": f'"{pki / "server.pem"}"',
            "keyfile": f'"{pki / "server.key"}"', **options}
    body = "\n    ".join(f"{key} = {value}" for key, value in opts.items())
    return f"""
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{
    {body}
  }}
}}
{extra}
"""


def plain_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    _OPEN.append(sock)
    return sock


def tls_socket(port: int, context: ssl.SSLContext,
               server_hostname: str = "127.0.0.1") -> ssl.SSLSocket:
    """A socket through the TLS handshake with the listener on ``port``."""
    tls = context.wrap_socket(plain_socket(port), server_hostname=server_hostname)
    _OPEN.append(tls)
    return tls


def close_all() -> None:
    while _OPEN:
        _OPEN.pop().close()
