"""Sockets for tests over TLS, closed after each test whatever it did
(conftest.py calls ``close_all``), so that a failing assertion leaves no
ResourceWarning behind to confuse the next test."""

from __future__ import annotations

import socket
import ssl

TIMEOUT = 10.0

_OPEN: list[socket.socket] = []


def plain_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    _OPEN.append(sock)
    return sock


def tls_socket(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A socket through the TLS handshake with the listener on ``port``."""
    tls = context.wrap_socket(plain_socket(port), server_hostname="127.0.0.1")
    _OPEN.append(tls)
    return tls


def close_all() -> None:
    while _OPEN:
        _OPEN.pop().close()
