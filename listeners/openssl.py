"""OpenSSL settings Python's ssl module does not expose.

``SSL_CTX_set_ciphersuites`` (the TLS 1.3 suites), ``SSL_CTX_set_verify_depth``
and the server's session cache mode are set through ctypes on the SSL_CTX that
an ``ssl.SSLContext`` wraps, using the libssl the ``_ssl`` module itself is
linked against. The pointer is found where CPython keeps it (right after the
object header) and checked before use: if the context's options read through
it differ from ``SSLContext.options``, the layout is not the expected one and
nothing is written.
"""

from __future__ import annotations

import ctypes
import ssl
import sys

import _ssl

_lib = ctypes.CDLL(_ssl.__file__)
_lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
_lib.SSL_CTX_get_options.restype = ctypes.c_uint64
_lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
_lib.SSL_CTX_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
_lib.SSL_CTX_set_verify_depth.restype = None
_lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
_lib.SSL_CTX_ctrl.restype = ctypes.c_long
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF = 0

#: Bytes of PyObject_HEAD (reference count and type pointer).
_HEADER = sys.getsizeof(object()) if sys.implementation.name == "cpython" else 0


class OpenSSLUnavailable(RuntimeError):
    """The SSL_CTX behind an SSLContext could not be reached safely."""


def _ssl_ctx(context: ssl.SSLContext) -> int:
    if not _HEADER:
        raise OpenSSLUnavailable("not CPython: the SSL_CTX cannot be reached")
    pointer = ctypes.c_void_p.from_address(id(context) + _HEADER).value
    if not pointer or _lib.SSL_CTX_get_options(pointer) != int(context.options):
        raise OpenSSLUnavailable("this Python's SSLContext has an unexpected layout")
    return pointer


def set_tls13_ciphersuites(context: ssl.SSLContext, suites: list[str]) -> None:
    """Restrict the TLS 1.3 suites (IANA names, e.g. TLS_AES_256_GCM_SHA384)."""
    if not _lib.SSL_CTX_set_ciphersuites(_ssl_ctx(context), ":".join(suites).encode("ascii")):
        raise ssl.SSLError(f"no usable TLS 1.3 cipher suite in {', '.join(suites)}")


def set_verify_depth(context: ssl.SSLContext, depth: int) -> None:
    """Most intermediate CAs allowed between a peer certificate and a trust anchor."""
    _lib.SSL_CTX_set_verify_depth(_ssl_ctx(context), depth)


def disable_session_cache(context: ssl.SSLContext) -> None:
    """No server-side session cache: with tickets off too, no session resumes."""
    _lib.SSL_CTX_ctrl(_ssl_ctx(context), _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
