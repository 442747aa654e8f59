"""OCSP for TLS listeners: client certificates checked with their CA's
responder (RFC 6960), and the responses the server staples (listeners.stapling).

Like the CRL check (listeners.crl), this runs once the handshake has verified
the chain and before the first MQTT byte is read, in the event loop: the
request goes out through the listener's CRL client (aiohttp), so a slow
responder makes one connection wait and nothing else. Only the client (leaf)
certificate is asked about; its issuer must be in the listener's cacertfile,
which is where the responder's signature is checked against.

An answer counts only when it is signed by the issuer itself, or by a
delegated responder whose certificate the issuer signed and which carries the
OCSP-signing extended key usage (RFC 6960 4.2.2.2), echoes the nonce sent
(when the responder echoes one at all: many do not, RFC 8954 2.1), and is
current (thisUpdate not in the future, nextUpdate not past). It is then held
until its nextUpdate, so a client reconnecting costs no request.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import os
import time
from typing import Iterable

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from .crl import GOOD, REVOKED, UNKNOWN, CrlClient
from .settings import OcspConfig

log = logging.getLogger("bastionmq.listener")

#: Largest OCSP response taken (they are a few kilobytes; a chain of
#: delegated responder certificates included).
MAX_RESPONSE_SIZE = 256 * 1024
#: Clock difference tolerated between the broker and the responder.
LEEWAY = datetime.timedelta(minutes=5)
_REQUEST_TYPE = "application/ocsp-request"


class OcspError(ValueError):
    """A response that cannot be used; the message says why."""


@attrs.define(slots=True, frozen=True)
class OcspAnswer:
    """What the responder said of one certificate, as this broker reads it."""

    #: GOOD, REVOKED or UNKNOWN (no usable answer: unreachable, refused, unknown).
    status: str
    #: Why, for the log: the revocation reason, or what went wrong.
    detail: str
    #: Unix time until which the answer may be used without asking again.
    expires: float


def responder_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) OCSP responders the certificate names (authority information access)."""
    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [item.access_location.value for item in access
            if item.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(item.access_location, x509.UniformResourceIdentifier)
            and item.access_location.value.lower().startswith(("http://", "https://"))]


def build_request(cert: x509.Certificate, issuer: x509.Certificate,
                  nonce: bytes | None = None) -> bytes:
    """A DER OCSP request for ``cert``. SHA-1 names the certificate because
    it is the one hash every responder knows (RFC 5019 2.1.1); it is an
    identifier here, not a signature."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(Encoding.DER)


def _signature_valid(key: object, signature: bytes, data: bytes,
                     algorithm: hashes.HashAlgorithm | None) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _names_signer(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if response.responder_key_hash is not None:
        return response.responder_key_hash == \
            x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    return response.responder_name == cert.subject


def _delegate(response: ocsp.OCSPResponse, issuer: x509.Certificate,
              now: datetime.datetime) -> x509.Certificate:
    """The delegated responder certificate the response names, checked:
    issued by ``issuer``, for OCSP signing, valid now."""
    for cert in response.certificates:
        if not _names_signer(response, cert):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise OcspError("signed by a responder the certificate's CA did not issue") from None
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
            raise OcspError("signed by a responder certificate without the OCSP-signing "
                            "extended key usage")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise OcspError("signed by a responder certificate that is not valid now")
        return cert
    raise OcspError("not signed by the certificate's CA nor by a responder it delegated to")


def verify_response(der: bytes, cert: x509.Certificate, issuer: x509.Certificate, *,
                    nonce: bytes | None = None,
                    now: datetime.datetime | None = None) -> ocsp.OCSPSingleResponse:
    """The answer about ``cert`` in response ``der``, once its signature,
    nonce and time window check out; raises OcspError saying which did not."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise OcspError(f"not an OCSP response: {exc}") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"the responder refused: {response.response_status.name.lower()}")
    signer = issuer if _names_signer(response, issuer) else _delegate(response, issuer, now)
    if not _signature_valid(signer.public_key(), response.signature,
                            response.tbs_response_bytes, response.signature_hash_algorithm):
        raise OcspError("its signature does not verify with the responder's key")
    if nonce is not None:
        try:
            echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            echoed = None  # a responder that does not do nonces (RFC 8954 2.1)
        if echoed is not None and echoed != nonce:
            raise OcspError("its nonce is not the one sent (a replayed response?)")
    for single in response.responses:
        if single.serial_number != cert.serial_number:
            continue
        wanted = ocsp.OCSPRequestBuilder().add_certificate(
            cert, issuer, single.hash_algorithm).build()
        if (single.issuer_key_hash, single.issuer_name_hash) != \
                (wanted.issuer_key_hash, wanted.issuer_name_hash):
            continue
        if single.this_update_utc > now + LEEWAY:
            raise OcspError(f"its thisUpdate ({single.this_update_utc:%Y-%m-%d %H:%M:%S}Z) "
                            "is in the future")
        next_update = single.next_update_utc
        if next_update is not None and next_update < now - LEEWAY:
            raise OcspError(f"stale: its nextUpdate ({next_update:%Y-%m-%d %H:%M:%S}Z) "
                            "has passed")
        return single
    raise OcspError("it says nothing about the certificate asked about")


class OcspChecker:
    """A listener's OCSP check of client certificates: the issuers it trusts,
    the answers it holds and the requests it makes."""

    def __init__(self, config: OcspConfig, client: CrlClient) -> None:
        self.config = config
        self.client = client
        self._issuers: dict[bytes, list[x509.Certificate]] = {}
        self._cache: collections.OrderedDict[tuple[bytes, int], OcspAnswer] = \
            collections.OrderedDict()
        self._pending: dict[tuple[bytes, int], asyncio.Task[OcspAnswer]] = {}
        #: Requests sent to responders (answered or not).
        self.requests = 0

    def set_issuers(self, cas: Iterable[x509.Certificate]) -> None:
        """The CAs (cacertfile) whose certificates are checked; a reload calls it again."""
        issuers: dict[bytes, list[x509.Certificate]] = {}
        for ca in cas:
            issuers.setdefault(ca.subject.public_bytes(), []).append(ca)
        self._issuers = issuers

    def issuer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        for ca in self._issuers.get(cert.issuer.public_bytes(), ()):
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        return None

    def cached(self, cert: x509.Certificate) -> OcspAnswer | None:
        answer = self._cache.get(self._key(cert))
        if answer is not None and answer.expires > time.time():
            return answer
        return None

    @staticmethod
    def _key(cert: x509.Certificate) -> tuple[bytes, int]:
        return cert.issuer.public_bytes(), cert.serial_number

    async def status(self, cert: x509.Certificate, *, fresh: bool = False) -> OcspAnswer:
        """The status of ``cert``: from the cache unless ``fresh`` or expired,
        else from the responder. Concurrent callers share one request."""
        if not fresh:
            answer = self.cached(cert)
            if answer is not None:
                return answer
        key = self._key(cert)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.create_task(self._ask(cert))
            pending.add_done_callback(lambda done: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _ask(self, cert: x509.Certificate) -> OcspAnswer:
        now = time.time()
        retry = now + self.config.refresh  # an unknown answer is not asked again sooner
        issuer = self.issuer_of(cert)
        if issuer is None:
            return OcspAnswer(UNKNOWN, "its issuer is not in cacertfile", retry)
        urls = [self.config.responder_url] if self.config.responder_url \
            else responder_urls(cert)
        if not urls:
            return OcspAnswer(UNKNOWN, "no responder_url is set and the certificate names "
                                       "no OCSP responder", retry)
        nonce = os.urandom(16)
        request = build_request(cert, issuer, nonce)
        problems = []
        for url in urls:
            self.requests += 1
            try:
                der = await self.client.post(url, request, _REQUEST_TYPE)
                single = verify_response(der, cert, issuer, nonce=nonce)
            except Exception as exc:  # network, HTTP, size, timeout, or a bad response
                problems.append(f"{url}: {exc}")
                continue
            answer = self._answer(single, now)
            if answer.status == UNKNOWN:
                problems.append(f"{url}: {answer.detail}")
                continue
            self._hold(cert, answer)
            return answer
        for problem in problems:
            log.warning("OCSP for serial %x of %s: %s", cert.serial_number,
                        cert.issuer.rfc4514_string(), problem)
        return OcspAnswer(UNKNOWN, "; ".join(problems), retry)

    def _answer(self, single: ocsp.OCSPSingleResponse, now: float) -> OcspAnswer:
        next_update = single.next_update_utc
        # Without a nextUpdate the responder always has newer news (RFC 6960
        # 4.2.2.1); the answer is held until the next refresh.
        expires = next_update.timestamp() if next_update is not None \
            else now + self.config.refresh
        status = single.certificate_status
        if status == ocsp.OCSPCertStatus.GOOD:
            return OcspAnswer(GOOD, "good", expires)
        if status == ocsp.OCSPCertStatus.REVOKED:
            reason = single.revocation_reason
            return OcspAnswer(REVOKED, f"revoked on {single.revocation_time_utc:%Y-%m-%d %H:%M:%S}Z"
                              + (f" ({reason.value})" if reason is not None else ""), expires)
        return OcspAnswer(UNKNOWN, "the responder does not know the certificate", expires)

    def _hold(self, cert: x509.Certificate, answer: OcspAnswer) -> None:
        key = self._key(cert)
        self._cache.pop(key, None)
        while len(self._cache) >= self.config.cache_capacity:
            self._cache.popitem(last=False)  # the oldest answer goes first
        self._cache[key] = answer
