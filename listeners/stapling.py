"""OCSP stapling (``ssl_options.ocsp.enable_stapling``): the responder's
answer about the listener's server certificate, fetched in the event loop and
handed to every handshake whose client asks for it (status_request), so that
clients need not ask the responder themselves.

Only an answer that verifies (listeners.ocsp.verify_response: the issuer's or
its delegated responder's signature, a current time window) and says "good"
is stapled; it is fetched again every ``refresh_interval``, and a failed fetch
keeps the previous answer until its nextUpdate. The OpenSSL side is in
listeners.openssl (the status callback and who frees the buffer).
"""

from __future__ import annotations

import time

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import ocsp

from .crl import CrlClient
from .ocsp import OcspError, build_request, responder_urls, verify_response
from .settings import SslOptions


@attrs.define(slots=True, frozen=True)
class StapleTarget:
    """The server certificate to staple for, its issuer and its responder."""

    cert: x509.Certificate
    issuer: x509.Certificate
    url: str


@attrs.define(slots=True, frozen=True)
class Staple:
    response: bytes
    #: Unix time after which it may no longer be sent (its nextUpdate).
    expires: float


def staple_target(options: SslOptions) -> StapleTarget:
    """What ``options`` staples for; raises ValueError with (key, message)
    naming the ``ssl_options`` key at fault."""
    try:
        with open(options.certfile, "rb") as handle:
            cert = x509.load_pem_x509_certificates(handle.read())[0]
    except (OSError, ValueError) as exc:
        raise ValueError("certfile", f"cannot read {options.certfile!r}: {exc}") from None
    path = options.ocsp.issuer_pem or ""
    try:
        with open(path, "rb") as handle:
            issuer = x509.load_pem_x509_certificates(handle.read())[0]
    except (OSError, ValueError) as exc:
        raise ValueError("ocsp.issuer_pem", f"cannot read {path!r}: {exc}") from None
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError("ocsp.issuer_pem", f"{path!r} is not the CA that issued "
                                            f"{options.certfile!r}") from None
    urls = [options.ocsp.responder_url] if options.ocsp.responder_url else responder_urls(cert)
    if not urls:
        raise ValueError("ocsp.responder_url", f"needed for stapling: {options.certfile!r} "
                                               "names no OCSP responder")
    return StapleTarget(cert, issuer, urls[0])


async def fetch_staple(client: CrlClient, target: StapleTarget, refresh: float) -> Staple:
    """A fresh, verified, good answer about the server certificate; raises
    OcspError (or the fetch's error) otherwise. No nonce: one answer is
    stapled to many handshakes (RFC 5019 2.1.1)."""
    der = await client.post(target.url, build_request(target.cert, target.issuer),
                            "application/ocsp-request")
    single = verify_response(der, target.cert, target.issuer)
    if single.certificate_status != ocsp.OCSPCertStatus.GOOD:
        raise OcspError(f"the responder says the server certificate is "
                        f"{single.certificate_status.name.lower()}")
    next_update = single.next_update_utc
    return Staple(der, next_update.timestamp() if next_update is not None
                  else time.time() + refresh)
