"""TLS listeners (``listeners.ssl.<name>``, and under WebSocket
``listeners.wss.<name>``): the handshake of each connection, the checks a
verified client certificate still passes (extended key usage, CRLs,
lifetime), and reloads. The contexts and files they use are made in
``tls_context``; what a certificate says, in ``certificates``.

TLS runs over ssl.MemoryBIO inside the listener's protocol rather than in the
event loop's transport. That gives the listener what an operator needs and
the loop's TLS hides: every failed handshake with its reason, the handshake
timeout, the verified certificate before the first MQTT byte, and a context
that can be replaced for new connections while old ones carry on. Output
stays batched: each connection's outbox is written once per read pass, and
that write is encrypted and handed to the socket as one buffer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from typing import Any, cast

from bastionmq.broker.connection import Connection
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.logtext import endpoint
from bastionmq.broker.ports import PeerInfo
from bastionmq.broker.properties import Reason
from bastionmq.broker.stats import Buckets

from .base import Listener, UpperLayer
from .certificates import EKU_OIDS, TlsCertificate
from .crl import REVOKED, UNKNOWN, CrlClient, distribution_points
from .ocsp import MAX_RESPONSE_SIZE, OcspChecker
from .openssl import disable_stapling, set_staple
from .proxied import proxied_peer
from .proxy_protocol import ProxyHeader
from .stapling import Staple, fetch_staple
from .settings import CrlCacheConfig, PskConfig, SslOptions
from .tls_context import (
    TlsMaterial, TlsSetupError, describe_failure, expiry_warnings, load_material,
    mtimes, now_utc, ssl_options_path,
)

log = logging.getLogger("bastionmq.listener")

#: Bucket bounds of the client certificates' remaining validity at their
#: handshake, in seconds: 1, 7, 14, 30, 90, 180, 365 and 730 days.
CLIENT_EXPIRY_BUCKETS = tuple(days * 86400.0 for days in (1, 7, 14, 30, 90, 180, 365, 730))


class TlsListener(Listener):
    kind = "ssl"

    def __init__(self, name: str, host: str, port: int, core: BrokerCore, *,
                 options: SslOptions, crl_cache: CrlCacheConfig, psk: PskConfig | None = None,
                 material: TlsMaterial | None = None, **socket_options: Any) -> None:
        super().__init__(name, host, port, core, **socket_options)
        self.options = options
        self.crl_cache = crl_cache
        self.psk = psk
        #: The connection whose handshake step is running: the SNI and PSK
        #: callbacks fire inside it, synchronously, and report to it.
        self.handshaking: TlsProtocol | None = None
        #: Fetches CRLs from distribution points, for every material this
        #: listener loads (reloads included), until it stops.
        self.crl_client = CrlClient(timeout=crl_cache.http_timeout)
        #: Asks OCSP responders (ssl_options.ocsp), with a client of its own:
        #: its own timeout, and a size bound fit for OCSP responses, not CRLs.
        self.ocsp_client = CrlClient(
            timeout=options.ocsp.timeout, max_size=MAX_RESPONSE_SIZE,
            what="an OCSP response", timeout_key="ssl_options.ocsp.timeout")
        #: The OCSP check of client certificates (enable_client_check).
        self.ocsp: OcspChecker | None = None
        if options.ocsp.enable_client_check:
            self.ocsp = OcspChecker(options.ocsp, self.ocsp_client)
        #: The answer stapled to handshakes (enable_stapling), once fetched.
        self.staple: Staple | None = None
        self._crl_client_closed: asyncio.Task | None = None
        #: Context and CRLs for new connections; a reload replaces them whole.
        self.material: TlsMaterial
        self._install(material if material is not None
                      else load_material(options, crl_cache, psk))
        #: Failed handshakes by reason, and those that succeeded by TLS
        #: version and cipher suite, for operators and metrics.
        self.handshake_failures: collections.Counter[str] = collections.Counter()
        self.handshakes: collections.Counter[tuple[str | None, str | None]] = \
            collections.Counter()
        #: The remaining validity of each client certificate admitted, at its handshake.
        self.client_certificate_expiry = Buckets(CLIENT_EXPIRY_BUCKETS)
        self._tasks: list[asyncio.Task] = []

    @property
    def handshake_timeout(self) -> float:
        return self.options.handshake_timeout

    def _install(self, material: TlsMaterial) -> None:
        for context in (material.context, *material.sni.values()):
            context.sni_callback = self._on_sni
            if material.psk_keys is not None:
                # load_material makes every context a PskContext (listeners.psk)
                # when it loads PSK keys.
                cast(Any, context).set_psk_server_callback(self._on_psk, self.options.psk_hint)
        if self.ocsp is not None:
            self.ocsp.set_issuers(material.ocsp_issuers or ())
        old = getattr(self, "material", None)  # unset on the first call
        if material.staple_target is not None:
            staple = self.staple
            if staple is not None and staple.expires > time.time() and old is not None \
                    and old.staple_target is not None \
                    and old.staple_target.cert == material.staple_target.cert:
                set_staple(material.context, staple.response)
            else:
                self.staple = None  # a new server certificate needs an answer of its own
        if old is not None and old.staple_target is not None:
            disable_stapling(old.context)
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
        keys = self.material.psk_keys
        # None: a reload turned PSK off while this handshake ran on an old PSK context.
        key = keys.get(identity or "", b"") if keys is not None else b""
        if key and self.handshaking is not None:
            self.handshaking.psk_identity = identity
        return key

    def new_tls(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        material = self.material
        context = material.context
        sslobj = context.wrap_bio(incoming, outgoing, server_side=True)
        if material.psk_keys is not None:
            cast(Any, context).setup_psk_callbacks(sslobj)  # a PskContext, as in _install
        return sslobj

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.create_task(self._warn_of_expiry()))
        if self.options.watch_interval > 0:
            self._tasks.append(asyncio.create_task(self._watch_files()))
        if self.material.revocation is not None:
            self._tasks.append(asyncio.create_task(self._refresh_crls()))
        if self.ocsp is not None:
            self._tasks.append(asyncio.create_task(self._refresh_ocsp()))
        if self.options.ocsp.enable_stapling:
            self._tasks.append(asyncio.create_task(self._refresh_staple()))

    def stop_accepting(self) -> None:
        super().stop_accepting()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._crl_client_closed is None:
            # Runs at the loop's next turn, whether or not close() is awaited:
            # its one step cancels the fetches under way and closes the
            # session (force_close leaves no idle connection to wait for).
            self._crl_client_closed = asyncio.get_running_loop().create_task(
                self._close_clients())

    async def _close_clients(self) -> None:
        await self.crl_client.close()
        await self.ocsp_client.close()

    async def close(self) -> None:
        await super().close()  # stop_accepting, which starts closing the CRL client
        assert self._crl_client_closed is not None
        await self._crl_client_closed

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
                      exc.key_path(ssl_options_path(self.kind, self.name)), exc)
            self.material.files = mtimes(self.material.files)  # not again until it changes
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
            changed = [path for path, mtime in mtimes(self.material.files).items()
                       if mtime != self.material.files[path]]
            if changed:
                self.reload(f"changed: {', '.join(changed)}")

    async def _refresh_crls(self) -> None:
        while True:
            await asyncio.sleep(self.crl_cache.refresh_interval)
            store = self.material.revocation
            if store is not None and store.urls:
                await asyncio.gather(*(store.fetch(url, self.crl_client)
                                       for url in sorted(store.urls)))
                self.disconnect_revoked()

    async def _refresh_staple(self) -> None:
        """Fetch the stapled answer now and every refresh_interval; a failed
        fetch keeps the answer held until it expires."""
        interval = self.options.ocsp.refresh_interval
        while True:
            material = self.material
            target = material.staple_target
            if target is not None:
                try:
                    staple = await fetch_staple(self.ocsp_client, target, interval)
                except Exception as exc:  # network, HTTP, timeout, or a bad answer
                    log.warning("listener %s: no OCSP answer to staple from %s: %s",
                                self.id, target.url, exc)
                    if self.staple is not None and self.staple.expires <= time.time():
                        self.staple = None
                        set_staple(self.material.context, None)
                else:
                    if self.material is material:  # else a reload changed the certificate
                        self.staple = staple
                        set_staple(material.context, staple.response)
            await asyncio.sleep(interval)

    # revocation --------------------------------------------------------------

    def connections(self) -> list[Any]:
        return [c for c in self.core.connections if c.peer.listener == self.id]

    def _close_revoked(self, connection: Any, certificate: TlsCertificate, how: str) -> None:
        log.info("listener %s: closing %r: its certificate (serial %x) is revoked (%s)",
                 self.id, connection.client_id, certificate.serial, how)
        connection.close(Reason.ADMINISTRATIVE_ACTION, "client certificate revoked")

    def disconnect_revoked(self) -> None:
        """Close every connection whose certificate the CRLs now revoke."""
        store = self.material.revocation
        if store is None:
            return
        for connection in self.connections():
            certificate = connection.peer.certificate
            if isinstance(certificate, TlsCertificate) \
                    and store.check(certificate.parsed) == REVOKED:
                self._close_revoked(connection, certificate, "CRL")

    async def _refresh_ocsp(self) -> None:
        """Ask again about the certificate of every connected client, and
        close the connections of those now revoked. An unanswered question
        closes nothing: soft_fail is for letting clients in, and a client
        already in is not thrown out for the responder's silence."""
        checker = self.ocsp
        assert checker is not None  # start() runs this only with a checker
        while True:
            await asyncio.sleep(checker.config.refresh)
            live = [(c, c.peer.certificate) for c in self.connections()
                    if isinstance(c.peer.certificate, TlsCertificate)]
            # One question per certificate however many connections share it.
            answers = {}
            for _, certificate in live:
                if certificate.der not in answers:
                    answers[certificate.der] = asyncio.ensure_future(
                        checker.status(certificate.parsed, fresh=True))
            if answers:
                await asyncio.gather(*answers.values())
            for connection, certificate in live:
                answer = answers[certificate.der].result()
                if answer.status == REVOKED:
                    self._close_revoked(connection, certificate, f"OCSP: {answer.detail}")

    def checks_revocation(self) -> bool:
        """Whether a verified client certificate waits for check_revocation."""
        return self.material.revocation is not None or self.ocsp is not None

    async def check_revocation(self, certificate: TlsCertificate) -> str | None:
        """None when ``certificate`` may connect, else why not: the CRLs
        (enable_crl_check) first, then the OCSP responder (ssl_options.ocsp)."""
        refusal = await self._check_crls(certificate)
        if refusal is None and self.ocsp is not None:
            refusal = await self._check_ocsp(certificate)
        return refusal

    async def _check_ocsp(self, certificate: TlsCertificate) -> str | None:
        checker = self.ocsp
        assert checker is not None  # check_revocation asks only with a checker
        cert = certificate.parsed
        answer = await checker.status(cert)
        if answer.status == REVOKED:
            log.info("listener %s: client certificate serial %x (%s) refused: OCSP: %s",
                     self.id, cert.serial_number, cert.subject.rfc4514_string(), answer.detail)
            return "client certificate revoked"
        if answer.status == UNKNOWN:
            if checker.config.soft_fail:
                log.warning("listener %s: no OCSP answer for serial %x of %s (%s); letting "
                            "the client in (ssl_options.ocsp.soft_fail)", self.id,
                            cert.serial_number, cert.issuer.rfc4514_string(), answer.detail)
                return None
            log.info("listener %s: no OCSP answer for serial %x of %s: %s", self.id,
                     cert.serial_number, cert.issuer.rfc4514_string(), answer.detail)
            return "no OCSP answer for the client certificate"
        return None

    async def _check_crls(self, certificate: TlsCertificate) -> str | None:
        """None when the CRLs let ``certificate`` connect, else why not.
        Fetches the CRL of a distribution point when no current one is held."""
        store = self.material.revocation
        if store is None:
            return None  # a reload turned the CRL check off since the handshake asked for it
        cert = certificate.parsed
        verdict = store.check(cert)
        if verdict == UNKNOWN:
            for url in distribution_points(cert):
                await store.fetch(url, self.crl_client)
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
        host = endpoint(peer)
        log.info("listener %s: TLS handshake with %s failed: %s", self.id, host, reason,
                 extra={"event": "tls_failure", "listener": self.id, "peer": host,
                        "reason": reason})

    def refuse_peer(self, peer: PeerInfo, resumed: bool = False) -> str | None:
        """Why a verified peer may not connect, for checks OpenSSL does not
        make (``resumed``: the handshake resumed a TLS session)."""
        wanted = self.options.verify_peer_ext_key_usage
        certificate = peer.certificate
        if certificate is not None and resumed:
            # OpenSSL checks the validity period in a full handshake only: a
            # resumed TLS session would let a certificate in after it expired.
            # (A full handshake is not made to parse the certificate for it.)
            now = now_utc()
            not_before, not_after = certificate.not_before, certificate.not_after
            if not_after is not None and now > not_after:
                return "client certificate expired"
            if not_before is not None and now < not_before:
                return "client certificate not yet valid"
        if wanted and certificate is not None:
            oid = EKU_OIDS.get(wanted, wanted)
            if oid not in certificate.extended_key_usage:
                return f"client certificate lacks the extended key usage {wanted}"
        return None


class TlsProtocol(UpperLayer, asyncio.Protocol):
    """TLS over the socket transport; to the core's Connection it is the transport."""

    __slots__ = ("listener", "transport", "connection", "_in", "_out", "_ssl", "_timer",
                 "_closing", "_expiry", "_verified", "sni", "psk_identity", "proxy")

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
        #: The PROXY protocol header the connection began with (proxy_protocol).
        self.proxy: ProxyHeader | None = None

    # from the socket -------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.listener.admit(transport):
            self.begin(transport, None)

    def begin(self, transport: asyncio.Transport, proxy: ProxyHeader | None) -> None:
        """Serve an admitted connection (``proxy``: the header it began with)."""
        listener = self.listener
        self.transport = transport
        self.proxy = proxy
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
        timer = self._timer
        # Armed by connection_made; a timeout would have closed (_closing) the connection.
        assert timer is not None
        timer.cancel()
        self._timer = None
        self._verified = True
        peer = self.peer_info()
        refusal = listener.refuse_peer(peer, self._ssl.session_reused)
        if refusal is not None:
            self._fail(refusal)
            return False
        if peer.certificate is not None and listener.checks_revocation():
            # Decide on revocation before any MQTT byte is read; a CRL fetch
            # or an OCSP request makes this connection wait, never the loop.
            self.transport.pause_reading()
            listener.core.spawn(self._check_revocation(peer))
            return False
        self._attach(peer)
        return True

    def peer_info(self) -> PeerInfo:
        """What the finished handshake says of the client."""
        peername = self.transport.get_extra_info("peername")
        sslobj = self._ssl
        der = sslobj.getpeercert(binary_form=True)
        cipher = sslobj.cipher()
        return PeerInfo(
            listener=self.listener.id, address=tuple(peername[:2]) if peername else None,
            tls=True, tls_version=sslobj.version(), cipher=cipher[0] if cipher else None,
            certificate=TlsCertificate(der) if der else None,
            sni=self.sni, psk_identity=self.psk_identity)

    async def _check_revocation(self, peer: PeerInfo) -> None:
        certificate = peer.certificate
        assert isinstance(certificate, TlsCertificate)  # peer_info made it; _handshake checked
        refusal = await self.listener.check_revocation(certificate)
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
        if self.proxy is not None:
            # After the checks of the handshake's own certificate above: the
            # header's TLS facts, when it has them, are the client's.
            peer = proxied_peer(peer, self.proxy)
        listener.handshakes[(peer.tls_version, peer.cipher)] += 1
        if log.isEnabledFor(logging.DEBUG):
            cert = peer.certificate
            log.debug("listener %s: TLS with %s: %s %s%s%s%s", listener.id, peer.host,
                      peer.tls_version, peer.cipher,
                      f", SNI {peer.sni}" if peer.sni else "",
                      f", PSK identity {peer.psk_identity!r}" if peer.psk_identity else "",
                      f", certificate {cert.subject} serial {cert.serial:x} sha256 "
                      f"{cert.sha256} valid until {cert.not_after:%Y-%m-%d}" if cert else "")
        self.connection = listener.attach(self, peer)
        certificate = peer.certificate
        if isinstance(certificate, TlsCertificate):  # peer_info makes no other kind
            remaining = certificate.expires_at - time.time()
            listener.client_certificate_expiry.observe(remaining)
            if listener.options.enforce_cert_lifetime:
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
                     self.listener.id, self.peername())
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
                         self.peername(), describe_failure(exc))
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

    def peername(self) -> Any:
        """The client's address: the socket's peer, or the one its PROXY
        protocol header names."""
        proxy = self.proxy
        if proxy is not None and proxy.source is not None:
            return proxy.source
        return self.transport.get_extra_info("peername")

    def _send_records(self) -> None:
        if self._out.pending and self.transport is not None:
            self.transport.write(self._out.read())

    def _fail(self, reason: str) -> None:
        self._closing = True
        self.listener.handshake_failed(self.peername(), reason)
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



