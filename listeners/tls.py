"""TLS listeners (``listeners.ssl.<name>``, and under WebSocket
``listeners.wss.<name>``): contexts from ``ssl_options``,
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
import datetime
import hashlib
import logging
import os
import ssl
import warnings
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from sslpsk3 import SSLPSKContext

import attrs

from bastionmq.broker.connection import Connection
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.ports import CertificateFacts, PeerCertificate, PeerInfo
from bastionmq.broker.properties import Reason

from .base import Listener, UpperLayer
from .crl import (
    REVOKED, UNKNOWN, CrlError, CrlStore, distribution_points, load_ca_certificates,
    load_crl_files,
)
from .openssl import (
    OpenSSLUnavailable, disable_session_cache, set_tls13_ciphersuites, set_verify_depth,
)

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
_EKU_OIDS = {
    "serverAuth": "1.3.6.1.5.5.7.3.1", "clientAuth": "1.3.6.1.5.5.7.3.2",
    "codeSigning": "1.3.6.1.5.5.7.3.3", "emailProtection": "1.3.6.1.5.5.7.3.4",
    "timeStamping": "1.3.6.1.5.5.7.3.8", "OCSPSigning": "1.3.6.1.5.5.7.3.9",
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


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class TlsSetupError(ValueError):
    """``ssl_options`` that cannot make a context; ``key`` names the option
    (or, for the PSK file, the top-level key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key

    def key_path(self, kind: str, listener_name: str) -> str:
        """The full key path, on listener ``kind`` (ssl, wss) ``listener_name``."""
        if self.key.startswith("psk_authentication."):
            return self.key
        return f"listeners.{kind}.{listener_name}.ssl_options.{self.key}"


# --------------------------------------------------------------------------
# Contexts


def build_context(options: Any, psk: bool = False) -> ssl.SSLContext:
    """A server SSLContext from an SslOptions; raises TlsSetupError naming
    the option (and file) at fault. ``psk``: a context that can serve TLS-PSK."""
    context = PskContext(ssl.PROTOCOL_TLS_SERVER) if psk else ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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
    if options.partial_chain:
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if options.honor_cipher_order:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # Python sets it by default
    if not options.reuse_sessions:
        # Neither tickets (TLS 1.2's, and TLS 1.3's which OP_NO_TICKET alone
        # turns into cached session ids) nor a server-side cache.
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
        try:
            disable_session_cache(context)
        except OpenSSLUnavailable as exc:
            raise TlsSetupError("reuse_sessions", str(exc)) from None
    return context


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey


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
    keys = ("certfile", "keyfile", "cacertfile") if options.verify == "verify_peer" \
        else ("certfile", "keyfile")  # without verify_peer no CA file is used
    for key in keys:
        path = getattr(options, key)
        if path and not os.path.isfile(path):
            raise TlsSetupError(key, f"{path!r}: no such file")
        if path and not os.access(path, os.R_OK):
            raise TlsSetupError(key, f"{path!r}: not readable")
    try:
        # Without a configured password, an encrypted key must fail, not make
        # OpenSSL ask for a pass phrase on the terminal.
        context.load_cert_chain(options.certfile, options.keyfile,
                                options.password if options.password is not None
                                else _no_password)
    except _EncryptedKey:
        raise TlsSetupError("password", f"{options.keyfile!r} is encrypted: set "
                                        "ssl_options.password") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsSetupError("keyfile", f"{options.keyfile!r} is not the key of the "
                                           f"certificate in {options.certfile!r}") from None
        if options.password is not None and exc.library == "SSL" and not exc.reason:
            raise TlsSetupError("password", f"cannot decrypt {options.keyfile!r} with the "
                                            "password given") from None
        raise TlsSetupError("certfile", f"cannot load {options.certfile!r} with "
                                        f"{options.keyfile!r}: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsSetupError("certfile", f"cannot load {options.certfile!r}: {exc}") from None
    if options.cacertfile and options.verify == "verify_peer":
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


def certificate_facts(der: bytes) -> CertificateFacts:
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

    return CertificateFacts(
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
    if reason == "PSK_IDENTITY_NOT_FOUND":
        return "unknown PSK identity"
    if reason in ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "BAD_RECORD_MAC", "DECRYPT_ERROR"):
        return "wrong key (PSK) or corrupted handshake"
    if reason.startswith("SSLV3_ALERT_") or reason.startswith("TLSV1_ALERT_"):
        return "client aborted the handshake: " + reason.split("ALERT_", 1)[1].lower().replace("_", " ")
    return f"TLS error: {reason or exc}"


# --------------------------------------------------------------------------
# The listener


class PskContext(SSLPSKContext):
    """A context serving TLS-PSK (through sslpsk3). Its callbacks are set up
    once per connection by the listener: sslpsk3's own SSLObject would set
    them again on every do_handshake call, restarting a handshake that
    arrives in several reads."""

    sslobject_class = ssl.SSLObject


def _serves_psk(options: Any, psk: Any) -> bool:
    return psk.enable and any("PSK" in name for name in options.ciphers)


def load_psk_file(path: str, separator: str) -> dict[str, bytes]:
    """identity -> key from lines ``identity<separator>hexkey``."""
    keys = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise TlsSetupError("psk_authentication.init_file", f"{path!r}: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        identity, found, key = line.partition(separator)
        try:
            if not found or not identity:
                raise ValueError(f"expected identity{separator}hexkey")
            keys[identity] = bytes.fromhex(key.strip())
            if not keys[identity]:
                raise ValueError("empty key")
        except ValueError as exc:
            raise TlsSetupError("psk_authentication.init_file", f"{path}:{number}: {exc}") from None
    return keys


@attrs.define(slots=True)
class TlsMaterial:
    """What a listener loads from disk: its contexts, CRLs and PSK keys."""

    context: ssl.SSLContext
    revocation: CrlStore | None
    #: Every file it was built from, with its modification time.
    files: dict[str, float]
    #: Host name (lowercase) -> the context with that name's certificate.
    sni: dict[str, ssl.SSLContext] = attrs.field(factory=dict)
    #: PSK identity -> key, when the listener serves PSK.
    psk_keys: dict[str, bytes] | None = None


def load_material(options: Any, crl_cache: Any, psk: Any = None) -> TlsMaterial:
    """Build and check everything ``ssl_options`` names; raises TlsSetupError
    naming the option and file at fault, leaving nothing half-loaded."""
    serves_psk = psk is not None and _serves_psk(options, psk)
    context = build_context(options, serves_psk)
    revocation = None
    paths = {"certfile": options.certfile, "keyfile": options.keyfile}
    if options.cacertfile and options.verify == "verify_peer":
        paths["cacertfile"] = options.cacertfile
    sni = {}
    for index, entry in enumerate(options.server_names):
        try:
            named = build_context(attrs.evolve(options, certfile=entry.certfile,
                                               keyfile=entry.keyfile, password=entry.password),
                                  serves_psk)
        except TlsSetupError as exc:
            raise TlsSetupError(f"server_names.{index}.{exc.key}", str(exc)) from None
        sni.update((name.lower(), named) for name in entry.names)
        paths[f"server_names.{index}.certfile"] = entry.certfile
        paths[f"server_names.{index}.keyfile"] = entry.keyfile
    psk_keys = None
    if serves_psk:
        psk_keys = load_psk_file(psk.init_file, psk.separator)
        paths["psk"] = psk.init_file
    if options.enable_crl_check:
        try:
            cas = load_ca_certificates(options.cacertfile)
        except (OSError, ValueError) as exc:
            raise TlsSetupError("cacertfile", f"{options.cacertfile!r}: {exc}") from None
        revocation = CrlStore(cas, http_timeout=crl_cache.http_timeout,
                              capacity=crl_cache.capacity)
        try:
            load_crl_files(revocation, options.crlfile)
        except (CrlError, OSError) as exc:
            raise TlsSetupError("crlfile", str(exc)) from None
    watched = (*paths.values(), *(options.crlfile if options.enable_crl_check else ()))
    return TlsMaterial(context, revocation, _mtimes(dict.fromkeys(watched, 0.0)), sni, psk_keys)


class TlsListener(Listener):
    kind = "ssl"

    def __init__(self, name: str, host: str, port: int, core: BrokerCore, *,
                 options: Any, crl_cache: Any, psk: Any = None,
                 material: TlsMaterial | None = None, **socket_options: Any) -> None:
        super().__init__(name, host, port, core, **socket_options)
        self.options = options
        self.crl_cache = crl_cache
        self.psk = psk
        #: The connection whose handshake step is running: the SNI and PSK
        #: callbacks fire inside it, synchronously, and report to it.
        self.handshaking: TlsProtocol | None = None
        #: Context and CRLs for new connections; a reload replaces them whole.
        self.material: TlsMaterial
        self._install(material if material is not None
                      else load_material(options, crl_cache, psk))
        #: Failed handshakes by reason, for operators and metrics.
        self.handshake_failures: collections.Counter[str] = collections.Counter()
        self._tasks: list[asyncio.Task] = []

    @property
    def handshake_timeout(self) -> float:
        return self.options.handshake_timeout

    def _install(self, material: TlsMaterial) -> None:
        for context in (material.context, *material.sni.values()):
            context.sni_callback = self._on_sni
            if material.psk_keys is not None:
                context.set_psk_server_callback(self._on_psk, self.options.psk_hint)
        self.material = material

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None,
                context: ssl.SSLContext) -> None:
        if server_name is not None:
            if self.handshaking is not None:
                self.handshaking.sni = server_name
            named = self.material.sni.get(server_name.lower())
            if named is not None:
                sslobj.context = named

    def _on_psk(self, identity: str | None) -> bytes:
        key = self.material.psk_keys.get(identity or "", b"")
        if key and self.handshaking is not None:
            self.handshaking.psk_identity = identity
        return key

    def new_tls(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        material = self.material
        sslobj = material.context.wrap_bio(incoming, outgoing, server_side=True)
        if material.psk_keys is not None:
            material.context.setup_psk_callbacks(sslobj)
        return sslobj

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.create_task(self._warn_of_expiry()))
        if self.options.watch_interval > 0:
            self._tasks.append(asyncio.create_task(self._watch_files()))
        if self.material.revocation is not None:
            self._tasks.append(asyncio.create_task(self._refresh_crls()))

    def stop_accepting(self) -> None:
        super().stop_accepting()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    def protocol_factory(self) -> asyncio.Protocol:
        return TlsProtocol(self)

    def attach(self, protocol: TlsProtocol, peer: PeerInfo) -> Any:
        """What reads from ``protocol`` once its client is admitted: here the
        core's Connection; a listener stacking a layer over TLS (wss) makes
        that layer instead."""
        return Connection(self.core, protocol, peer)

    # reload ----------------------------------------------------------------

    def reload(self, why: str) -> bool:
        """Load the files again and, only if all of them check out, use them
        for new handshakes; established connections stay. Returns success."""
        try:
            material = load_material(self.options, self.crl_cache, self.psk)
        except TlsSetupError as exc:
            log.error("listener %s: not reloading TLS material (%s): %s: %s; "
                      "the previous certificates keep serving", self.id, why,
                      exc.key_path(self.kind, self.name), exc)
            self.material.files = _mtimes(self.material.files)  # not again until it changes
            return False
        old = self.material.revocation
        if old is not None and material.revocation is not None:
            material.revocation.adopt_fetched(old)
        self._install(material)
        log.info("listener %s: reloaded TLS material (%s)", self.id, why)
        self.disconnect_revoked()
        return True

    async def _warn_of_expiry(self) -> None:
        while True:
            for line in expiry_warnings(self.options):
                log.warning("listener %s: %s", self.id, line)
            await asyncio.sleep(86400)

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self.options.watch_interval)
            changed = [path for path, mtime in _mtimes(self.material.files).items()
                       if mtime != self.material.files[path]]
            if changed:
                self.reload(f"changed: {', '.join(changed)}")

    async def _refresh_crls(self) -> None:
        while True:
            await asyncio.sleep(self.crl_cache.refresh_interval)
            store = self.material.revocation
            if store is not None and store.urls:
                await asyncio.gather(*(store.fetch(url) for url in sorted(store.urls)))
                self.disconnect_revoked()

    # revocation --------------------------------------------------------------

    def connections(self) -> list[Any]:
        return [c for c in self.core.connections if c.peer.listener == self.id]

    def disconnect_revoked(self) -> None:
        """Close every connection whose certificate the CRLs now revoke."""
        store = self.material.revocation
        if store is None:
            return
        for connection in self.connections():
            certificate = connection.peer.certificate
            if certificate is not None and \
                    store.check(x509.load_der_x509_certificate(certificate.der)) == REVOKED:
                log.info("listener %s: closing %r: its certificate (serial %x) is revoked",
                         self.id, connection.client_id, certificate.serial)
                connection.close(Reason.ADMINISTRATIVE_ACTION, "client certificate revoked")

    async def check_revocation(self, der: bytes) -> str | None:
        """None when the certificate may connect, else why not. Fetches the
        CRL of a distribution point when no current one is held."""
        store = self.material.revocation
        cert = x509.load_der_x509_certificate(der)
        verdict = store.check(cert)
        if verdict == UNKNOWN:
            for url in distribution_points(cert):
                await store.fetch(url)
                verdict = store.check(cert)
                if verdict != UNKNOWN:
                    break
        if verdict == REVOKED:
            return "client certificate revoked"
        if verdict == UNKNOWN:
            if self.crl_cache.soft_fail:
                log.warning("listener %s: no current CRL for %s; letting the client in "
                            "(crl_cache.soft_fail)", self.id, cert.issuer.rfc4514_string())
                return None
            return "no current CRL for the client certificate's issuer"
        return None

    # handshakes --------------------------------------------------------------

    def handshake_failed(self, peer: tuple | None, reason: str) -> None:
        self.handshake_failures[reason] += 1
        host = f"{peer[0]}:{peer[1]}" if peer else "?"
        log.info("listener %s: TLS handshake with %s failed: %s", self.id, host, reason)

    def tls_peer_info(self, protocol: TlsProtocol) -> PeerInfo:
        peername = protocol.transport.get_extra_info("peername")
        sslobj = protocol._ssl
        der = sslobj.getpeercert(binary_form=True)
        cipher = sslobj.cipher()
        return PeerInfo(
            listener=self.id, address=tuple(peername[:2]) if peername else None, tls=True,
            tls_version=sslobj.version(), cipher=cipher[0] if cipher else None,
            certificate=PeerCertificate(der, certificate_facts) if der else None,
            sni=protocol.sni, psk_identity=protocol.psk_identity)

    def refuse_peer(self, peer: PeerInfo, resumed: bool = False) -> str | None:
        """Why a verified peer may not connect, for checks OpenSSL does not
        make (``resumed``: the handshake resumed a TLS session)."""
        wanted = self.options.verify_peer_ext_key_usage
        certificate = peer.certificate
        if certificate is not None and resumed:
            # OpenSSL checks the validity period in a full handshake only: a
            # resumed TLS session would let a certificate in after it expired.
            # (A full handshake is not made to parse the certificate for it.)
            now = _now()
            if now > certificate.not_after:
                return "client certificate expired"
            if now < certificate.not_before:
                return "client certificate not yet valid"
        if wanted and certificate is not None:
            oid = _EKU_OIDS.get(wanted, wanted)
            if oid not in certificate.extended_key_usage:
                return f"client certificate lacks the extended key usage {wanted}"
        return None


#: A server certificate expiring within this is warned about at start and daily.
EXPIRY_WARNING = datetime.timedelta(days=30)


def server_certificates(options: Any) -> list[tuple[str, x509.Certificate]]:
    """(file, certificate) of each server certificate the listener presents:
    certfile's and each SNI entry's (the first certificate of each file)."""
    found = []
    for path in (options.certfile, *(entry.certfile for entry in options.server_names)):
        try:
            with open(path, "rb") as handle:
                found.append((path, x509.load_pem_x509_certificates(handle.read())[0]))
        except (OSError, ValueError):
            continue  # reported by whatever loads the file for real
    return found


def expiry_warnings(options: Any, now: datetime.datetime | None = None) -> list[str]:
    """A line for each server certificate that has expired or expires soon."""
    now = now or _now()
    lines = []
    for path, cert in server_certificates(options):
        left = cert.not_valid_after_utc - now
        if left <= datetime.timedelta(0):
            lines.append(f"the certificate in {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        elif left <= EXPIRY_WARNING:
            lines.append(f"the certificate in {path} expires on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d} (in {left.days} days)")
    return lines


def _mtimes(files: dict[str, float]) -> dict[str, float]:
    mtimes = {}
    for path in files:
        try:
            mtimes[path] = os.stat(path).st_mtime
        except OSError:
            mtimes[path] = 0.0
    return mtimes


class TlsProtocol(UpperLayer, asyncio.Protocol):
    """TLS over the socket transport; to the core's Connection it is the transport."""

    __slots__ = ("listener", "transport", "connection", "_in", "_out", "_ssl", "_timer",
                 "_closing", "_expiry", "_verified", "sni", "psk_identity")

    def __init__(self, listener: TlsListener) -> None:
        self.listener = listener
        self.transport: Any = None
        self.connection: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        #: Closes the connection when the client certificate's validity ends.
        self._expiry: asyncio.TimerHandle | None = None
        #: The handshake is done and the client was admitted (CRLs included).
        self._verified = False
        #: What the client asked for by SNI and the PSK identity it proved.
        self.sni: str | None = None
        self.psk_identity: str | None = None

    # from the socket -------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        listener = self.listener
        if not listener.admit(transport):
            return
        self.transport = transport
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = listener.new_tls(self._in, self._out)
        self._timer = asyncio.get_running_loop().call_later(
            listener.handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._in.write(data)
        if not self._verified and not self._handshake():
            return
        if self.connection is not None:
            self._read()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused over max_connections
        self.listener.connection_count -= 1
        self.transport = None
        for timer in (self._timer, self._expiry):
            if timer is not None:
                timer.cancel()
        self._timer = self._expiry = None
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.connection_lost(exc)

    # TLS -------------------------------------------------------------------

    def _handshake(self) -> bool:
        listener = self.listener
        listener.handshaking = self
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._send_records()
            return False
        except ssl.SSLError as exc:
            self._send_records()  # the alert tells the client why
            self._fail(describe_failure(exc))
            return False
        finally:
            listener.handshaking = None
        self._send_records()
        self._timer.cancel()
        self._timer = None
        self._verified = True
        peer = listener.tls_peer_info(self)
        refusal = listener.refuse_peer(peer, self._ssl.session_reused)
        if refusal is not None:
            self._fail(refusal)
            return False
        if peer.certificate is not None and listener.material.revocation is not None:
            # Decide on revocation before any MQTT byte is read; a CRL fetch
            # makes this connection wait, never the loop.
            self.transport.pause_reading()
            listener.core.spawn(self._check_revocation(peer))
            return False
        self._attach(peer)
        return True

    async def _check_revocation(self, peer: PeerInfo) -> None:
        refusal = await self.listener.check_revocation(peer.certificate.der)
        if self.transport is None or self._closing:
            return
        if refusal is not None:
            self._fail(refusal)
            return
        self._attach(peer)
        self.transport.resume_reading()
        self._read()
        self.listener.core.outboxes.flush()

    def _attach(self, peer: PeerInfo) -> None:
        listener = self.listener
        if log.isEnabledFor(logging.DEBUG):
            cert = peer.certificate
            log.debug("listener %s: TLS with %s: %s %s%s%s%s", listener.id, peer.host,
                      peer.tls_version, peer.cipher,
                      f", SNI {peer.sni}" if peer.sni else "",
                      f", PSK identity {peer.psk_identity!r}" if peer.psk_identity else "",
                      f", certificate {cert.subject} serial {cert.serial:x} sha256 "
                      f"{cert.sha256} valid until {cert.not_after:%Y-%m-%d}" if cert else "")
        self.connection = listener.attach(self, peer)
        if peer.certificate is not None and listener.options.enforce_cert_lifetime:
            remaining = (peer.certificate.not_after - _now()).total_seconds()
            self._expiry = asyncio.get_running_loop().call_later(
                max(remaining, 0.0), self._certificate_expired)

    def _certificate_expired(self) -> None:
        self._expiry = None
        connection = self.innermost()
        if connection is not None:
            log.info("listener %s: closing %r: its certificate expired", self.listener.id,
                     connection.client_id)
            connection.close(Reason.ADMINISTRATIVE_ACTION, "client certificate expired")
        elif self.connection is not None:  # a layer above (WebSocket) still upgrading
            log.info("listener %s: closing the connection of %s: its certificate expired",
                     self.listener.id, self.transport.get_extra_info("peername"))
            self.close()

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

    def can_write_eof(self) -> bool:
        transport = self.transport
        return transport is not None and not self._closing and transport.can_write_eof()

    def write_eof(self) -> None:
        """The half of a lingering close (see Connection.close): close_notify,
        then the socket's write side shut; what the client still sends is
        read and handed up (and discarded there) until ``close``."""
        try:
            self._ssl.unwrap()  # close_notify; the client's may follow or not
        except ssl.SSLError:
            pass
        self._send_records()
        self.transport.write_eof()

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



