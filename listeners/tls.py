"""TLS listeners (``listeners.ssl.<name>``): contexts from ``ssl_options``,
the handshake, and what the peer's certificate says.

TLS runs over ssl.MemoryBIO inside the listener's protocol rather than in the
event loop's transport. That gives the listener what an operator needs and
the loop's TLS hides: every failed handshake with its reason, the handshake
timeout, the verified certificate before the first MQTT byte, and a context
that can be replaced for new connections while old ones carry on. Output
stays batched: the core writes each connection once per read pass, and that
write is encrypted and handed to the socket as one buffer.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import ssl
import warnings
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from bastionmq.broker.core import BrokerCore
from bastionmq.broker.ports import PeerCertificate, PeerInfo

from .base import Listener
from .openssl import OpenSSLUnavailable, set_tls13_ciphersuites, set_verify_depth

log = logging.getLogger("bastionmq.listener")

_VERSIONS = {
    "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
_NO_VERSION_OPTION = {
    "tlsv1": ssl.OP_NO_TLSv1,
    "tlsv1.1": ssl.OP_NO_TLSv1_1,
    "tlsv1.2": ssl.OP_NO_TLSv1_2,
    "tlsv1.3": ssl.OP_NO_TLSv1_3,
}
_TLS13_SUITES = frozenset({
    "TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256",
})
#: IANA names of TLS 1.2 and older suites, as OpenSSL names them.
_IANA_TO_OPENSSL = {
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384": "DHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256": "DHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384": "ECDHE-ECDSA-AES256-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384": "ECDHE-RSA-AES256-SHA384",
    "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256": "DHE-RSA-AES256-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256": "DHE-RSA-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
}


class TlsSetupError(ValueError):
    """``ssl_options`` that cannot make a context; ``key`` names the option."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------
# Contexts


def build_context(options: Any) -> ssl.SSLContext:
    """A server SSLContext from an SslOptions; raises TlsSetupError naming
    the option (and file) at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _set_versions(context, options.versions)
    _load_files(context, options)
    if options.verify == "verify_peer":
        context.verify_mode = ssl.CERT_REQUIRED if options.fail_if_no_peer_cert \
            else ssl.CERT_OPTIONAL
        try:
            set_verify_depth(context, options.depth)
        except OpenSSLUnavailable as exc:
            raise TlsSetupError("depth", str(exc)) from None
    else:
        context.verify_mode = ssl.CERT_NONE
    if options.ciphers:
        _set_ciphers(context, options.ciphers, legacy="tlsv1" in options.versions
                     or "tlsv1.1" in options.versions)
    elif "tlsv1" in options.versions or "tlsv1.1" in options.versions:
        # OpenSSL 3 refuses TLS 1.0/1.1 at its default security level; an
        # operator who lists them wants them to work.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if options.honor_cipher_order:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if not options.reuse_sessions:
        context.options |= ssl.OP_NO_TICKET
    return context


def _set_versions(context: ssl.SSLContext, versions: tuple[str, ...]) -> None:
    chosen = sorted(_VERSIONS[name] for name in versions)
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0/1.1; an operator who lists them has chosen
        # them (check-config warns), so the choice is not repeated per start.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = chosen[0]
        context.maximum_version = chosen[-1]
        for name, version in _VERSIONS.items():
            if chosen[0] < version < chosen[-1] and name not in versions:
                context.options |= _NO_VERSION_OPTION[name]  # a gap in the list


def _load_files(context: ssl.SSLContext, options: Any) -> None:
    for key in ("certfile", "keyfile", "cacertfile"):
        path = getattr(options, key)
        if path and not os.path.isfile(path):
            raise TlsSetupError(key, f"{path!r}: no such file")
        if path and not os.access(path, os.R_OK):
            raise TlsSetupError(key, f"{path!r}: not readable")
    try:
        context.load_cert_chain(options.certfile, options.keyfile, options.password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsSetupError("keyfile", f"{options.keyfile!r} is not the key of the "
                                           f"certificate in {options.certfile!r}") from None
        raise TlsSetupError("certfile", f"cannot load {options.certfile!r} with "
                                        f"{options.keyfile!r}: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsSetupError("certfile", f"cannot load {options.certfile!r}: {exc}") from None
    if options.cacertfile:
        try:
            context.load_verify_locations(cafile=options.cacertfile)
        except (ssl.SSLError, OSError) as exc:
            raise TlsSetupError("cacertfile", f"cannot load {options.cacertfile!r}: "
                                              f"{getattr(exc, 'reason', None) or exc}") from None


def _set_ciphers(context: ssl.SSLContext, ciphers: tuple[str, ...], legacy: bool) -> None:
    tls13 = [name for name in ciphers if name in _TLS13_SUITES]
    older = [_IANA_TO_OPENSSL.get(name, name) for name in ciphers if name not in _TLS13_SUITES]
    for name in older:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(name + ":@SECLEVEL=0")
        except ssl.SSLError:
            raise TlsSetupError("ciphers", f"unknown cipher suite {name!r}") from None
    if older:
        context.set_ciphers(":".join(older) + (":@SECLEVEL=0" if legacy else ""))
    elif context.minimum_version < ssl.TLSVersion.TLSv1_3:
        # Only TLS 1.3 suites listed: no older suite is wanted either.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if tls13:
        try:
            set_tls13_ciphersuites(context, tls13)
        except (OpenSSLUnavailable, ssl.SSLError) as exc:
            raise TlsSetupError("ciphers", str(exc)) from None
    elif context.maximum_version > ssl.TLSVersion.TLSv1_2:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if context.minimum_version > context.maximum_version:
        raise TlsSetupError("ciphers", "no listed cipher suite belongs to a TLS version in "
                                       "versions (TLS 1.3 suites are TLS_AES_* and "
                                       "TLS_CHACHA20_POLY1305_SHA256)")


# --------------------------------------------------------------------------
# Certificate facts


def certificate_facts(der: bytes) -> PeerCertificate:
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        san = None
    try:
        usages = cert.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value
        eku = tuple(oid.dotted_string for oid in usages)
    except x509.ExtensionNotFound:
        eku = ()

    def sans(kind: Any) -> tuple[str, ...]:
        return tuple(str(value) for value in san.get_values_for_type(kind)) if san else ()

    return PeerCertificate(
        der=der,
        subject=cert.subject.rfc4514_string(),
        common_name=str(names[0].value) if names else None,
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        sha256=hashlib.sha256(der).hexdigest(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        san_dns=sans(x509.DNSName),
        san_uri=sans(x509.UniformResourceIdentifier),
        san_email=sans(x509.RFC822Name),
        san_ip=sans(x509.IPAddress),
        extended_key_usage=eku,
    )


def describe_failure(exc: BaseException) -> str:
    """Why a handshake failed, in an operator's words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return {
            9: "client certificate not yet valid",
            10: "client certificate expired",
            18: "self-signed client certificate",
            19: "client certificate chain ends in an unknown CA",
            20: "client certificate from an unknown CA",
            21: "client certificate from an unknown CA",
            22: "client certificate chain too long (depth)",
            23: "client certificate revoked",
            26: "client certificate not for client use (key usage)",
            3: "no CRL for the client certificate's issuer",
            12: "CRL expired",
        }.get(exc.verify_code, f"client certificate refused: {exc.verify_message}")
    reason = getattr(exc, "reason", None) or ""
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
        return "no client certificate"
    if reason in ("UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "WRONG_SSL_VERSION",
                  "TLSV1_ALERT_PROTOCOL_VERSION"):
        return "TLS version not enabled on this listener"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
                  "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"):
        return "not TLS (plain MQTT or another protocol sent to a TLS port?)"
    if reason in ("NO_SHARED_CIPHER", "NO_SUITABLE_SIGNATURE_ALGORITHM"):
        return "no cipher suite in common"
    if reason.startswith("SSLV3_ALERT_") or reason.startswith("TLSV1_ALERT_"):
        return "client aborted the handshake: " + reason.split("ALERT_", 1)[1].lower().replace("_", " ")
    return f"TLS error: {reason or exc}"


# --------------------------------------------------------------------------
# The listener


class TlsListener(Listener):
    kind = "ssl"

    def __init__(self, name: str, host: str, port: int, core: BrokerCore, *,
                 context: ssl.SSLContext, handshake_timeout: float, **options: Any) -> None:
        super().__init__(name, host, port, core, **options)
        #: Used for each new connection; replacing it leaves old ones as they are.
        self.context = context
        self.handshake_timeout = handshake_timeout
        #: Failed handshakes by reason, for operators and metrics.
        self.handshake_failures: collections.Counter[str] = collections.Counter()

    def protocol_factory(self) -> asyncio.Protocol:
        return TlsProtocol(self)

    def handshake_failed(self, peer: tuple | None, reason: str) -> None:
        self.handshake_failures[reason] += 1
        host = f"{peer[0]}:{peer[1]}" if peer else "?"
        log.info("listener %s: TLS handshake with %s failed: %s", self.id, host, reason)

    def tls_peer_info(self, transport: asyncio.Transport, sslobj: ssl.SSLObject) -> PeerInfo:
        peername = transport.get_extra_info("peername")
        der = sslobj.getpeercert(binary_form=True)
        cipher = sslobj.cipher()
        return PeerInfo(
            listener=self.id, address=tuple(peername[:2]) if peername else None, tls=True,
            tls_version=sslobj.version(), cipher=cipher[0] if cipher else None,
            certificate=certificate_facts(der) if der else None)


class TlsProtocol(asyncio.Protocol):
    """TLS over the socket transport; to the core's Connection it is the transport."""

    __slots__ = ("listener", "transport", "connection", "_in", "_out", "_ssl", "_timer",
                 "_closing")

    def __init__(self, listener: TlsListener) -> None:
        self.listener = listener
        self.transport: Any = None
        self.connection: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    # from the socket -------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        listener = self.listener
        if not listener.admit(transport):
            return
        self.transport = transport
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = listener.context.wrap_bio(self._in, self._out, server_side=True)
        self._timer = asyncio.get_running_loop().call_later(
            listener.handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._in.write(data)
        if self.connection is None and not self._handshake():
            return
        self._read()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused over max_connections
        self.listener.connection_count -= 1
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.connection is not None:
            self.connection.pause_writing()

    def resume_writing(self) -> None:
        if self.connection is not None:
            self.connection.resume_writing()

    # TLS -------------------------------------------------------------------

    def _handshake(self) -> bool:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._send_records()
            return False
        except ssl.SSLError as exc:
            self._send_records()  # the alert tells the client why
            self._fail(describe_failure(exc))
            return False
        self._send_records()
        self._timer.cancel()
        self._timer = None
        listener = self.listener
        self.connection = listener.core.attach(self, listener.tls_peer_info(self.transport, self._ssl))
        return True

    def _read(self) -> None:
        chunks = []
        sslobj = self._ssl
        while True:
            try:
                chunk = sslobj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                self._closing = True
                break
            except ssl.SSLError as exc:
                log.info("listener %s: TLS error from %s: %s", self.listener.id,
                         self.transport.get_extra_info("peername"), describe_failure(exc))
                self._closing = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._send_records()  # key updates, session tickets
        if chunks and self.connection is not None:
            self.connection.data_received(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        if self._closing and self.transport is not None:
            self.transport.close()

    def _send_records(self) -> None:
        if self._out.pending and self.transport is not None:
            self.transport.write(self._out.read())

    def _fail(self, reason: str) -> None:
        self._closing = True
        self.listener.handshake_failed(self.transport.get_extra_info("peername"), reason)
        self.transport.close()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.connection is None and self.transport is not None and not self._closing:
            self._fail(f"handshake not completed within {self.listener.handshake_timeout:g}s")

    # the transport the core's Connection writes to ---------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self._closing:
            return
        self._ssl.write(data)
        self.transport.write(self._out.read())

    def close(self) -> None:
        if self.transport is None or self._closing:
            return
        self._closing = True
        try:
            self._ssl.unwrap()  # close_notify
        except ssl.SSLError:
            pass
        self._send_records()
        self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport else default


