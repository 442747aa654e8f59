"""TLS material of a listener: ``ssl_options`` made into SSL contexts
(versions, ciphers, certificates and keys, SNI, TLS-PSK), the CRLs it checks,
the files it was built from (for reloads), why a handshake failed in an
operator's words, and the server certificates' expiry warnings.

Everything here can fail at start-up or reload with a ``TlsSetupError`` that
names the option at fault; nothing here runs per connection except
``describe_failure``.
"""

from __future__ import annotations

import datetime
import os
import ssl
import warnings
from typing import Any

import attrs
from cryptography import x509

from bastionmq.broker.settings import SettingError

from .crl import CrlError, CrlStore, load_ca_certificates, load_crl_files
from .openssl import (
    OpenSSLUnavailable, disable_session_cache, enable_stapling, set_tls13_ciphersuites,
    set_verify_depth,
)
from .settings import CrlCacheConfig, PskConfig, SslOptions
from .stapling import StapleTarget, staple_target

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


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class TlsSetupError(SettingError):
    """``ssl_options`` that cannot make a context; ``key`` is the option's
    path below ``ssl_options`` (the PSK file's is a top-level key)."""


def ssl_options_path(kind: str, name: str) -> str:
    """The key path of the ``ssl_options`` of listener ``kind`` (ssl, wss) ``name``."""
    return f"listeners.{kind}.{name}.ssl_options"


# Contexts


def build_context(options: SslOptions, psk: bool = False) -> ssl.SSLContext:
    """A server SSLContext from an SslOptions; raises TlsSetupError naming
    the option (and file) at fault. ``psk``: a context that can serve TLS-PSK."""
    context = _psk_context() if psk else ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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


def build_client_context(options: Any) -> ssl.SSLContext:
    """A client SSLContext (a node's connection to NATS) from options in
    ssl_options' vocabulary (cluster.settings.NatsTlsConfig): verify_peer
    checks the server's certificate against cacertfile (the system's CAs
    when unset) and its name; certfile and keyfile, when set, are presented.
    Raises TlsSetupError naming the option at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _set_versions(context, options.versions)
    _load_files(context, options)
    if options.verify == "verify_peer":
        if not options.cacertfile:
            context.load_default_certs()
        context.check_hostname = options.server_name_indication != "disable"
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if options.ciphers:
        _set_ciphers(context, options.ciphers, legacy="tlsv1" in options.versions
                     or "tlsv1.1" in options.versions)
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


def missing_files(options: SslOptions, psk: PskConfig | None = None) -> list[TlsSetupError]:
    """Every file ``options`` would load that is missing or unreadable, each
    naming its option: load_material stops at the first, an operator wants
    the whole list (check-config, start-up)."""
    named: list[tuple[str, str | None, bool]] = [
        ("certfile", options.certfile, False), ("keyfile", options.keyfile, False)]
    if options.verify == "verify_peer":  # without it no CA file is used
        named.append(("cacertfile", options.cacertfile, False))
    for index, entry in enumerate(options.server_names):
        named += [(f"server_names.{index}.certfile", entry.certfile, False),
                  (f"server_names.{index}.keyfile", entry.keyfile, False)]
    if options.enable_crl_check:
        named += [("crlfile", path, False) for path in options.crlfile]
    if psk is not None and _serves_psk(options, psk):
        named.append(("psk_authentication.init_file", psk.init_file, True))
    problems = []
    for key, path, top_level in named:
        if not path:
            continue
        if not os.path.isfile(path):
            problems.append(TlsSetupError(key, f"{path!r}: no such file", top_level=top_level))
        elif not os.access(path, os.R_OK):
            problems.append(TlsSetupError(key, f"{path!r}: not readable", top_level=top_level))
    return problems


def _load_files(context: ssl.SSLContext, options: Any) -> None:
    keys = ("certfile", "keyfile", "cacertfile") if options.verify == "verify_peer" \
        else ("certfile", "keyfile")  # without verify_peer no CA file is used
    for key in keys:
        path = getattr(options, key)
        if path and not os.path.isfile(path):
            raise TlsSetupError(key, f"{path!r}: no such file")
        if path and not os.access(path, os.R_OK):
            raise TlsSetupError(key, f"{path!r}: not readable")
    if options.certfile:  # a client may have none
        _load_cert_chain(context, options)
    if options.cacertfile and options.verify == "verify_peer":
        try:
            context.load_verify_locations(cafile=options.cacertfile)
        except (ssl.SSLError, OSError) as exc:
            raise TlsSetupError("cacertfile", f"cannot load {options.cacertfile!r}: "
                                              f"{getattr(exc, 'reason', None) or exc}") from None


def _load_cert_chain(context: ssl.SSLContext, options: Any) -> None:
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




def _psk_context() -> ssl.SSLContext:
    try:
        from .psk import PskContext
    except ImportError:
        raise TlsSetupError(
            "psk_authentication.enable", "TLS-PSK needs the psk extra, which is not "
            "installed: pip install 'bastionmq[psk]' (sslpsk3)", top_level=True) from None
    return PskContext(ssl.PROTOCOL_TLS_SERVER)


def _serves_psk(options: SslOptions, psk: PskConfig) -> bool:
    return psk.enable and any("PSK" in name for name in options.ciphers)


def load_psk_file(path: str, separator: str) -> dict[str, bytes]:
    """identity -> key from lines ``identity<separator>hexkey``."""
    keys = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise TlsSetupError("psk_authentication.init_file", f"{path!r}: {exc.strerror or exc}",
                            top_level=True) from None
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
            raise TlsSetupError("psk_authentication.init_file", f"{path}:{number}: {exc}",
                                top_level=True) from None
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
    #: (role: server or ca, subject, expiry as a Unix time) of each
    #: certificate it presents or trusts, for the operator's alerts.
    certificates: tuple[tuple[str, str, float], ...] = ()
    #: The CAs whose client certificates are asked about by OCSP
    #: (ssl_options.ocsp.enable_client_check), else None.
    ocsp_issuers: tuple[x509.Certificate, ...] | None = None
    #: What the context staples for (ssl_options.ocsp.enable_stapling), else None.
    staple_target: StapleTarget | None = None


def load_material(options: SslOptions, crl_cache: CrlCacheConfig,
                  psk: PskConfig | None = None) -> TlsMaterial:
    """Build and check everything ``ssl_options`` names; raises TlsSetupError
    naming the option and file at fault, leaving nothing half-loaded."""
    serves_psk = psk is not None and _serves_psk(options, psk)
    context = build_context(options, serves_psk)
    revocation = None
    paths = {"certfile": options.certfile, "keyfile": options.keyfile}
    if options.cacertfile and options.verify == "verify_peer":
        paths["cacertfile"] = options.cacertfile
    sni: dict[str, ssl.SSLContext] = {}
    for index, entry in enumerate(options.server_names):
        try:
            named = build_context(attrs.evolve(options, certfile=entry.certfile,
                                               keyfile=entry.keyfile, password=entry.password),
                                  serves_psk)
        except TlsSetupError as exc:
            raise TlsSetupError(f"server_names.{index}.{exc.key}", str(exc),
                                top_level=exc.top_level) from None
        sni.update((name.lower(), named) for name in entry.names)
        paths[f"server_names.{index}.certfile"] = entry.certfile
        paths[f"server_names.{index}.keyfile"] = entry.keyfile
    psk_keys = None
    if serves_psk:
        # serves_psk needs a psk with enable set, and PskConfig refuses enable without init_file.
        assert psk is not None and psk.init_file is not None
        psk_keys = load_psk_file(psk.init_file, psk.separator)
        paths["psk"] = psk.init_file
    if options.enable_crl_check:
        try:
            cas = load_ca_certificates(options.cacertfile)
        except (OSError, ValueError) as exc:
            raise TlsSetupError("cacertfile", f"{options.cacertfile!r}: {exc}") from None
        revocation = CrlStore(cas, capacity=crl_cache.capacity)
        try:
            load_crl_files(revocation, options.crlfile)
        except (CrlError, OSError) as exc:
            raise TlsSetupError("crlfile", str(exc)) from None
    ocsp_issuers = None
    if options.ocsp.enable_client_check:
        try:
            ocsp_issuers = tuple(load_ca_certificates(options.cacertfile))
        except (OSError, ValueError) as exc:
            raise TlsSetupError("cacertfile", f"{options.cacertfile!r}: {exc}") from None
    target = None
    if options.ocsp.enable_stapling:
        try:
            target = staple_target(options)
        except ValueError as exc:
            raise TlsSetupError(*exc.args) from None
        try:
            enable_stapling(context)
        except OpenSSLUnavailable as exc:
            raise TlsSetupError("ocsp.enable_stapling", str(exc)) from None
        paths["ocsp.issuer_pem"] = options.ocsp.issuer_pem or ""
    watched = (*paths.values(), *(options.crlfile if options.enable_crl_check else ()))
    return TlsMaterial(context, revocation, mtimes(dict.fromkeys(watched, 0.0)), sni, psk_keys,
                       _expiries(options), ocsp_issuers, target)


def _expiries(options: SslOptions) -> tuple[tuple[str, str, float], ...]:
    """(role, subject, not after) of the server and CA certificates in use."""
    found = [("server", cert) for _, cert in server_certificates(options)]
    if options.cacertfile and options.verify == "verify_peer":
        try:
            found += [("ca", cert) for cert in load_ca_certificates(options.cacertfile)]
        except (OSError, ValueError):
            pass  # the context was built from it: it cannot fail here but by a race
    return tuple((role, cert.subject.rfc4514_string(), cert.not_valid_after_utc.timestamp())
                 for role, cert in found)


#: A server certificate expiring within this is warned about at start and daily.
EXPIRY_WARNING = datetime.timedelta(days=30)


def server_certificates(options: SslOptions) -> list[tuple[str, x509.Certificate]]:
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


def expiry_warnings(options: SslOptions, now: datetime.datetime | None = None) -> list[str]:
    """A line for each server certificate that has expired or expires soon."""
    now = now or now_utc()
    lines = []
    for path, cert in server_certificates(options):
        left = cert.not_valid_after_utc - now
        if left <= datetime.timedelta(0):
            lines.append(f"the certificate in {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        elif left <= EXPIRY_WARNING:
            lines.append(f"the certificate in {path} expires on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d} (in {left.days} days)")
    return lines


def mtimes(files: dict[str, float]) -> dict[str, float]:
    mtimes = {}
    for path in files:
        try:
            mtimes[path] = os.stat(path).st_mtime
        except OSError:
            mtimes[path] = 0.0
    return mtimes
