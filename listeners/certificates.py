"""What a client certificate says, from its DER parsed once (cryptography):
the facts the authentication and ACL chains read (ports.CertificateFacts)
and the certificate the CRL checks look up."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from bastionmq.broker.ports import CertificateFacts, PeerCertificate

#: Extended key usages by the names verify_peer_ext_key_usage accepts.
EKU_OIDS = {
    "serverAuth": "1.3.6.1.5.5.7.3.1", "clientAuth": "1.3.6.1.5.5.7.3.2",
    "codeSigning": "1.3.6.1.5.5.7.3.3", "emailProtection": "1.3.6.1.5.5.7.3.4",
    "timeStamping": "1.3.6.1.5.5.7.3.8", "OCSPSigning": "1.3.6.1.5.5.7.3.9",
}


def certificate_facts(der: bytes) -> CertificateFacts:
    """The facts of a certificate in DER (a restored session's, say)."""
    return facts_of(x509.load_der_x509_certificate(der), der)


def facts_of(cert: x509.Certificate, der: bytes) -> CertificateFacts:
    """The facts of ``cert``, whose encoding is ``der``."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san: x509.SubjectAlternativeName | None = \
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
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


class TlsCertificate(PeerCertificate):
    """A client certificate a TLS handshake verified. Its DER is parsed on
    first use, once for the handshake's CRL check and its facts alike: most
    connections never ask, and parsing is a noticeable part of a
    handshake's cost in Python. The parsed certificate is let go once the
    facts are made (a CRL refresh parses it again)."""

    __slots__ = ("_parsed",)

    def __init__(self, der: bytes) -> None:
        super().__init__(der, certificate_facts)  # facts are made from parsed instead
        self._parsed: x509.Certificate | None = None

    @property
    def parsed(self) -> x509.Certificate:
        if self._parsed is None:
            self._parsed = x509.load_der_x509_certificate(self.der)
        return self._parsed

    @property
    def facts(self) -> CertificateFacts:
        if self._facts is None:
            self._facts = facts_of(self.parsed, self.der)
            self._parsed = None
        return self._facts

    @property
    def expires_at(self) -> float:
        """When the certificate expires, as a Unix time. Read from the
        parsed certificate without making the facts (cryptography decodes a
        field when it is asked for: a few microseconds), nor keeping it."""
        if self._facts is not None and self._facts.not_after is not None:
            return self._facts.not_after.timestamp()
        parsed = self._parsed or x509.load_der_x509_certificate(self.der)
        return parsed.not_valid_after_utc.timestamp()
