"""The data plane between nodes: one NATS connection per node.

A message published on this node is routed to the local subscribers first
(the core's own path); ``forward`` then appends one PUB of it, on the subject
its topic maps to (cluster.codec), to the bytes the next turn of the loop
writes, so a read of many PUBLISH packets costs one write here too. NATS
delivers a copy to every other node with a matching subscription: each node
subscribes to the subjects of its subscribers' filters, counted so that the
first subscriber of a filter brings the SUB and the last one gone the UNSUB.
The connection says ``echo: false``, so a node never gets its own messages
back. What arrives is matched again against the node's own subscriptions
(the subjects only narrow the nodes a message goes to) and delivered with
the core's route, as a message published here would be, minus the
forwarding.

Retained messages (and the clearing of one) also go on a subject every node
subscribes to, so every node alive keeps the same retained messages. Shared
groups take queue subscriptions (see ``_subscribe``). The same connection
carries what the nodes say to each other: that a client id connected here
(``claimed``), that this node is alive (heartbeats, ``nodes``), and requests
with an inbox for the JetStream API (``request``, ``deliver_to``;
cluster.jetstream, cluster.retained, cluster.wills).

This is a sans-IO parser (cluster.wire) fed by an ``asyncio.Protocol``, as
the listeners are: no task and no future per message. The connection is made
again when it is lost, to the next server of the list, and the subscriptions
are made again on it; messages forwarded meanwhile are dropped and counted
(between nodes this path is at most once, which is all QoS 0 promises).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import time
from typing import Any, Mapping, Sequence

import attrs

from bastionmq.broker.message import Message
from bastionmq.broker.shared import split_shared
from bastionmq.broker.core import SYS_PREFIX
from bastionmq.broker.logtext import shown
from bastionmq.broker.topics import validate_topic_name

from .codec import filter_to_subjects, subject_to_topic, topic_to_key, topic_to_subject
from .envelope import (
    ENVELOPE_VERSION, EnvelopeError, envelope_head, group_key, read_head, read_message,
)
from .envelope import pack_head as _pack_head
from .wire import (
    NO_RESPONDERS, Err, Info, Msg, NatsParser, Ping, Pong, WireError, connect, hpub, parse_status,
    pub, sub, unsub,
)
from .wire import PING, PONG

log = logging.getLogger("bastionmq.cluster")

#: Subjects of the messages routed between nodes, and of retained messages.
LIVE_PREFIX = "bmq.t"
RETAINED_PREFIX = "bmq.ret"

#: Where the nodes publish QoS 1 and 2 messages (the stream BMQ_MSGS's
#: subjects), and where the stream republishes what it stored (cluster.stream).
STORED_PREFIX = "bmq.d"
REPUBLISHED_PREFIX = "bmq.r"
SUBJECT_PREFIXES = frozenset((LIVE_PREFIX, RETAINED_PREFIX, STORED_PREFIX, REPUBLISHED_PREFIX))

#: The JetStream stream that keeps the last message of each retained subject
#: (cluster.retained).
RETAINED_STREAM = "BMQ_RETAINED"

#: Where a node says it has connected a client id (every node listens).
CLAIM_SUBJECT = "bmq.claim"
#: The last token of the inbox subject a node that holds the session of a
#: client id for another identity answers a claim on.
OBJECTION = "objection"

#: Where each node says, every heartbeat, that it is there (every node listens).
HEARTBEAT_SUBJECT = "bmq.node.heartbeat"

#: How long this node remembers when it connected a client id: two nodes that
#: connect one id at nearly the same time compare these, so that only the
#: older connection goes.
CLAIM_MEMORY_NS = 30 * 10**9

#: Origins whose last sequence is remembered (the oldest go first); each
#: start of a node is a new origin.
ORIGINS_KEPT = 1024

#: Topics of received subjects kept decoded and checked.
TOPICS_KEPT = 8192

#: nats-server's max_payload unless its INFO says otherwise (1 MiB).
DEFAULT_MAX_PAYLOAD = 1024 * 1024

#: The longest PUB line sent: nats-server closes a connection whose control
#: line is longer than its max_control_line (4 KiB by default).
MAX_LINE = 4096 - 16

#: The cached PUB line of a topic whose subject is too long to send.
_TOO_LONG = b"PUB -"

#: Waits between attempts to reach a server again, growing to the last.
RECONNECT_WAITS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class ClusterUnavailable(Exception):
    """No NATS server of the list could be reached at start."""


class NoResponders(Exception):
    """A request to a subject nobody answers (NATS status 503)."""


@attrs.define(slots=True)
class BusStats:
    #: Messages sent to the other nodes, and those received from them.
    forwarded: int = 0
    received: int = 0
    #: Second copies of a received message (one per extra matching subject
    #: of this node's), dropped.
    copies: int = 0
    #: Messages NATS gave a shared group of this node that the publishing
    #: node had served already (it has members of the group too).
    served_elsewhere: int = 0
    #: Messages not forwarded: no connection to NATS at the time, or its
    #: write buffer over the bound.
    dropped: int = 0
    #: Received messages refused: a subject or envelope no node makes.
    refused: int = 0
    #: Messages not forwarded because NATS would refuse them (larger than
    #: its max_payload, or a subject longer than a control line may be).
    too_large: int = 0
    #: Connections of this node closed because their client id connected
    #: on another node later.
    taken_over: int = 0
    #: Connections of this node closed after their CONNECT because another
    #: node held the session of their client id for another identity.
    identity_refused: int = 0
    #: Persistent sessions handed to another node, and taken from one
    #: (cluster.sessions).
    sessions_given: int = 0
    sessions_taken: int = 0
    #: Connections made to NATS, and lost.
    connects: int = 0
    disconnects: int = 0


class NatsBus(asyncio.Protocol):
    """A node's connection to NATS for the messages between nodes."""

    def __init__(self, core: Any, servers: Sequence[tuple[str, int]], name: str, *,
                 connect_timeout: float = 5.0, max_buffer: int = 64 * 1024 * 1024,
                 credentials: dict[str, str] | None = None,
                 tls: ssl.SSLContext | None = None, server_name: str | None = None,
                 heartbeat: float = 1.0) -> None:
        if not servers:
            raise ValueError("no NATS server given")
        self.core = core
        self.loop: asyncio.AbstractEventLoop = core.loop
        self.servers = list(servers)
        self.name = name
        self.connect_timeout = connect_timeout
        self.max_buffer = max_buffer
        self.credentials = credentials or {}
        #: TLS to the servers: the context, and the name their certificate
        #: must carry (None: each server's host; "disable": none).
        self.tls = tls
        self.server_name = server_name
        #: The current connection is past its TLS handshake.
        self._secured = False
        self._upgrade: asyncio.Task[None] | None = None
        #: Set by connection_lost once ``close`` has closed the connection.
        self._lost: asyncio.Future[None] | None = None
        #: This start of the node: copies are recognised by (origin, sequence).
        self.origin = secrets.token_bytes(8)
        self.sequence = 0
        self.stats = BusStats()
        self.transport: asyncio.Transport | None = None
        #: True from the server's answer to our first PING until the connection is lost.
        self.connected = False
        self.server: tuple[str, int] | None = None
        self.server_info: dict[str, Any] = {}
        self._parser = NatsParser(on_message=self._receive)
        #: Whether a message was routed during the current read.
        self._routed = False
        self._out = bytearray()
        self._flush_scheduled = False
        #: A QoS 1 or 2 message was forwarded since the last write.
        self._acked = False
        self._paused = False
        self._closing = False
        #: CONNECT sent on the current connection: subscriptions go out at once.
        self._greeted = False
        #: Subscribers per filter on this node, and the sids of its subjects.
        self._interest: dict[str, int] = {}
        self._sids: dict[str, tuple[int, ...]] = {}
        #: The queue subscriptions of this node's shared groups: sid -> (share, filter).
        self._group_sids: dict[int, tuple[str, str]] = {}
        self._next_sid = 1
        self._retained_sid = 0
        self._claim_sid = 0
        #: When this node connected each client id lately (wall clock, ns).
        self._claims: dict[str, int] = {}
        #: Futures waiting for a PONG, in the order of their PINGs (None for
        #: the PING of the greeting, whose PONG makes the connection ready).
        self._pongs: list[asyncio.Future[None] | None] = []
        self._ready: asyncio.Future[None] | None = None
        self._last_seen: dict[bytes, int] = {}
        self._topics: dict[str, str] = {}
        #: The PUB line of each topic forwarded lately.
        self._lines: dict[str, bytes] = {}
        #: Connected and the connection's write buffer under its high-water mark.
        self._sending = False
        #: The largest message the server takes (its INFO says).
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self._reconnect: asyncio.Task[None] | None = None
        self._server_index = 0
        self.heartbeat = heartbeat
        self._heartbeat_sid = 0
        self._heartbeats: asyncio.Task[None] | None = None
        #: The other nodes heard from: name -> (their last heartbeat, when it came).
        self.peers: dict[str, tuple[dict[str, Any], float]] = {}
        #: Told of each node found gone (cluster.wills), as (name, origin).
        self.wills: Any = None
        self.started_at = time.time()
        #: Requests (the JetStream API) waiting for their answer, by reply
        #: subject, and the subscriptions made for deliveries to an inbox.
        self._inbox = f"_INBOX.{self.origin.hex()}"
        self._objections = f"{self._inbox}.{OBJECTION}"
        self._inbox_sid = 0
        self._requests: dict[str, asyncio.Future[tuple[bytes, bytes | None, str | None]]] = {}
        self._next_request = 0
        self._deliveries: dict[int, Any] = {}
        #: Subjects this node answers requests on (``serve``): subscribed
        #: again, as deliveries, on every connection.
        self._services: dict[str, Any] = {}
        #: The side of sessions that follow their clients (cluster.sessions),
        #: and their copies in JetStream (cluster.replica), or None.
        self.sessions: Any = None
        self.replica: Any = None
        #: QoS 1 and 2 between nodes through JetStream (cluster.stream), or
        #: None: on the QoS 0 subjects, at most once (cluster.qos1_path = core).
        self.stream: Any = None
        #: Topics whose retained message another node set or cleared while
        #: the stream's copies load (cluster.retained), which those must not undo.
        self.retained_live: set[str] | None = None
        #: The retained stream exists: a clear also purges its subject there.
        self.purge_cleared = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the first server that answers; ClusterUnavailable when
        none does within ``connect_timeout``."""
        deadline = self.loop.time() + self.connect_timeout
        problems: list[str] = []
        while True:
            for _ in range(len(self.servers)):
                error = await self._connect(max(0.05, deadline - self.loop.time()))
                if error is None:
                    self._heartbeats = self.loop.create_task(
                        self._beat(), name="bastionmq cluster heartbeat")
                    return
                problems.append(error)
            if self.loop.time() >= deadline:
                raise ClusterUnavailable(
                    "no NATS server answered within %gs: %s" % (
                        self.connect_timeout, "; ".join(dict.fromkeys(problems))))
            await asyncio.sleep(0.1)

    async def _connect(self, timeout: float) -> str | None:
        """One attempt at the next server of the list; what went wrong, or None."""
        host, port = self.servers[self._server_index % len(self.servers)]
        self._server_index += 1
        self.server = (host, port)
        self._ready = self.loop.create_future()
        try:
            await asyncio.wait_for(self._open(host, port), timeout)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except (OSError, asyncio.TimeoutError, ClusterUnavailable) as exc:
            if self.transport is not None:
                self.transport.abort()
            return f"{host}:{port}: {exc or type(exc).__name__}"
        return None

    async def _open(self, host: str, port: int) -> None:
        await self.loop.create_connection(lambda: self, host, port)

    async def close(self) -> None:
        """Flush what is forwarded and close the connection for good."""
        self._closing = True
        for task in (self._reconnect, self._heartbeats):
            if task is not None:
                task.cancel()
        self._reconnect = self._heartbeats = None
        if self.stream is not None:
            self.stream.close()
        transport = self.transport
        if transport is not None:
            self._flush()
            self._lost = self.loop.create_future()
            transport.close()
            # A TLS connection closes in steps of its own (close_notify): the
            # loop must not stop before they are done.
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), 2.0)
            except asyncio.TimeoutError:
                transport.abort()
        for waiter in self._pongs:
            if waiter is not None and not waiter.done():
                waiter.set_exception(ClusterUnavailable("the bus closed"))
        self._pongs.clear()

    async def synced(self, timeout: float = 5.0) -> None:
        """Return when the server has read everything sent before (a PING
        answered): the subscriptions made so far are in place there."""
        if self.transport is None or not self.connected:
            raise ClusterUnavailable("not connected to NATS")
        waiter = self.loop.create_future()
        self._pongs.append(waiter)
        self._write(PING)
        await asyncio.wait_for(waiter, timeout)

    # ------------------------------------------------------------ the core's port

    def forward(self, message: Message, stream_id: str | None = None,
                after_commit: bool = False) -> Any:
        """Send a message published on this node to the nodes that want it.
        A QoS 1 or 2 message goes through the stream (cluster.stream) when
        there is one: what its acknowledgement waits for is returned (the
        port's forward, broker.ports.ClusterBus)."""
        # The hot path of a cluster: one dictionary lookup for the PUB line
        # of the topic, one struct for the envelope of a message without
        # properties or expiry, four appends.
        topic = message.topic
        line = self._lines.get(topic)
        if line is None:
            line = self._line_of(topic, LIVE_PREFIX, self._lines)
        if not line:
            return None  # $SYS is each node's own
        stream = self.stream if message.qos else None
        if stream is None and not self._sending:
            self.stats.dropped += 1
            return None
        self.sequence += 1
        # This node's shared groups of the topic had the message already
        # (the core routes before it forwards): the others must not.
        served = self._served(topic) if self.core.groups else ()
        if message.expires_at is None and not message.properties and not served:
            head = _pack_head(ENVELOPE_VERSION, message.qos | (4 if message.retain else 0),
                              self.origin, self.sequence)
        else:
            head = envelope_head(message, self.origin, self.sequence, self.loop.time(), served)
        payload = message.payload
        if stream is not None:
            self.stats.forwarded += 1
            if stream_id is None:
                stream_id = stream.new_id()
            message.stream_id = stream_id
            return stream.send(topic, head, payload, stream_id, after_commit)
        size = len(head) + len(payload)
        if size > self.max_payload or line is _TOO_LONG:
            self._unsendable(topic, size)
            return None
        out = self._out
        out += line % size
        out += head
        out += payload
        out += b"\r\n"
        self.stats.forwarded += 1
        if message.qos:
            # Its PUBACK or PUBREC is about to be written: this goes first.
            self._acked = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return None

    def new_stream_id(self) -> str | None:
        return self.stream.new_id() if self.stream is not None else None

    def store_again(self, message: Message, stream_id: str) -> Any:
        # forward's stream path; never its live one (a node now without a
        # stream must not send a copy its subscribers' nodes may have had).
        return self.forward(message, stream_id) if self.stream is not None else None

    def retained(self, message: Message) -> None:
        """Tell every node of a retained message set (or cleared) here."""
        line = self._line_of(message.topic, RETAINED_PREFIX)
        if not line:
            return
        if not self._sending:
            self.stats.dropped += 1
            return
        head = envelope_head(message, self.origin, 0, self.loop.time())
        size = len(head) + len(message.payload)
        if size > self.max_payload or line is _TOO_LONG:
            return self._unsendable(message.topic, size)
        self._write(line % size + head + message.payload + b"\r\n")
        if not message.payload and self.purge_cleared:
            # Behind the clear on the same connection: the stream keeps nothing.
            purge = json.dumps({"filter": line[4:line.index(b" ", 4)].decode()}).encode()
            self._write(pub(f"$JS.API.STREAM.PURGE.{RETAINED_STREAM}", purge,
                            self._inbox + ".purge"))

    def _unsendable(self, topic: str, size: int) -> None:
        """A message NATS would refuse, closing the connection: its
        subject longer than a control line may be, or itself larger than
        the server's max_payload. The other nodes do not get it; this
        node's subscribers did."""
        if not self.stats.too_large:
            log.warning("a message on %s is not sent to the other nodes: %s (logged once; "
                        "raise nats-server's max_payload, or lower mqtt.max_packet_size)",
                        shown(topic), f"{size} bytes, the NATS server takes {self.max_payload}"
                        if size > self.max_payload else "its topic is too long for a subject")
        self.stats.too_large += 1

    def _served(self, topic: str) -> list[str]:
        return [group_key(group.name, group.filter)
                for group, _ in self.core.shared_trie.match(topic)]

    @staticmethod
    def _line_of(topic: str, prefix: str, cache: dict[str, bytes] | None = None) -> bytes:
        """``PUB <subject> %d\\r\\n`` for ``topic`` (its size to fill in); empty
        for a $SYS topic, which stays on its node."""
        if topic.startswith(SYS_PREFIX):
            line = b""
        else:
            line = b"PUB %b %%d\r\n" % topic_to_subject(prefix, topic).encode()
            if len(line) > MAX_LINE:
                line = _TOO_LONG
        if cache is not None:
            if len(cache) >= TOPICS_KEPT:
                cache.clear()  # cheaper than evicting one by one, and rare
            cache[topic] = line
        return line

    def subscribed(self, topic_filter: str) -> None:
        """A subscriber of this node took ``topic_filter`` (one more)."""
        count = self._interest.get(topic_filter, 0)
        self._interest[topic_filter] = count + 1
        if count == 0 and self._greeted and not topic_filter.startswith(SYS_PREFIX):
            self._subscribe(topic_filter)

    def unsubscribed(self, topic_filter: str) -> None:
        """A subscriber of this node left ``topic_filter``."""
        count = self._interest.get(topic_filter, 0)
        if count > 1:
            self._interest[topic_filter] = count - 1
            return
        self._interest.pop(topic_filter, None)
        sids = self._sids.pop(topic_filter, ())  # only sids of this connection
        for sid in sids:
            self._group_sids.pop(sid, None)
        if sids:
            self._write(b"".join(unsub(sid) for sid in sids))

    def claimed(self, client_id: str, owner: str | None, clean_start: bool = False) -> None:
        """A client connected here as ``client_id``: tell the other nodes,
        which close a connection of theirs with that id (clean-session
        takeover by broadcast, as RabbitMQ's MQTT does: no round trip on the
        CONNECT path). While NATS is out of reach the claim is lost and two
        nodes may each keep a connection with the id until it connects again."""
        now = time.time_ns()
        claims = self._claims
        claims.pop(client_id, None)  # to the end: the dict stays in time order
        claims[client_id] = now
        if len(claims) > 1024:
            for old in [key for key, at in claims.items() if at < now - CLAIM_MEMORY_NS]:
                del claims[old]
        if self._sending:
            claim = json.dumps([client_id, owner, now, self.origin.hex(), clean_start])
            self._write(pub(CLAIM_SUBJECT, claim.encode()))

    def session_changed(self, session: Any, urgent: bool) -> None:
        if self.replica is not None:
            self.replica.changed(session, urgent)

    def after_copy(self, session: Any, then: Any) -> None:
        if self.replica is not None:
            self.replica.after_copy(session, then)
        else:
            then()

    def session_ended(self, session: Any) -> None:
        if self.replica is not None:
            self.replica.ended(session)

    def session_moved(self, session: Any) -> None:
        if self.replica is not None:
            self.replica.moved(session)

    def fetch_session(self, client: Any) -> Any:
        return self.sessions.fetch(client) if self.sessions is not None else None

    def _claim(self, payload: bytes) -> None:
        """Another node connected a client id."""
        try:
            fields = json.loads(payload)
            # (A node of the version before sends no clean start flag.)
            client_id, owner, at, origin = fields[:4]
            clean_start = fields[4] if len(fields) > 4 else False
            if not (isinstance(client_id, str) and isinstance(at, int)
                    and isinstance(origin, str) and (owner is None or isinstance(owner, str))
                    and isinstance(clean_start, bool)):
                raise ValueError("not [client id, owner, time, origin, clean start]")
        except (ValueError, TypeError) as exc:
            self._refuse(CLAIM_SUBJECT, f"a claim that is not one: {exc}")
            return
        mine = self._claims.get(client_id)
        if mine is not None and (mine, self.origin.hex()) > (at, origin):
            return  # connected here later: the other node closes its connection
        if self.core.held_against(client_id, owner):
            # Another identity's: that node refuses its client (_objected).
            self.publish(f"_INBOX.{origin}.{OBJECTION}",
                         json.dumps([client_id, at, self.name]).encode())
            return
        self._claims.pop(client_id, None)
        if self.core.taken_over_elsewhere(client_id, owner, clean_start):
            self.stats.taken_over += 1

    # ------------------------------------------------------------ requests

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 5.0,
                      headers: Mapping[str, str] | None = None) -> bytes:
        """Publish ``payload`` (with ``headers``) to ``subject`` and return
        the answer (the JetStream API's JSON, say). NoResponders when no one
        listens there, ClusterUnavailable when not connected, TimeoutError."""
        if not self._sending:
            raise ClusterUnavailable("not connected to NATS")
        self._next_request += 1
        reply = f"{self._inbox}.{self._next_request}"
        waiter: asyncio.Future[tuple[bytes, bytes | None, str | None]] = self.loop.create_future()
        self._requests[reply] = waiter
        self._write(pub(subject, payload, reply) if headers is None
                    else hpub(subject, headers, payload, reply))
        try:
            answer, answer_headers, _ = await asyncio.wait_for(waiter, timeout)
        finally:
            self._requests.pop(reply, None)
        status = parse_status(answer_headers) if answer_headers is not None else None
        if status is not None and status[0] == NO_RESPONDERS:
            raise NoResponders(subject)
        return answer

    def new_origin(self) -> None:
        """Be a new start of this node for the others from now on (see
        cluster.wills): new (origin, sequence) pairs, a new heartbeat."""
        self.origin = secrets.token_bytes(8)
        self.sequence = 0

    def publish(self, subject: str, payload: bytes, reply: str | None = None) -> bool:
        """Publish to a subject of the nodes' own (not a topic's), answers
        to ``reply``; whether it went (not while NATS is out of reach)."""
        if not self._sending:
            return False
        if len(subject) > MAX_LINE - 32 or len(payload) > self.max_payload:
            self._unsendable(subject, len(payload))
            return False
        self._write(pub(subject, payload, reply))
        return True

    def serve(self, subject: str, handler: Any) -> None:
        """Give each request published to ``subject`` to ``handler(subject,
        payload, headers, reply)``, on this connection and the next ones."""
        self._services[subject] = handler
        if self._greeted:
            self._serve(subject, handler)

    def _serve(self, subject: str, handler: Any) -> None:
        sid = self._next_sid
        self._next_sid += 1
        self._deliveries[sid] = handler
        self._write(sub(subject, sid))

    def deliver_to(self, handler: Any) -> tuple[str, int]:
        """A new inbox subject and its subscription: each message delivered
        there (a JetStream consumer's) is given to ``handler(subject,
        payload, headers, reply)``, with the subject it was published on.
        Returns (inbox subject, sid) for ``stop_delivery``."""
        self._next_request += 1
        subject = f"{self._inbox}.d{self._next_request}"
        sid = self._next_sid
        self._next_sid += 1
        self._deliveries[sid] = handler
        self._write(sub(subject, sid))
        return subject, sid

    def stop_delivery(self, sid: int) -> None:
        if self._deliveries.pop(sid, None) is not None and self.transport is not None:
            self._write(unsub(sid))

    def _objected(self, payload: bytes) -> None:
        """Another node holds the session of a client id this node claimed,
        for another identity: the client that made the claim is refused."""
        try:
            client_id, at, node = json.loads(payload)
            if not (isinstance(client_id, str) and isinstance(at, int)
                    and isinstance(node, str)):
                raise ValueError("not [client id, time, node]")
        except (ValueError, TypeError) as exc:
            self._refuse(self._inbox, f"an objection that is not one: {exc}")
            return
        if self._claims.get(client_id) == at:  # still the connection that claimed it
            del self._claims[client_id]
            if self.core.refused_elsewhere(client_id, node):
                self.stats.identity_refused += 1

    def _answer(self, sid: int, subject: str, payload: bytes, headers: bytes | None,
                reply: str | None) -> None:
        if subject == self._objections:
            self._objected(payload)
            return
        handler = self._deliveries.get(sid)
        if handler is not None:
            handler(subject, payload, headers, reply)
            return
        if self.stream is not None and self.stream.answered(subject, payload, headers):
            return
        waiter = self._requests.get(subject)
        if waiter is not None and not waiter.done():
            waiter.set_result((payload, headers, reply))

    def will_saved(self, client: Any, will: Any, due: float | None) -> None:
        if self.wills is not None:
            self.wills.saved(client, will, due)

    def will_deleted(self, client_id: str) -> None:
        if self.wills is not None:
            self.wills.deleted(client_id)

    # ------------------------------------------------------------ the nodes

    def figures(self) -> dict[str, Any]:
        """What this node tells the others every heartbeat."""
        core = self.core
        connected = sum(1 for session in core.sessions.values() if session.connection is not None)
        return {"node": self.name, "origin": self.origin.hex(), "started_at": self.started_at,
                "connections": len(core.connections), "clients": connected,
                "sessions": len(core.sessions), "subscriptions": core.subscription_count(),
                "at": time.time()}

    async def _beat(self) -> None:
        while True:
            if self._sending:
                self._beat_now()
                self.nodes()  # finds the nodes gone quiet
            await asyncio.sleep(self.heartbeat)

    def _beat_now(self) -> None:
        self._write(pub(HEARTBEAT_SUBJECT, json.dumps(self.figures()).encode()))

    def others(self) -> set[str]:
        """The names of the other nodes heard from within three heartbeats."""
        since = self.loop.time() - 3 * self.heartbeat
        return {name for name, (_, at) in self.peers.items() if at >= since}

    def _heard(self, payload: bytes) -> None:
        try:
            figures = json.loads(payload)
            name = figures["node"]
            if not isinstance(name, str):
                raise ValueError("no node name")
        except (ValueError, TypeError, KeyError) as exc:
            self._refuse(HEARTBEAT_SUBJECT, f"a heartbeat that is not one: {exc}")
            return
        known = self.peers.get(name)
        if known is not None and known[0].get("origin") != figures.get("origin"):
            self._gone(known[0])  # restarted: its former self is gone
        self.peers[name] = (figures, self.loop.time())
        if known is None and self.replica is not None:
            self.replica.node_heard(name)
        if (known is None or known[0].get("origin") != figures.get("origin")) \
                and self._sending:
            # A node new to us: it learns of this one now, not a heartbeat
            # later (a CONNECT on it asks the nodes it knows for sessions).
            self._beat_now()

    def _gone(self, figures: dict[str, Any]) -> None:
        log.info("node %s (%s) is gone", figures.get("node"), figures.get("origin"))
        if self.wills is not None and isinstance(figures.get("origin"), str):
            self.wills.gone(figures["node"], figures["origin"])
        if self.replica is not None and isinstance(figures.get("node"), str):
            self.replica.node_gone(figures["node"])

    def nodes(self) -> list[dict[str, Any]]:
        """This node and the others heard from within three heartbeats."""
        now = self.loop.time()
        for name in [name for name, (_, at) in self.peers.items()
                     if now - at > 3 * self.heartbeat]:
            self._gone(self.peers.pop(name)[0])
        this = dict(self.figures(), this=True)
        return [this] + [dict(figures, this=False) for figures, _ in
                         sorted(self.peers.values(), key=lambda peer: peer[0]["node"])]

    def status(self) -> dict[str, Any]:
        """The cluster as this node sees it (the management API's /cluster)."""
        info = self.server_info
        return {
            "node": self.name,
            "nats": {"connected": self.connected,
                     "server": "%s:%d" % self.server if self.server else None,
                     "server_name": info.get("server_name"), "version": info.get("version"),
                     "cluster": info.get("cluster"), "tls": self._secured,
                     "filters": len(self._interest)},
            "nodes": self.nodes(),
            "counters": attrs.asdict(self.stats),
            "stream": None if self.stream is None else self.stream.status(),
            "sessions": None if self.replica is None else self.replica.status(),
        }

    # ------------------------------------------------------------ writing

    def _write(self, data: bytes) -> None:
        self._out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._acked = False
        if self._out and self.transport is not None:
            self.transport.write(bytes(self._out))
        self._out.clear()

    def before_acks(self) -> None:
        """Called by the core's outboxes before they write: when a QoS 1 or
        2 message was forwarded since the last write, it leaves now, before
        its PUBACK or PUBREC (QoS 0 waits for the end of the loop's turn,
        with the others: fewer, larger writes)."""
        if self._acked:
            self._flush()

    def _subscribe(self, topic_filter: str) -> None:
        """SUB the subjects of a filter; for a shared group's, in a queue
        group of its own, so that NATS gives each message to one node of
        those that have members (one queue per (share, filter): NATS groups
        queue subscriptions by name across subjects)."""
        given = topic_filter
        shared = split_shared(topic_filter)
        queue = None
        if shared is not None:
            queue = topic_to_key(shared[0] + "/" + shared[1])
            topic_filter = shared[1]
        sids = []
        out = bytearray()
        subjects = filter_to_subjects(LIVE_PREFIX, topic_filter)
        if self.stream is not None:
            subjects += filter_to_subjects(REPUBLISHED_PREFIX, topic_filter)
        for subject in subjects:
            sid = self._next_sid
            self._next_sid += 1
            sids.append(sid)
            if shared is not None:
                self._group_sids[sid] = shared
            out += sub(subject, sid, queue)
        self._sids[given] = tuple(sids)
        self._write(bytes(out))
        # Before the SUBACK (before_acks): a client told its subscription is
        # there publishes at once, and NATS should have the interest first.
        self._acked = True

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # Bursts are absorbed up to max_buffer; past it, forwarding stops
        # (dropped, counted) until the server has read half of it.
        transport.set_write_buffer_limits(high=self.max_buffer, low=self.max_buffer // 2)
        self._parser = NatsParser(on_message=self._receive)
        self._out.clear()
        self._paused = False
        self._secured = False
        # The server speaks first (INFO); everything else waits for it.

    def data_received(self, data: bytes) -> None:
        try:
            events = self._parser.feed(data)
        except WireError as exc:
            log.warning("NATS server %s sent what the protocol does not allow (%s); "
                        "connecting again", self._where(), exc)
            events = exc.events
            self.loop.call_soon(self._abort)
        for event in events:
            if type(event) is Msg:
                if event.sid == self._inbox_sid or event.sid in self._deliveries:
                    self._answer(event.sid, event.subject, event.payload, event.headers,
                                 event.reply)
                elif event.headers is not None and self.stream is not None \
                        and event.subject.startswith(REPUBLISHED_PREFIX + "."):
                    self.stream.received(event.subject, event.sid, event.payload, event.headers)
                else:  # with headers or a reply subject: no node sends one
                    self._refuse(event.subject, "a message with headers or a reply subject")
            elif type(event) is Ping:
                self._write(PONG)
            elif type(event) is Pong:
                self._pong()
            elif type(event) is Info:
                self._info(event.info)
            elif type(event) is Err:
                log.warning("NATS server %s: %s", self._where(), event.message)
        if self._routed:
            self._routed = False
            self.core.outboxes.flush()

    def pause_writing(self) -> None:
        self._paused = True
        self._sending = False

    def resume_writing(self) -> None:
        self._paused = False
        self._sending = self.connected

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        was_connected = self.connected
        self.transport = None
        self.connected = self._greeted = self._sending = False
        self._sids.clear()
        self._group_sids.clear()
        self._out.clear()
        for waiter in [*self._pongs, *self._requests.values()]:
            if waiter is not None and not waiter.done():
                waiter.set_exception(ClusterUnavailable("the connection to NATS was lost"))
        self._pongs.clear()
        self._deliveries.clear()  # their subscriptions went with the connection
        if self._ready is not None and not self._ready.done():
            why = "the server closed the connection before it was ready"
            if self._secured:
                why += " (after the TLS handshake: does it accept this node's certificate?)"
            self._ready.set_exception(ClusterUnavailable(f"{why}{': ' + str(exc) if exc else ''}"))
            self._ready.exception()  # retrieved: start() reports it its own way
        if was_connected:
            self.stats.disconnects += 1
            if not self._closing:
                log.warning("lost the connection to NATS server %s%s; connecting again",
                            self._where(), f" ({exc})" if exc else "")
                self._reconnect = self.loop.create_task(self._reconnect_loop(),
                                                        name="bastionmq cluster reconnect")

    # ------------------------------------------------------------ reading

    def _info(self, info: dict[str, Any]) -> None:
        self.server_info = info
        max_payload = info.get("max_payload")
        if isinstance(max_payload, int) and max_payload > 0:
            self._parser.max_payload = self.max_payload = max_payload
        if self._greeted or self.transport is None or self._upgrade is not None:
            return  # a later INFO: the cluster's servers changed
        if not self._secured and (self.tls is not None or info.get("tls_required")):
            # NATS speaks TLS after its first INFO, in plain text.
            if self.tls is None:
                self._fail("the server requires TLS: set cluster.nats.tls")
            elif not (info.get("tls_required") or info.get("tls_available")):
                self._fail("the server does not offer TLS (cluster.nats.tls is on)")
            else:
                self._upgrade = self.loop.create_task(self._start_tls(),
                                                      name="bastionmq cluster TLS")
            return
        self._greet()

    def _fail(self, why: str) -> None:
        """This connection cannot be used: start() (or the reconnect loop) says why."""
        log.debug("NATS server %s: %s", self._where(), why)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ClusterUnavailable(why))
        self._abort()

    async def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None and self.tls is not None and self.server is not None
        name = self.server_name or self.server[0]
        try:
            secured = await self.loop.start_tls(
                transport, self, self.tls,
                server_hostname=None if name == "disable" else name)
        except (ssl.SSLError, ssl.CertificateError, OSError, ConnectionError) as exc:
            verified = getattr(exc, "verify_message", None)
            self._fail("TLS handshake failed: " + (
                f"certificate verify failed: {verified}" if verified else str(exc)))
            return
        finally:
            self._upgrade = None
        if secured is None or self.transport is not transport:
            return  # lost meanwhile
        self.transport = secured
        secured.set_write_buffer_limits(high=self.max_buffer, low=self.max_buffer // 2)
        self._secured = True
        self._greet()

    def _greet(self) -> None:
        """Introduce ourselves, make every subscription again, and PING:
        the PONG says the server took all of it."""
        self._greeted = True
        given = self.credentials
        self._write(connect(name=self.name, echo=False, user=given.get("user"),
                            password=given.get("password"), token=given.get("token")))
        for topic_filter in self._interest:
            if not topic_filter.startswith(SYS_PREFIX):
                self._subscribe(topic_filter)
        self._retained_sid = self._next_sid
        self._claim_sid = self._next_sid + 1
        self._heartbeat_sid = self._next_sid + 2
        self._inbox_sid = self._next_sid + 3
        self._next_sid += 4
        self._write(sub(RETAINED_PREFIX + ".>", self._retained_sid)
                    + sub(CLAIM_SUBJECT, self._claim_sid)
                    + sub(HEARTBEAT_SUBJECT, self._heartbeat_sid)
                    + sub(self._inbox + ".*", self._inbox_sid))
        for subject, handler in self._services.items():
            self._serve(subject, handler)
        if self.stream is not None:
            self.stream.reconnecting()
        self._write(PING)
        self._pongs.insert(0, None)  # the answer to this PING makes it ready

    def _pong(self) -> None:
        if not self._pongs:
            return
        waiter = self._pongs.pop(0)
        if waiter is None and not self.connected and self.transport is not None:
            self.connected = True
            self._sending = not self._paused
            self.stats.connects += 1
            if self.stats.connects > 1:
                # Heard from or not while this node was away, every node
                # gets three heartbeats from now before it counts as gone.
                now = self.loop.time()
                self.peers = {name: (figures, now) for name, (figures, _) in self.peers.items()}
                if self.wills is not None:
                    self.wills.reconnected()
                if self.replica is not None:
                    self.replica.reconnected()
            log.info("connected to NATS server %s as %s", self._where(), self.name)
            if self.stream is not None:
                self.stream.reconnected()
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _receive(self, subject: str, sid: int, payload: bytes) -> None:
        """Deliver one message from another node (the parser's on_message)."""
        if sid == self._claim_sid:
            self._claim(payload)
            return
        if sid == self._heartbeat_sid:
            self._heard(payload)
            return
        if sid == self._inbox_sid or sid in self._deliveries:
            self._answer(sid, subject, payload, None, None)
            return
        topic = self._topics.get(subject)
        if topic is None:
            topic = self.topic_of(subject)
            if topic is None:
                return
        self.deliver_remote(topic, sid, payload, True)

    def deliver_remote(self, topic: str, sid: int, payload: bytes, live: bool,
                       source: Any = None) -> None:
        """Deliver a message of another node that came on subscription
        ``sid``; ``live``: on the QoS 0 subjects, where copies are known by
        their (origin, sequence) (the stream's copies by their sequence);
        ``source``: as BrokerCore.route_remote's."""
        core = self.core
        last = None
        try:
            flags, origin, sequence = read_head(payload)
            group = self._group_sids.get(sid) if self._group_sids else None
            if group is not None:
                # NATS picked this node for one of its shared groups.
                message, served = read_message(topic, payload, flags, self.loop.time())
                if group_key(*group) in served:
                    self.stats.served_elsewhere += 1
                elif core.deliver_to_group(message, *group):
                    self.stats.received += 1
                    self._routed = True
                return
            if sid == self._retained_sid:
                core.retain(read_message(topic, payload, flags, self.loop.time())[0], False)
                if self.retained_live is not None:
                    self.retained_live.add(topic)
                return
            if live:
                last = self._last_seen.get(origin)
                if last is not None and sequence <= last:
                    self.stats.copies += 1
                    return
            message = read_message(topic, payload, flags, self.loop.time())[0]
        except EnvelopeError as exc:
            self._refuse(topic, str(exc))
            return
        if live:
            if last is None and len(self._last_seen) >= ORIGINS_KEPT:
                del self._last_seen[next(iter(self._last_seen))]
            self._last_seen[origin] = sequence
        self.stats.received += 1
        core.route_remote(message, source)
        self._routed = True

    def topic_of(self, subject: str) -> str | None:
        """The topic of a received subject, checked as a client's would be."""
        prefix = subject[:subject.find(".", 4)]
        if prefix not in SUBJECT_PREFIXES:
            self._refuse(subject, "a subject no node publishes on")
            return None
        try:
            topic = subject_to_topic(prefix, subject)
            validate_topic_name(topic)
        except ValueError as exc:
            self._refuse(subject, str(exc))
            return None
        if len(self._topics) >= TOPICS_KEPT:
            self._topics.clear()
        self._topics[subject] = topic
        return topic

    def _refuse(self, subject: str, why: str) -> None:
        if not self.stats.refused:
            log.warning("refused a message on %s from NATS: %s (logged once)", subject[:200], why)
        self.stats.refused += 1

    # ------------------------------------------------------------ reconnecting

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def _reconnect_loop(self) -> None:
        attempt = 0
        try:
            while not self._closing and not self.connected:
                await asyncio.sleep(RECONNECT_WAITS[min(attempt, len(RECONNECT_WAITS) - 1)])
                attempt += 1
                error = await self._connect(self.connect_timeout)
                if error is not None and (attempt == 1 or attempt % 30 == 0):
                    log.warning("cannot reach NATS (attempt %d): %s", attempt, error)
        finally:
            self._reconnect = None

    def _where(self) -> str:
        return "%s:%d" % self.server if self.server is not None else "?"
