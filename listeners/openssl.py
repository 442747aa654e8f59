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


# OCSP stapling ----------------------------------------------------------------
#
# OpenSSL asks the server for a staple through a status callback, set on the
# SSL_CTX, while it builds the handshake's Certificate message (any TLS
# version). Why this is safe through ctypes:
# - the callback is a C function made by ctypes, which takes the GIL itself
#   (the ssl module releases it around SSL_do_handshake and the thread keeps
#   its thread state), as CPython's own SNI callback does; it runs in the
#   thread of the handshake, the event loop's, and touches only a dict;
# - it is made once, here, and never freed, so no SSL_CTX can call into a
#   freed trampoline, whatever contexts a reload replaces;
# - it gets the SSL* from OpenSSL and asks OpenSSL for its SSL_CTX: nothing is
#   read out of an SSLObject's memory;
# - the staple is copied into a buffer from OPENSSL_malloc (CRYPTO_malloc),
#   which SSL_set_tlsext_status_ocsp_resp hands to the SSL, which frees it;
# - nothing can raise out of it: an error sends no staple (SSL_TLSEXT_ERR_NOACK).
# A staple is looked up by SSL_CTX address; the SSLContext is held with it so
# that the address cannot be reused by another context while it is listed.

_STATUS_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_lib.SSL_CTX_callback_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, _STATUS_CB]
_lib.SSL_CTX_callback_ctrl.restype = ctypes.c_long
_lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
_lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
_lib.SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
_lib.SSL_ctrl.restype = ctypes.c_long
_lib.CRYPTO_malloc.argtypes = [ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int]
_lib.CRYPTO_malloc.restype = ctypes.c_void_p
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_NOACK = 3

#: SSL_CTX address -> (its SSLContext, the DER OCSP response to staple or None).
_staples: dict[int, tuple[ssl.SSLContext, bytes | None]] = {}


def _on_status_request(ssl_pointer: int, _arg: int) -> int:
    try:
        held = _staples.get(_lib.SSL_get_SSL_CTX(ssl_pointer) or 0)
        staple = held[1] if held is not None else None
        if not staple:
            return _SSL_TLSEXT_ERR_NOACK
        buffer = _lib.CRYPTO_malloc(len(staple), None, 0)
        if not buffer:
            return _SSL_TLSEXT_ERR_NOACK
        ctypes.memmove(buffer, staple, len(staple))
        # The SSL owns the buffer from here and frees it (it always accepts it).
        _lib.SSL_ctrl(ssl_pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP,
                      len(staple), buffer)
        return _SSL_TLSEXT_ERR_OK
    except BaseException:  # nothing may unwind into OpenSSL
        return _SSL_TLSEXT_ERR_NOACK


_ON_STATUS_REQUEST = _STATUS_CB(_on_status_request)


def enable_stapling(context: ssl.SSLContext) -> None:
    """Let ``context`` staple what ``set_staple`` gives it (nothing until then)."""
    pointer = _ssl_ctx(context)
    if pointer not in _staples:
        _staples[pointer] = (context, None)
        _lib.SSL_CTX_callback_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB,
                                   _ON_STATUS_REQUEST)


def set_staple(context: ssl.SSLContext, response: bytes | None) -> None:
    """The DER OCSP response ``context`` staples from now on (None: none)."""
    pointer = _ssl_ctx(context)
    if pointer not in _staples:
        raise ValueError("enable_stapling was not called for this context")
    _staples[pointer] = (context, response)


def disable_stapling(context: ssl.SSLContext) -> None:
    """Forget ``context`` (replaced by a reload): it staples nothing more, and
    may be freed once its last connection is."""
    for pointer, (held, _) in list(_staples.items()):
        if held is context:
            del _staples[pointer]
