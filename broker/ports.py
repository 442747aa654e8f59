"""What the core exchanges with the outside world.

Listeners describe each connection with a ``PeerInfo``; the application hands
the core an ``Authenticator``. The core imports no listener, authenticator or
store: it only knows these shapes. A connection is a ``Client`` to the core.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Protocol

import attrs

if TYPE_CHECKING:
    from .outbox import Outbox


@attrs.define(slots=True, frozen=True, kw_only=True)
class CertificateFacts:
    """What a client certificate says, as the auth and ACL chains use it.

    A certificate verified elsewhere (by a load balancer, which passes on
    its common name in a PROXY protocol header) has its common name only:
    subject, issuer, serial, sha256 and validity None, SANs empty."""

    #: Subject and issuer as RFC 4514 strings ("CN=sensor-7,O=Acme").
    subject: str | None
    common_name: str | None
    issuer: str | None = None
    serial: int | None = None
    #: SHA-256 of the DER encoding, lowercase hex.
    sha256: str | None = None
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    san_email: tuple[str, ...] = ()
    san_ip: tuple[str, ...] = ()
    #: Extended key usages as dotted OIDs (clientAuth is 1.3.6.1.5.5.7.3.2).
    extended_key_usage: tuple[str, ...] = ()


class PeerCertificate:
    """A client certificate the TLS handshake verified: its DER encoding,
    and its facts (CertificateFacts, each also a property of its own),
    parsed by ``parse`` on first use. Most connections never ask, and
    parsing is a noticeable part of a handshake's cost in Python.

    ``known`` makes one of a certificate verified elsewhere, from the facts
    passed on: its ``der`` is empty (nothing identifies by its encoding)
    unless the whole certificate was passed on too (a reverse proxy's
    header), which then counts exactly as one the broker verified."""

    __slots__ = ("der", "_parse", "_facts")

    def __init__(self, der: bytes, parse: Callable[[bytes], CertificateFacts]) -> None:
        self.der = der
        self._parse = parse
        self._facts: CertificateFacts | None = None

    @classmethod
    def known(cls, facts: CertificateFacts, der: bytes = b"") -> PeerCertificate:
        """A certificate whose ``facts`` are already made: of one whose
        encoding is not known (``der`` empty), or of ``der`` parsed already."""
        certificate = cls(der, _unparsable)
        certificate._facts = facts
        return certificate

    @property
    def facts(self) -> CertificateFacts:
        if self._facts is None:
            self._facts = self._parse(self.der)
        return self._facts

    @property
    def subject(self) -> str | None:
        return self.facts.subject

    @property
    def common_name(self) -> str | None:
        return self.facts.common_name

    @property
    def issuer(self) -> str | None:
        return self.facts.issuer

    @property
    def serial(self) -> int | None:
        return self.facts.serial

    @property
    def sha256(self) -> str | None:
        return self.facts.sha256

    @property
    def not_before(self) -> datetime.datetime | None:
        return self.facts.not_before

    @property
    def not_after(self) -> datetime.datetime | None:
        return self.facts.not_after

    @property
    def san_dns(self) -> tuple[str, ...]:
        return self.facts.san_dns

    @property
    def san_uri(self) -> tuple[str, ...]:
        return self.facts.san_uri

    @property
    def san_email(self) -> tuple[str, ...]:
        return self.facts.san_email

    @property
    def san_ip(self) -> tuple[str, ...]:
        return self.facts.san_ip

    @property
    def extended_key_usage(self) -> tuple[str, ...]:
        return self.facts.extended_key_usage

    def __repr__(self) -> str:
        facts = self.facts
        return f"<PeerCertificate {facts.subject or f'CN={facts.common_name}'}>"


def _unparsable(der: bytes) -> CertificateFacts:
    raise ValueError("the certificate's encoding is not known")  # known() sets the facts


@attrs.define(slots=True, frozen=True, kw_only=True)
class PeerInfo:
    """Facts about one network connection, gathered by its listener."""

    #: "tcp:default", "ssl:default": the listener's kind and name, as EMQX writes them.
    listener: str
    #: (host, port) of the remote end, when the transport knows it.
    address: tuple[str, int] | None = None
    #: Whether the connection is protected by TLS.
    tls: bool = False
    #: "TLSv1.3", the negotiated cipher suite, and the verified client
    #: certificate (None when the client sent none or the listener asks for none).
    tls_version: str | None = None
    cipher: str | None = None
    certificate: PeerCertificate | None = None
    #: The host name the client asked for by SNI, and the TLS-PSK identity
    #: whose key it proved, when it used one.
    sni: str | None = None
    psk_identity: str | None = None

    @property
    def host(self) -> str:
        return self.address[0] if self.address else ""


@attrs.define(slots=True, frozen=True, kw_only=True)
class AuthRequest:
    client_id: str
    username: str | None
    password: bytes | None
    peer: PeerInfo
    protocol_level: int
    properties: Mapping[str, Any]


@attrs.define(slots=True, frozen=True)
class AuthResult:
    """An authentication decision; reason_code 0 means allowed."""

    reason_code: int = 0
    superuser: bool = False
    #: The user the authenticator established, when it knows better than the
    #: CONNECT's User Name (an enhanced authentication names its user itself).
    identity: str | None = None

    @property
    def allowed(self) -> bool:
        return self.reason_code == 0


ALLOW = AuthResult()


class Authenticator(Protocol):
    """Decides whether a CONNECT may proceed.

    May answer at once or with an awaitable (a database look-up); the core
    holds the connection's later packets until the answer comes.

    It may also have ``admit_method(request, method_name) -> AuthResult |
    None``, asked before an enhanced authentication starts (None: it may;
    a result: the refusal), and ``method_finished(request, result) ->
    AuthResult``, told how one ended (at CONNECT or a re-authentication) and
    answering the result that stands (a ban may turn a success into a
    refusal); both are optional.
    """

    def authenticate(self, request: AuthRequest) -> AuthResult | Awaitable[AuthResult]: ...


@attrs.define(slots=True, frozen=True)
class AuthStep:
    """One step of an enhanced authentication (MQTT 5.0 4.12)."""

    #: Authentication Data for the client: in AUTH 0x18 while continuing; in
    #: the CONNACK (or, re-authenticating, AUTH 0x00) with a success.
    data: bytes | None = None
    #: None to continue the exchange; otherwise the decision.
    result: AuthResult | None = None


class AuthConversation(Protocol):
    """One client's run of an authentication method, from its first data to a decision."""

    def step(self, data: bytes | None) -> AuthStep | Awaitable[AuthStep]:
        """Take the client's Authentication Data; answer the next step."""
        ...


class AuthMethod(Protocol):
    """An enhanced authentication method, named as clients name it in the
    Authentication Method property ("SCRAM-SHA-256")."""

    name: str

    def begin(self, request: AuthRequest) -> AuthConversation: ...


class IdentityPolicy(Protocol):
    """Settles who a connecting client is before it is authenticated: may
    replace the client id and username it sent (from its certificate, say),
    or refuse it."""

    def apply(self, request: AuthRequest) -> AuthRequest | AuthResult: ...


#: Actions an authorization source decides on.
PUBLISH_ACTION = "publish"
SUBSCRIBE_ACTION = "subscribe"
#: A source's answer: "allow", "deny", or None when it has no rule for the case.
ALLOW_ACCESS = "allow"
DENY_ACCESS = "deny"


@attrs.define(slots=True, frozen=True, kw_only=True)
class ClientInfo:
    """Who is asking, as authorization sees a connected client."""

    client_id: str
    username: str | None
    peer: PeerInfo
    superuser: bool = False


@attrs.define(slots=True, frozen=True, kw_only=True)
class AccessRequest:
    """One publish or subscribe to decide on."""

    client: ClientInfo
    #: PUBLISH_ACTION or SUBSCRIBE_ACTION.
    action: str
    #: The topic name published to, or the filter subscribed to (without a
    #: $share/{group}/ prefix).
    topic: str
    qos: int = 0
    retain: bool = False


class AclSource(Protocol):
    """One source of authorization rules (an ACL file, a database...)."""

    def check(self, request: AccessRequest) -> str | None | Awaitable[str | None]:
        """ALLOW_ACCESS, DENY_ACCESS, or None when no rule matches; or an
        awaitable of one of them, for a source that answers later."""
        ...


class Client(Protocol):
    """A connection as the core sees it (broker.connection.Connection): the
    core delivers into its ``outbox``, and otherwise only closes it (takeover,
    shutdown), holds its reading back (publisher flow control) and asks who
    it is."""

    outbox: Outbox
    client_id: str
    peer: PeerInfo
    #: Set once CONNECT has succeeded.
    client_info: ClientInfo | None
    #: Its recent authorization decisions (broker.access), or None.
    access_cache: dict | None
    #: Whether the durable store holds its will.
    will_stored: bool

    @property
    def version(self) -> int:
        """The protocol level of its CONNECT (3, 4 or 5)."""
        ...

    @property
    def session(self) -> Any:
        """The session (sessions.Session) CONNECT attached it to; None before."""
        ...

    def close(self, reason: int = ..., message: str = "", send_disconnect: bool = True,
              publish_will: bool = True, linger: bool = True) -> None:
        """Close from the server side (5.0: DISCONNECT with ``reason``);
        without ``publish_will`` its will is dropped."""
        ...

    def hold(self) -> None:
        """One more subscriber it publishes to is over its high-water mark."""
        ...

    def release(self) -> None:
        """One subscriber no longer holds it back."""
        ...


class Observer(Protocol):
    """Told what happens in the core, for an embedding application's
    observers (bastionmq.hooks). Each call returns at once and never raises:
    the core calls it on its hot path."""

    def message(self, message: Any, sender: Any) -> None:
        """``message`` (broker.message.Message) is being routed; ``sender``
        is the publisher's session, None when the broker publishes it."""
        ...

    def connected(self, connection: Client) -> None:
        """A client's CONNECT succeeded (it is attached to its session)."""
        ...

    def disconnected(self, connection: Client) -> None:
        """A connected client's connection has ended."""
        ...


class ClusterBus(Protocol):
    """The other nodes of a cluster, as the core sees them (cluster.bus).
    Each call returns at once: the messages go out with the next write."""

    def forward(self, message: Any, stream_id: str | None = None,
                after_commit: bool = False) -> Any:
        """``message`` (broker.message.Message) was published on this node.
        Returns what its acknowledgement (PUBACK, PUBREC) must wait for, to
        give as ``stored`` to the outbox, or None. ``stream_id``: the id to
        store it under (``new_stream_id``), sent once the durable store has
        committed what is recorded so far when ``after_commit``."""
        ...

    def new_stream_id(self) -> str | None:
        """An id to store a QoS 2 message under (kept with its packet id),
        or None when QoS 1/2 messages do not cross through a stream."""
        ...

    def store_again(self, message: Any, stream_id: str) -> Any:
        """Send ``message`` to the stream again under ``stream_id`` (a copy
        it has is dropped), not to this node's subscribers; what the
        acknowledgement waits for, as ``forward``."""
        ...

    def retained(self, message: Any) -> None:
        """``message`` was retained on this node (an empty payload clears)."""
        ...

    def subscribed(self, topic_filter: str) -> None:
        """A session of this node took ``topic_filter``; a shared one
        (``$share/...``) only when its group gets its first member here."""
        ...

    def unsubscribed(self, topic_filter: str) -> None:
        """A session of this node left ``topic_filter``; a shared one when
        its group's last member here left."""
        ...

    def claimed(self, client_id: str, owner: str | None, clean_start: bool) -> None:
        """A client connected to this node as ``client_id``, the identity
        ``owner`` (broker.ownership): the other nodes close theirs (and,
        with ``clean_start``, end their sessions of that id)."""
        ...

    def fetch_session(self, client: ClientInfo) -> Awaitable[int] | None:
        """Bring ``client``'s session here from the node holding it (or from
        its copy in the cluster), for a CONNECT that resumes one; None when
        there is nowhere to look, else an awaitable of the reason code the
        client is refused with (0: not refused; NOT_AUTHORIZED: the session
        is another identity's; SERVER_UNAVAILABLE: it could not be had)."""
        ...

    def session_changed(self, session: Any, urgent: bool) -> None:
        """A session of this node changed (connected, subscribed, went
        offline; acknowledged, not ``urgent``): its copy in the cluster is
        brought up to date, at once or at the next checkpoint."""
        ...

    def after_copy(self, session: Any, then: Callable[[], None]) -> None:
        """Call ``then`` once the session's copy in the cluster has what
        changed so far (at once where there are no copies); not at all if the
        session leaves this node before."""
        ...

    def session_ended(self, session: Any) -> None:
        """A session of this node ended: its copy in the cluster goes."""
        ...

    def session_moved(self, session: Any) -> None:
        """A session of this node went to another node, which keeps its copy."""
        ...

    def will_saved(self, client: ClientInfo, will: Any, due: float | None) -> None:
        """Keep ``will`` (broker.codec.Will) of ``client`` where another node
        finds it should this one die; ``due`` as for the durable store."""
        ...

    def will_deleted(self, client_id: str) -> None:
        """The will of ``client_id`` was published or discarded."""
        ...
