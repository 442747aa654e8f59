"""The verification of OCSP responses (listeners.ocsp.verify_response),
with responses built by cryptography's OCSPResponseBuilder."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastionmq.listeners.ocsp import OcspError, build_request, verify_response

NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
DAY = datetime.timedelta(days=1)


def _cert(cn: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
          eku: list | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return _cert(cn, key, name, key, ca=True), key


CA, CA_KEY = _ca("ca")
OTHER, OTHER_KEY = _ca("other")
LEAF = _cert("leaf", ec.generate_private_key(ec.SECP256R1()), CA.subject, CA_KEY)
DELEGATE_KEY = ec.generate_private_key(ec.SECP256R1())
DELEGATE = _cert("responder", DELEGATE_KEY, CA.subject, CA_KEY,
                 eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
NO_EKU = _cert("responder", DELEGATE_KEY, CA.subject, CA_KEY,
               eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
#: The CA's name on another key.
IMPOSTOR = _cert("ca", OTHER_KEY, CA.subject, OTHER_KEY, ca=True)
FOREIGN = _cert("responder", DELEGATE_KEY, OTHER.subject, OTHER_KEY,
                eku=[ExtendedKeyUsageOID.OCSP_SIGNING])


def _response(*, status=ocsp.OCSPCertStatus.GOOD, cert=LEAF, signer=CA, key=CA_KEY,
              chain=(), nonce: bytes | None = None, this_update=NOW,
              next_update: datetime.datetime | None = NOW + DAY, by_name: bool = False) -> bytes:
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=CA, algorithm=hashes.SHA1(), cert_status=status,
        this_update=this_update, next_update=next_update,
        revocation_time=NOW - DAY if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=x509.ReasonFlags.key_compromise
        if status == ocsp.OCSPCertStatus.REVOKED else None,
    ).responder_id(ocsp.OCSPResponderEncoding.NAME if by_name
                   else ocsp.OCSPResponderEncoding.HASH, signer)
    if chain:
        builder = builder.certificates(list(chain))
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_a_request_names_the_certificate_and_carries_the_nonce():
    request = ocsp.load_der_ocsp_request(build_request(LEAF, CA, b"n" * 16))
    assert request.serial_number == LEAF.serial_number
    assert request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"n" * 16


def test_good_and_revoked_answers_signed_by_the_issuer():
    assert verify_response(_response(), LEAF, CA).certificate_status == ocsp.OCSPCertStatus.GOOD
    revoked = verify_response(_response(status=ocsp.OCSPCertStatus.REVOKED), LEAF, CA)
    assert revoked.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert revoked.revocation_reason == x509.ReasonFlags.key_compromise


def test_a_delegated_responder_with_the_ocsp_signing_usage():
    single = verify_response(_response(signer=DELEGATE, key=DELEGATE_KEY, chain=[DELEGATE]),
                             LEAF, CA)
    assert single.certificate_status == ocsp.OCSPCertStatus.GOOD


@pytest.mark.parametrize(("options", "message"), [
    ({"signer": OTHER, "key": OTHER_KEY, "chain": [OTHER]}, "the certificate's CA did not issue"),
    ({"signer": NO_EKU, "key": DELEGATE_KEY, "chain": [NO_EKU]}, "without the OCSP-signing"),
    ({"signer": FOREIGN, "key": DELEGATE_KEY, "chain": [FOREIGN]}, "did not issue"),
    ({"signer": DELEGATE, "key": DELEGATE_KEY}, "nor by a responder it delegated to"),
    # Names the issuer (by name) as its signer, signed by another key.
    ({"signer": IMPOSTOR, "key": OTHER_KEY, "by_name": True}, "signature does not verify"),
    ({"next_update": NOW - DAY}, "stale"),
    ({"this_update": NOW + DAY, "next_update": NOW + 2 * DAY}, "in the future"),
    ({"cert": DELEGATE}, "says nothing about the certificate"),
])
def test_responses_not_to_believe(options, message):
    with pytest.raises(OcspError, match=message):
        verify_response(_response(**options), LEAF, CA)


def test_the_nonce_must_be_the_one_sent_if_echoed():
    assert verify_response(_response(nonce=b"a" * 16), LEAF, CA, nonce=b"a" * 16)
    assert verify_response(_response(), LEAF, CA, nonce=b"a" * 16)  # not echoed at all
    with pytest.raises(OcspError, match="nonce"):
        verify_response(_response(nonce=b"b" * 16), LEAF, CA, nonce=b"a" * 16)


def test_unsuccessful_and_garbage_responses():
    refused = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(Encoding.DER)
    with pytest.raises(OcspError, match="refused: unauthorized"):
        verify_response(refused, LEAF, CA)
    with pytest.raises(OcspError, match="not an OCSP response"):
        verify_response(b"garbage", LEAF, CA)


def test_a_response_without_next_update_is_current():
    assert verify_response(_response(next_update=None), LEAF, CA)
