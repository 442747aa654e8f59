"""The ``cluster`` settings: this node's place among others, on NATS."""

from __future__ import annotations

import os
import re
import socket

import attrs
from attrs import validators as v

from bastionmq.listeners.settings import _tls_versions

#: Where a NATS server listens for clients when none is named.
DEFAULT_NATS_PORT = 4222

_SERVER_RE = re.compile(r"(?:nats://)?(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+))(?::(\d{1,5}))?")


def parse_server(text: str) -> tuple[str, int]:
    """``nats://HOST:PORT``, ``HOST:PORT`` or ``HOST`` (port 4222) as
    (host, port); ValueError with an operator's message otherwise."""
    match = _SERVER_RE.fullmatch(text.strip())
    port = int(match.group(3)) if match and match.group(3) else DEFAULT_NATS_PORT
    if match is None or not 0 < port < 65536:
        raise ValueError(f"{text!r} is not a NATS server address "
                         "(nats://HOST:PORT, HOST:PORT or HOST)")
    return match.group(1) or match.group(2), port


def _servers(instance: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("must name at least one NATS server")
    for text in value:
        parse_server(text)


@attrs.define(slots=True, frozen=True, kw_only=True)
class NatsTlsConfig:
    """TLS to the NATS servers, in the listeners' ssl_options vocabulary
    (the client's side of it): what crosses is the clients' messages."""

    enable: bool = False
    #: The CA the servers' certificates must chain to; unset, the system's.
    cacertfile: str | None = None
    #: This node's certificate and key, for servers that ask for one
    #: (nats-server ``tls { verify: true }``).
    certfile: str | None = None
    keyfile: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    #: verify_peer: the server's certificate must chain to cacertfile and
    #: name the server. verify_none: any certificate (testing only).
    verify: str = attrs.field(default="verify_peer",
                              validator=v.in_(("verify_peer", "verify_none")))
    #: The name the server's certificate must carry, and that is sent as SNI;
    #: unset, the host of the server's address; "disable": none sent, none checked.
    server_name_indication: str | None = None
    versions: tuple[str, ...] = attrs.field(default=("tlsv1.3", "tlsv1.2"),
                                            validator=_tls_versions)
    #: Cipher suites by OpenSSL or IANA name; empty keeps OpenSSL's defaults.
    ciphers: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")


@attrs.define(slots=True, frozen=True, kw_only=True)
class NatsConfig:
    """How this node reaches NATS."""

    #: The servers, tried in turn (at start, and when the connection is lost).
    servers: tuple[str, ...] = attrs.field(default=("nats://127.0.0.1:4222",),
                                           validator=_servers)
    #: All-in-one: the broker starts a nats-server with JetStream itself,
    #: listening on loopback at the first server's port, its store in
    #: node.data_dir/nats, and stops it on the way out. For one machine
    #: (development, tests, a single box); in production NATS is run by the
    #: operator, as a cluster of its own.
    embedded: bool = False
    #: The nats-server program for ``embedded`` (looked up on PATH, then in /usr/sbin).
    embedded_binary: str = "nats-server"
    #: How long start-up waits for a server to answer before it gives up.
    connect_timeout: float = attrs.field(default=5.0, metadata={"unit": "duration"},
                                         validator=v.gt(0))
    #: Credentials, when the servers ask for them.
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    tls: NatsTlsConfig = attrs.field(factory=NatsTlsConfig)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [parse_server(text) for text in self.servers]

    @property
    def credentials(self) -> dict[str, str]:
        given = {"user": self.username, "password": self.password, "token": self.token}
        return {key: value for key, value in given.items() if value is not None}


@attrs.define(slots=True, frozen=True, kw_only=True)
class ClusterConfig:
    """Running as one node of several (../docs/cluster.md)."""

    enable: bool = False
    #: This node's name among the others; unset, the host name and the process id.
    node_name: str | None = attrs.field(
        default=None, validator=v.optional(v.matches_re(r"[A-Za-z0-9_.@-]{1,64}")))
    nats: NatsConfig = attrs.field(factory=NatsConfig)
    #: Copies JetStream keeps of what the cluster stores (the retained
    #: messages): 1 on one machine, 3 (or 5) with a NATS cluster of as many servers.
    replicas: int = attrs.field(default=1, validator=[v.ge(1), v.le(5)])
    #: How often each node tells the others it is there (with its figures,
    #: for ``bastionmq ctl cluster status``); a node not heard from for three
    #: intervals is gone.
    heartbeat: float = attrs.field(default=1.0, metadata={"unit": "duration"},
                                   validator=[v.ge(0.05), v.le(60)])

    #: How long a CONNECT that resumes a session waits for the other nodes
    #: to say whether one of them holds it (cluster.sessions); a node that
    #: does not answer in time is taken to hold none.
    takeover_timeout: float = attrs.field(default=1.0, metadata={"unit": "duration"},
                                          validator=[v.ge(0.01), v.le(60)])

    #: How QoS 1 and 2 messages cross between nodes. "stream": through the
    #: JetStream stream BMQ_MSGS, acknowledged once stored there, read again
    #: by a node that was away (cluster.stream). "core": like QoS 0, at most
    #: once between nodes, without the stream's round trip.
    qos1_path: str = attrs.field(default="stream", validator=v.in_(("stream", "core")))
    #: How long the stream keeps a QoS 1/2 message: a node away for longer
    #: (down, or cut off from NATS) misses what it held for its sessions.
    message_retention: float = attrs.field(default=86400.0, metadata={"unit": "duration"},
                                           validator=v.gt(0))
    #: How long the stream remembers a message's id to drop a second copy
    #: (a message sent again for want of an answer).
    duplicate_window: float = attrs.field(default=120.0, metadata={"unit": "duration"},
                                          validator=[v.ge(1), v.le(86400)])

    @property
    def name(self) -> str:
        return self.node_name or f"{socket.gethostname()}-{os.getpid()}"
