"""A development PKI: one CA, server and client certificates, a CRL.

Enough to run the TLS listeners and their client-certificate authentication
without reaching for openssl recipes, and what the TLS tests use to make real
certificates. Not a production CA: the CA key sits unencrypted next to the
certificates it signs.

Layout of a PKI directory::

    ca.pem  ca.key          the CA (10 years)
    server.pem  server.key  localhost, 127.0.0.1, ::1 and the --host names
    crl.pem                 the revocation list, present from the start so
                            that CRL checking can be switched on at once
    <name>.pem  <name>.key  clients and further servers
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from bastionmq.listeners.settings import DEV_PKI_DIR

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CRL",
    "DEFAULT_DIR",
    "IssuedFiles",
    "KeyType",
    "PkiError",
    "describe",
    "init_pki",
    "issue_client",
    "issue_server",
    "revoke",
]

KeyType = Literal["ec", "rsa2048", "rsa3072", "rsa4096"]
#: The development PKI of a project directory (node.data_dir "data"); the
#: broker and `bastionmq certs` use node.data_dir/certs of the configuration.
DEFAULT_DIR = Path(DEV_PKI_DIR)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_NAME = "server"
CRL = "crl.pem"

CA_DAYS = 3650
CRL_DAYS = 30
# Certificates start slightly in the past so that a peer whose clock is a
# little behind does not see them as "not yet valid".
BACKDATE = timedelta(minutes=5)

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_RSA_BITS = {"rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096}
_RESERVED = frozenset({"ca", SERVER_NAME, "crl"})
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9._@-]+")
_EKU = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    # For a delegated OCSP responder (RFC 6960 4.2.2.2).
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
}
_EKU_NAMES = {oid: name for name, oid in _EKU.items()}
# Most significant first, so RFC 4514 text reads CN=...,OU=...,O=...,C=...
_SUBJECT_ORDER = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
}
_REASONS = {flag.value: flag for flag in x509.ReasonFlags}


class PkiError(Exception):
    """A PKI operation that cannot be done; the message says what to do."""


@attrs.define(slots=True, frozen=True)
class IssuedFiles:
    cert: Path
    key: Path


@attrs.define(slots=True, frozen=True)
class _Authority:
    cert: x509.Certificate
    key: _PrivateKey


def init_pki(directory: Path, hosts: Sequence[str] = (), key_type: KeyType = "ec",
             days: int = 825, force: bool = False) -> IssuedFiles:
    """Create a CA, a server certificate and an empty CRL in ``directory``.

    Returns the server's files. Refuses to replace an existing CA unless
    ``force``: every certificate it signed would stop verifying.
    """
    directory = Path(directory)
    _check_days(days)
    if not force:
        for name in (CA_CERT, CA_KEY):
            if (directory / name).exists():
                raise PkiError(f"{directory / name} already exists; replacing the CA "
                               "invalidates every certificate it signed (use --force to do it)")
    server_hosts = _unique(["localhost", "127.0.0.1", "::1", *hosts])
    sans = _host_sans(server_hosts)
    # Checked before anything is written, so a bad host leaves no half-made PKI.
    server_subject = _subject(hosts[0] if hosts else "localhost")
    directory.mkdir(parents=True, exist_ok=True)

    now = _now()
    ca_key = _generate_key(key_type)
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bastionmq development"),
        x509.NameAttribute(NameOID.COMMON_NAME, "bastionmq development CA"),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca = _Authority(ca_cert, ca_key)
    _write_key(directory / CA_KEY, ca_key)
    _write_cert(directory / CA_CERT, ca_cert)
    _write_crl(directory, ca, [], number=1)

    return _issue(ca, _paths(directory / SERVER_NAME), server_subject, key_type,
                  (now - BACKDATE, now + timedelta(days=days)), ["serverAuth"], sans)


def issue_client(directory: Path, name: str, key_type: KeyType = "ec", days: int = 825,
                 not_before: datetime | None = None, not_after: datetime | None = None,
                 extended_key_usage: Sequence[str] = ("clientAuth",),
                 san_dns: Sequence[str] = (), san_uri: Sequence[str] = (),
                 san_email: Sequence[str] = (), san_ip: Sequence[str] = (),
                 extra_subject: Mapping[str, str] | None = None,
                 output: Path | None = None, crl_url: str | None = None,
                 replace: bool = True, ocsp_url: str | None = None) -> IssuedFiles:
    """A client certificate with CN=``name``, signed by the CA in ``directory``.

    ``crl_url`` names a CRL distribution point in the certificate, ``ocsp_url``
    an OCSP responder (authority information access).

    Written as ``directory/<name>.pem`` and ``.key``, or as ``<output>.pem``
    and ``<output>.key`` when ``output`` is given; only then may ``name`` hold
    characters that do not belong in a file name. Without ``replace``, files
    there already are an error.
    """
    directory = Path(directory)
    files = _paths(Path(output)) if output is not None else _paths(directory / _file_name(name))
    _check_new(files, replace)
    ca = _load_authority(directory)
    validity = _validity(days, not_before, not_after)
    sans: list[x509.GeneralName] = []
    try:
        sans += [x509.DNSName(value) for value in san_dns]
        sans += [x509.UniformResourceIdentifier(value) for value in san_uri]
        sans += [x509.RFC822Name(value) for value in san_email]
    except ValueError as exc:
        raise PkiError(f"invalid subject alternative name: {exc}") from None
    sans += [x509.IPAddress(_ip(value)) for value in san_ip]
    return _issue(ca, files, _subject(name, extra_subject), key_type, validity,
                  extended_key_usage, sans, crl_url, ocsp_url)


def issue_server(directory: Path, name: str, hosts: Sequence[str], key_type: KeyType = "ec",
                 days: int = 825, replace: bool = True) -> IssuedFiles:
    """Another server certificate from the CA in ``directory``, for ``hosts``
    only; without ``replace``, files there already are an error."""
    directory = Path(directory)
    files = _paths(directory / _file_name(name))
    _check_new(files, replace)
    hosts = _unique(hosts)
    if not hosts:
        raise PkiError(f"server certificate {name!r} needs at least one host name or address")
    sans = _host_sans(hosts)
    ca = _load_authority(directory)
    return _issue(ca, files, _subject(hosts[0]), key_type, _validity(days, None, None),
                  ["serverAuth"], sans)


def revoke(directory: Path, cert_file: Path, reason: str = "unspecified") -> Path:
    """Add ``cert_file``'s serial to ``directory/crl.pem`` and re-sign it."""
    directory = Path(directory)
    if reason not in _REASONS:
        raise PkiError(f"unknown revocation reason {reason!r}; "
                       f"use one of {', '.join(sorted(_REASONS))}")
    ca = _load_authority(directory)
    cert = _load_certs(Path(cert_file))[0]
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{cert_file} was not issued by the CA in {directory / CA_CERT}; "
                       "only that CA's certificates can go on its CRL") from None

    entries: list[x509.RevokedCertificate] = []
    number = 1
    crl_path = directory / CRL
    if crl_path.exists():
        crl = _load_crl(crl_path, ca)
        entries = list(crl)
        number = _crl_number(crl) + 1
    if not any(entry.serial_number == cert.serial_number for entry in entries):
        entry = (x509.RevokedCertificateBuilder()
                 .serial_number(cert.serial_number)
                 .revocation_date(_now()))
        # RFC 5280 5.3.1: the reason code "unspecified" SHOULD be left out.
        if reason != "unspecified":
            entry = entry.add_extension(x509.CRLReason(_REASONS[reason]), critical=False)
        entries.append(entry.build())
    _write_crl(directory, ca, entries, number)
    return crl_path


def describe(cert_file: Path) -> str:
    """Human-readable facts about each certificate in ``cert_file``."""
    certs = _load_certs(Path(cert_file))
    blocks = []
    for index, cert in enumerate(certs, 1):
        lines = [f"certificate {index} of {len(certs)}"] if len(certs) > 1 else []
        lines += _describe_one(cert)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------ issuing


def _issue(ca: _Authority, files: IssuedFiles, subject: x509.Name, key_type: KeyType,
           validity: tuple[datetime, datetime], extended_key_usage: Sequence[str],
           sans: Sequence[x509.GeneralName], crl_url: str | None = None,
           ocsp_url: str | None = None) -> IssuedFiles:
    unknown = [name for name in extended_key_usage if name not in _EKU]
    if unknown:
        raise PkiError(f"unknown extended key usage {', '.join(unknown)}; "
                       f"use {', '.join(_EKU)}")
    key = _generate_key(key_type)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # keyEncipherment only means something for RSA key transport.
        .add_extension(_key_usage(digital_signature=True,
                                  key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(_authority_key_identifier(ca.cert), critical=False)
    )
    if extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([_EKU[name] for name in _unique(extended_key_usage)]),
            critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if crl_url:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    if ocsp_url:
        builder = builder.add_extension(x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                   x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    files.cert.parent.mkdir(parents=True, exist_ok=True)
    _write_key(files.key, key)
    _write_cert(files.cert, cert)
    return files


def _generate_key(key_type: KeyType) -> _PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in _RSA_BITS:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[key_type])
    raise PkiError(f"unknown key type {key_type!r}; use ec, {', '.join(_RSA_BITS)}")


def _key_usage(digital_signature: bool = False, key_encipherment: bool = False,
               key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
        key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False,
        decipher_only=False)


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_ca_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _ca_public_key(ca_cert: x509.Certificate) -> _PublicKey:
    """The CA certificate's key, which signs: the CA key's half, so EC or RSA
    (_load_authority refuses any other CA key)."""
    key = ca_cert.public_key()
    if not isinstance(key, _PublicKey):
        raise PkiError(f"the CA certificate holds a {type(key).__name__}; "
                       "the CA key must be EC or RSA")
    return key


def _subject(common_name: str, extra: Mapping[str, str] | None = None) -> x509.Name:
    extra = dict(extra or {})
    unknown = [name for name in extra if name not in _SUBJECT_ORDER]
    if unknown:
        raise PkiError(f"unknown subject attribute {', '.join(unknown)}; "
                       f"use {', '.join(_SUBJECT_ORDER)}")
    try:
        attributes = [x509.NameAttribute(oid, extra[name])
                      for name, oid in _SUBJECT_ORDER.items() if name in extra]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    except ValueError as exc:
        raise PkiError(f"invalid subject: {exc}") from None
    return x509.Name(attributes)


def _host_sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(_dns_name(host))
    return sans


def _dns_name(host: str) -> x509.DNSName:
    if not host or not host.isascii():
        raise PkiError(f"invalid host name {host!r}; give an ASCII (punycode) name "
                       "or an IP address")
    return x509.DNSName(host)


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise PkiError(f"invalid IP address {value!r}") from None


def _validity(days: int, not_before: datetime | None,
              not_after: datetime | None) -> tuple[datetime, datetime]:
    now = _now()
    start = _utc(not_before) if not_before is not None else now - BACKDATE
    if not_after is not None:
        end = _utc(not_after)
    else:
        _check_days(days)
        end = (start if not_before is not None else now) + timedelta(days=days)
    if end <= start:
        raise PkiError(f"not_after ({end:%Y-%m-%d %H:%M:%S}) must be later than "
                       f"not_before ({start:%Y-%m-%d %H:%M:%S})")
    return start, end


def _check_days(days: int) -> None:
    if days < 1:
        raise PkiError(f"days must be at least 1, not {days}")


def _utc(moment: datetime) -> datetime:
    # A naive datetime is taken as UTC, the only zone certificates know.
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


# ------------------------------------------------------------------ revocation


def _write_crl(directory: Path, ca: _Authority, entries: Sequence[x509.RevokedCertificate],
               number: int) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_identifier(ca.cert), critical=False)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    _write_atomic(directory / CRL, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_crl(path: Path, ca: _Authority) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read the CRL {path}: {exc}") from None
    if not crl.is_signature_valid(_ca_public_key(ca.cert)):
        raise PkiError(f"{path} is not signed by the CA next to it; "
                       "remove it to start a new, empty CRL")
    return crl


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


# ------------------------------------------------------------------ files


def _paths(stem: Path) -> IssuedFiles:
    # Appended rather than with_suffix(): a stem such as "alice.example" keeps its dot.
    return IssuedFiles(cert=stem.with_name(stem.name + ".pem"),
                       key=stem.with_name(stem.name + ".key"))


def _check_new(files: IssuedFiles, replace: bool) -> None:
    if replace:
        return
    for path in (files.cert, files.key):
        if path.exists():
            raise PkiError(f"{path} exists already; --force replaces it (the certificate "
                           "it holds stays valid until it expires or is revoked: "
                           f"bastionmq certs revoke {files.cert})")


def _file_name(name: str) -> str:
    if not _FILE_NAME_RE.fullmatch(name) or name.startswith("."):
        raise PkiError(f"{name!r} cannot be used as a file name: use letters, digits "
                       "and . _ @ - only, not starting with a dot")
    if name.lower() in _RESERVED:
        raise PkiError(f"{name!r} is reserved for the PKI's own {name.lower()} files; "
                       "choose another name")
    return name


def _load_authority(directory: Path) -> _Authority:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if not path.exists():
            raise PkiError(f"{path} not found; create the CA first "
                           f"(bastionmq certs init {directory})")
    cert = _load_certs(cert_path)[0]
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot read the CA key {key_path}: {exc}") from None
    if not isinstance(key, _PrivateKey):
        raise PkiError(f"{key_path} holds a {type(key).__name__}; the CA key must be EC or RSA")
    return _Authority(cert, key)


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise PkiError(f"{path} does not hold a PEM or DER certificate") from None


def _write_key(path: Path, key: _PrivateKey) -> None:
    _write_atomic(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write through a new file renamed into place.

    A listener reloading its files never reads half a file, and a key is
    never readable by others for a moment: its file is born with ``mode``,
    whatever the mode of the file it replaces.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ describing


def _describe_one(cert: x509.Certificate) -> list[str]:
    now = _now()
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    state = " (EXPIRED)" if after < now else " (not yet valid)" if before > now else ""
    lines = [
        f"subject:      {cert.subject.rfc4514_string()}",
        f"issuer:       {cert.issuer.rfc4514_string()}",
        f"serial:       {_serial_hex(cert.serial_number)}",
    ]
    sans = _extension(cert, x509.SubjectAlternativeName)
    if sans is not None:
        lines.append(f"alt names:    {', '.join(_general_name(name) for name in sans)}")
    lines += [
        f"not before:   {before:%Y-%m-%d %H:%M:%S} UTC",
        f"not after:    {after:%Y-%m-%d %H:%M:%S} UTC{state}",
        f"sha256:       {_fingerprint(cert)}",
        f"key:          {_describe_key(cert.public_key())}",
    ]
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is not None:
        names = (_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku)
        lines.append(f"key purposes: {', '.join(names)}")
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        lines.append("CA:           yes")
    return lines


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _general_name(name: x509.GeneralName) -> str:
    kinds = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email",
             x509.UniformResourceIdentifier: "URI"}
    return f"{kinds.get(type(name), type(name).__name__)}:{name.value}"


def _serial_hex(serial: int) -> str:
    # Whole bytes, as openssl prints serials, so the two can be compared by eye.
    digits = f"{serial:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} ({key.key_size} bits)"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    return type(key).__name__
