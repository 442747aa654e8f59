"""Certificate revocation for TLS listeners: CRLs from files and from the
distribution points named in client certificates, checked in Python.

The check runs once the handshake has verified the chain, before the first
MQTT byte is read. Keeping it here rather than in OpenSSL lets one code path
serve both CRL sources, lets a CRL be fetched for a certificate seen for the
first time without blocking anything (the connection waits, the loop does
not: the fetch is aiohttp's, in the loop), and lets a new CRL be held
against the clients already connected.

Only the client (leaf) certificate is checked, as OpenSSL's crl_check does
by default. A CRL counts when its issuer is the certificate's issuer and its
signature verifies with that issuer's key from the listener's CA file.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from typing import Iterable

import aiohttp
import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = logging.getLogger("bastionmq.listener")

#: Verdicts of ``CrlStore.check``.
GOOD, REVOKED, UNKNOWN = "good", "revoked", "unknown"

#: Largest CRL taken from a distribution point (after any content decoding).
MAX_CRL_SIZE = 16 * 1024 * 1024


class CrlError(ValueError):
    """A CRL file that cannot be used; the message names the file."""


@attrs.define(slots=True)
class _Held:
    crl: x509.CertificateRevocationList
    #: The file or URL it came from.
    source: str
    revoked: frozenset[int]


def load_crl_file(path: str) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (several may follow one another) or a DER file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise CrlError(f"{path!r}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            blocks = data.split(b"-----END X509 CRL-----")[:-1]
            return [x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
                    for block in blocks]
        return [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise CrlError(f"{path!r} is not a CRL (PEM or DER): {exc}") from None


def load_ca_certificates(path: str | None) -> list[x509.Certificate]:
    if not path:
        return []
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificates(handle.read())


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The http(s) URLs of the certificate's CRL distribution points."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and \
                    name.value.lower().startswith(("http://", "https://")):
                urls.append(name.value)
    return urls


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return False
    try:
        return crl.is_signature_valid(key)
    except (ValueError, TypeError):
        return False


def _key_id(ca: x509.Certificate) -> bytes:
    return ca.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class CrlFetchError(Exception):
    """A distribution point that gave no CRL; the message says why."""


class CrlClient:
    """Fetches CRLs from distribution points over HTTP(S), in the event loop;
    OCSP (listeners.ocsp) posts its requests through one too.

    A listener holds one for its lifetime: one aiohttp session, made at the
    first fetch (most listeners never fetch) and closed by ``close``. A fetch
    has ``timeout`` seconds in all (connecting, redirects, the whole body)
    and at most ``max_size`` bytes of body. ``what`` and ``timeout_key`` name
    the document and the setting in error messages."""

    def __init__(self, *, timeout: float, max_size: int = MAX_CRL_SIZE, what: str = "a CRL",
                 timeout_key: str = "crl_cache.http_timeout") -> None:
        self.timeout = timeout
        self.max_size = max_size
        self.what = what
        self.timeout_key = timeout_key
        self._session: aiohttp.ClientSession | None = None
        self._pending: dict[tuple[str, bytes | None], asyncio.Task[bytes]] = {}
        self._closed = False

    async def get(self, url: str) -> bytes:
        """The body served at ``url``; concurrent callers share one request.
        Raises CrlFetchError (or what else the request raised)."""
        return await self._shared(url, None, "")

    async def post(self, url: str, body: bytes, content_type: str) -> bytes:
        """The body answered to ``body`` posted to ``url``; concurrent callers
        posting the same body share one request."""
        return await self._shared(url, body, content_type)

    async def _shared(self, url: str, body: bytes | None, content_type: str) -> bytes:
        key = (url, body)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.create_task(
                self._download(url, body, content_type))
            pending.add_done_callback(lambda done: self._forget(key, done))
        # A caller that goes away (its client hung up) leaves the fetch to the others.
        return await asyncio.shield(pending)

    def _forget(self, key: tuple[str, bytes | None], done: asyncio.Task[bytes]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]

    async def _download(self, url: str, body: bytes | None = None,
                        content_type: str = "") -> bytes:
        if self._closed:
            raise CrlFetchError("the listener is stopping")
        if self._session is None:
            # force_close: one connection per fetch, as urllib made; a CRL is
            # fetched again only after refresh_interval, so nothing is gained
            # by keeping it open, and close() has nothing left to wait for.
            # trust_env: the proxy variables (http_proxy, ...) count, as they did.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=True)
        request = (self._session.get(url) if body is None else
                   self._session.post(url, data=body, headers={"Content-Type": content_type}))
        try:
            async with request as response:
                if response.status >= 300:  # redirects are followed
                    raise CrlFetchError(f"HTTP {response.status} {response.reason or ''}".rstrip())
                length = response.content_length
                if length is not None and length > self.max_size:
                    raise CrlFetchError(f"{length} bytes, more than the {self.max_size} "
                                        f"allowed for {self.what}")
                received = bytearray()
                async for chunk in response.content.iter_any():
                    received += chunk
                    if len(received) > self.max_size:
                        raise CrlFetchError(f"more than the {self.max_size} bytes allowed "
                                            f"for {self.what}")
                return bytes(received)
        except TimeoutError:
            raise CrlFetchError(f"no complete answer within {self.timeout:g}s "
                                f"({self.timeout_key})") from None
        except aiohttp.ClientError as exc:
            raise CrlFetchError(str(exc) or type(exc).__name__) from None

    async def close(self) -> None:
        """Cancel the fetches under way and close the session; no fetch follows."""
        self._closed = True
        for task in list(self._pending.values()):
            task.cancel()
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class CrlStore:
    """The CRLs a listener holds, by issuer, and the fetching of missing ones."""

    def __init__(self, ca_certificates: Iterable[x509.Certificate], *,
                 capacity: int = 100) -> None:
        # CAs by subject: two CAs may share a name (a renewed key), so the
        # signature decides which one a CRL or certificate belongs to.
        self._issuers: dict[bytes, list[x509.Certificate]] = {}
        for cert in ca_certificates:
            self._issuers.setdefault(cert.subject.public_bytes(), []).append(cert)
        self._by_issuer: dict[tuple[bytes, bytes], _Held] = {}
        self.capacity = capacity
        #: Distribution points fetched so far, refreshed on the refresh interval.
        self.urls: set[str] = set()

    def add(self, crl: x509.CertificateRevocationList, source: str) -> None:
        """Hold ``crl`` if a trusted CA signed it and it is newer than the one held."""
        issuer_name = crl.issuer.public_bytes()
        issuer = next((ca for ca in self._issuers.get(issuer_name, ()) if _signed_by(crl, ca)),
                      None)
        if issuer is None:
            raise CrlError(f"{source!r}: not signed by a CA in the listener's cacertfile")
        key = (issuer_name, _key_id(issuer))
        held = self._by_issuer.get(key)
        if held is not None and held.crl.last_update_utc > crl.last_update_utc:
            return
        if held is None and len(self._by_issuer) >= self.capacity:
            self._by_issuer.pop(next(iter(self._by_issuer)))
        self._by_issuer[key] = _Held(
            crl, source, frozenset(entry.serial_number for entry in crl))

    def next_updates(self) -> list[tuple[str, str, float]]:
        """(issuer, source, next update as a Unix time) of each CRL held that
        names one: after it, the CRL is stale."""
        return [(held.crl.issuer.rfc4514_string(), held.source,
                 held.crl.next_update_utc.timestamp())
                for held in self._by_issuer.values() if held.crl.next_update_utc is not None]

    def adopt_fetched(self, old: CrlStore) -> None:
        """Keep what ``old`` fetched from distribution points (a reload re-reads
        files, not URLs), where this store trusts the issuer and holds nothing newer."""
        for held in old._by_issuer.values():
            if held.source in old.urls:
                try:
                    self.add(held.crl, held.source)
                except CrlError:
                    continue  # its CA is no longer trusted
        self.urls |= old.urls

    def check(self, cert: x509.Certificate) -> str:
        """GOOD, REVOKED, or UNKNOWN when no current CRL of its issuer is held."""
        issuer_name = cert.issuer.public_bytes()
        issuer = next((ca for ca in self._issuers.get(issuer_name, ()) if _issued(cert, ca)), None)
        held = self._by_issuer.get((issuer_name, _key_id(issuer))) if issuer else None
        if held is None:
            return UNKNOWN
        if cert.serial_number in held.revoked:
            return REVOKED  # revoked stays revoked, however old the list
        next_update = held.crl.next_update_utc
        if next_update is not None and next_update < _now():
            return UNKNOWN
        return GOOD

    async def fetch(self, url: str, client: CrlClient) -> None:
        """Fetch (with ``client``) and hold the CRL at ``url``. Failures are
        logged, not raised: the caller decides by ``check``."""
        try:
            data = await client.get(url)
        except Exception as exc:  # network, HTTP, size or timeout
            log.warning("cannot fetch the CRL at %s: %s", url, exc)
            return
        try:
            crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
                   else x509.load_der_x509_crl(data))
            self.add(crl, url)
        except (ValueError, CrlError) as exc:
            log.warning("the CRL at %s cannot be used: %s", url, exc)
            return
        self.urls.add(url)


def load_crl_files(store: CrlStore, paths: Iterable[str]) -> dict[str, float]:
    """Put the CRLs of ``paths`` into ``store``; returns each file's mtime."""
    mtimes = {}
    for path in paths:
        for crl in load_crl_file(path):
            store.add(crl, path)
        mtimes[path] = os.stat(path).st_mtime
    return mtimes
