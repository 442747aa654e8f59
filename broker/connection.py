"""One client's protocol state machine.

A listener creates a ``Connection`` for each accepted transport and forwards
the asyncio Protocol callbacks to it. All packets of one read are handled in
one pass; what they cause is written into outboxes (``broker.outbox``), and
each touched outbox is written once at the end of the pass: a broker pays per
read, not per packet.
"""

from __future__ import annotations

import inspect
import logging
import re
import time

import attrs
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .codec import (
    MQTT_5, PINGRESP_BYTES, Auth, Connack, Connect, Decoder, Disconnect, MalformedPacket, Packet,
    Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Unsuback, Unsubscribe, Will,
    encode,
)
from .enhanced_auth import EnhancedAuth
from .message import Message
from .outbox import Outbox
from .access import Pending
from .ports import PUBLISH_ACTION, SUBSCRIBE_ACTION, AuthRequest, AuthResult, ClientInfo, PeerInfo
from .packet_types import (
    AUTH, CONNECT, DISCONNECT, PACKET_NAMES, PINGREQ, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SUBSCRIBE, UNSUBSCRIBE,
)
from .properties import CONNACK_V3_CODES, Reason, reason_name
from .logtext import endpoint, shown
from .sessions import Session
from .shared import shared_inner, split_shared
from .topics import InvalidTopic, validate_filter, validate_topic_name

if TYPE_CHECKING:
    import asyncio

    from .core import BrokerCore

log = logging.getLogger("bastionmq.connection")

# Connection states.
NEW, AUTHENTICATING, CONNECTED, CLOSED = range(4)

_MAX_U16 = 65535

#: A lingering close reads and discards for at most this long, and this much.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024

#: Seconds between two log lines about one connection's refused requests.
REFUSAL_LOG_INTERVAL = 10.0
#: Characters of a protocol violation's explanation a log line shows.
MAX_LOGGED_REASON = 300

#: Refused in client ids and usernames: C0 and C1 controls and DEL.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")

#: Bytes a client held back by publisher flow control may send before its
#: socket is no longer read (what it sends is kept until it may go on).
HELD_BYTES_LIMIT = 256 * 1024

#: Packets handled from one client before it lets the event loop serve the
#: others for a turn. The loop reads a readable socket up to 32 times in a
#: row (64 KiB each with uvloop): a client publishing flat out would keep
#: the broker on it for seconds per turn, and new connections, the
#: operations listener and timers would wait that long. Yielding costs a
#: pause and a resume of the socket per this many packets.
PACKETS_PER_TURN = 256


class Connection:
    __slots__ = (
        "core", "transport", "peer", "decoder", "state", "client_id",
        "username", "superuser", "session", "keepalive", "last_seen", "keepalive_bucket",
        "_idle_handle", "will", "outbox", "_held", "close_reason", "disconnect_cause",
        "connected_at", "topic_aliases",
        "problem_info", "auth", "client_info",
        "access_cache", "will_stored", "holders", "held_since",
        "held_bytes", "reading_paused", "refusal_log_at", "refusals_unlogged",
        "linger_handle", "linger_bytes", "traffic", "unyielded",
    )

    def __init__(self, core: BrokerCore, transport: Any, peer: PeerInfo) -> None:
        """A connection of ``core`` on ``transport``, as a listener makes one
        for each client it admits."""
        self.core = core
        self.transport = transport
        self.peer = peer
        # Until the client has authenticated, its packets are held to the
        # smaller limit; finish_connect lifts it.
        self.decoder = Decoder(max_packet_size=min(core.settings.max_packet_size,
                                                   core.settings.max_connect_size))
        self.state = NEW
        self.client_id = ""
        self.username: str | None = None
        self.superuser = False
        # None until CONNECT succeeds, yet typed without None: nothing reads it
        # before then (packet handlers run once CONNECTED, or refuse the
        # packet), so the hot path needs no check to satisfy the type checker.
        self.session: Session = None  # type: ignore[assignment]
        self.keepalive = 0
        self.last_seen = core.loop.time()
        #: Where the core's keep-alive wheel holds it (0: nowhere).
        self.keepalive_bucket = 0
        self._idle_handle: asyncio.TimerHandle | None = core.loop.call_later(
            core.settings.idle_timeout, self._idle_expired)
        self.will: Will | None = None
        #: The byte counters of this connection's listener.
        self.traffic = core.stats.traffic_of(peer.listener)
        self.outbox = Outbox(transport, core.outboxes, core.settings.max_inflight, self.traffic)
        #: Packets that arrived while an asynchronous authentication was
        #: pending, or while publisher flow control holds this client back.
        self._held: list[Packet] | None = None
        #: Publisher flow control: how many subscribers hold this client back
        #: (see hold), since when, how many bytes arrived meanwhile, and
        #: whether the socket is no longer read because of them.
        self.holders = 0
        self.held_since = 0.0
        self.held_bytes = 0
        self.reading_paused = False
        #: Packets handled since this client last let the loop serve others.
        self.unyielded = 0
        #: Refusals are logged at most once per interval (see _log_refusal).
        self.refusal_log_at = 0.0
        self.refusals_unlogged = 0
        #: A lingering close (see close): its timer, and the bytes discarded.
        self.linger_handle: Any = None
        self.linger_bytes = 0
        self.close_reason = ""
        #: Why it ended, from a bounded set (a reason code's name, "client
        #: disconnect", "connection lost"): the label disconnects are counted by.
        self.disconnect_cause = ""
        #: When its CONNECT succeeded (Unix time), for operators.
        self.connected_at: float | None = None
        #: Inbound topic aliases of a 5.0 client: alias -> topic name.
        self.topic_aliases: dict[int, str] | None = None
        #: 5.0 Request Problem Information: whether reason strings may go on
        #: packets other than CONNACK and DISCONNECT ([MQTT-3.1.2-29]).
        self.problem_info = True
        #: Enhanced authentication, when the client connected with a method.
        self.auth: EnhancedAuth | None = None
        #: Who the client is, for authorization; set when CONNECT succeeds.
        self.client_info: ClientInfo | None = None
        #: Recent authorization decisions for this client (see broker.access).
        self.access_cache: dict | None = None
        #: Whether the durable store holds this connection's will.
        self.will_stored = False
        core.connections.add(self)

    @property
    def version(self) -> int:
        """The protocol level of the client's CONNECT (3, 4 or 5; 0 before
        it): kept by the outbox, which encodes by it."""
        return self.outbox.version

    def __repr__(self) -> str:
        return f"<Connection {self.client_id or '-'} {self.peer.listener} {self.peer.address}>"

    # ------------------------------------------------------- transport side

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            if self.linger_handle is not None:  # lingering: discarded, up to a bound
                self.linger_bytes += len(data)
                if self.linger_bytes > LINGER_BYTES:
                    self.transport.close()
            return
        core = self.core
        self.traffic.received += len(data)
        if self.holders:
            self.held_bytes += len(data)
            if self.held_bytes > HELD_BYTES_LIMIT and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
        try:
            packets = self.decoder.feed(data)
        except MalformedPacket as exc:
            core.stats.packets_received += len(exc.packets)
            self._handle_packets(exc.packets)
            self._handle_all_held()
            self._malformed(exc)
        else:
            if packets:
                core.stats.packets_received += len(packets)
                # [MQTT-3.1.2-24] speaks of Control Packets: bytes that complete
                # none are no sign of life, so a packet trickled in slower than
                # the keep alive allows ends the connection.
                self.last_seen = core.loop.time()
                self.unyielded += len(packets)
                if self.unyielded > PACKETS_PER_TURN and self.state == CONNECTED:
                    self._handle_in_turns(packets)
                else:
                    self._handle_packets(packets)
        core.outboxes.flush()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == CLOSED:
            if self.linger_handle is not None:
                self.linger_handle.cancel()
                self.linger_handle = None
                self.core.lingering.discard(self.transport)
            return
        self._handle_all_held()
        if self.state == CLOSED:
            self.core.outboxes.flush()
            return
        if not self.close_reason:
            self.close_reason = "connection lost" if exc is None else f"connection lost: {exc}"
        if not self.disconnect_cause:
            self.disconnect_cause = "connection lost"
        self._teardown()
        self.core.outboxes.flush()

    def _handle_all_held(self) -> None:
        """The client is going (its connection is lost, or it sent a
        malformed packet): what it sent that is waiting for a later turn or
        held back by flow control is handled now, beyond the high-water marks
        (at most HELD_BYTES_LIMIT and one read), rather than lost because the
        broker made it wait."""
        if self._held and self.state == CONNECTED:
            if self.holders > 0:
                self.core.stats.publisher_paused_seconds += self.core.loop.time() - self.held_since
            held, self._held, self.holders = self._held, None, -1
            self._handle_packets(held)

    def pause_writing(self) -> None:
        self.outbox.paused = True

    # ------------------------------------------------------- flow control

    def hold(self, flow_control: bool = True) -> None:
        """A subscriber this client publishes to is over its high-water mark
        (or, not ``flow_control``, an authorization decision is awaited):
        new packets wait in ``_held`` from the next one on (the one being
        handled is routed). Acknowledgements of what the broker sends this
        client are still handled, so that two clients publishing to each
        other, or a client publishing to itself, never wait on each other."""
        if self.holders < 0:
            return  # handling what a client that has gone sent while held back
        self.holders += 1
        if self.holders == 1:
            self.held_since = self.core.loop.time()
            if flow_control:
                self.core.stats.publisher_pauses += 1
            if self._held is None:
                self._held = []

    def release(self, flow_control: bool = True) -> None:
        """One subscriber (or decision) no longer holds this client back."""
        if self.holders <= 0:
            return
        self.holders -= 1
        if self.holders == 0:
            core = self.core
            if flow_control:
                core.stats.publisher_paused_seconds += core.loop.time() - self.held_since
            if self.state == CONNECTED:
                # Not from inside the subscriber's packet handling that got here.
                core.loop.call_soon(self._resume_held)

    def _wait_for(self, decision: Pending, packet: Packet) -> None:
        """An authorizer answers later about ``packet``: it, and what the
        client sends after it, wait for the answer (acknowledgements of what
        the broker sends go on, as under flow control); then it is handled
        again, and the answer, which is kept, decides."""
        if self.holders < 0:
            return  # the client has gone: nothing was acknowledged, nothing is done
        self.hold(flow_control=False)
        assert self._held is not None
        self._held.insert(0, packet)
        decision.then(lambda _: self.release(flow_control=False))

    def _resume_held(self) -> None:
        if self.holders or self.state != CONNECTED or self._held is None:
            return
        held, self._held = self._held, None
        self.held_bytes = 0
        self.unyielded = len(held)
        if len(held) > PACKETS_PER_TURN:
            self._handle_in_turns(held)  # reading stays paused until the rest is handled
        else:
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            # Holding back again part way leaves the rest, in order, in a new _held.
            self._handle_packets(held)
        self.core.outboxes.flush()

    def _handle_in_turns(self, packets: list[Packet]) -> None:
        """Handle what is left of this turn's share (PACKETS_PER_TURN), and
        leave the rest in ``_held``, with reading paused, for the next turn:
        other clients and the loop's own work go first."""
        room = max(PACKETS_PER_TURN - (self.unyielded - len(packets)), 0)
        self.unyielded = 0
        self._handle_packets(packets[:room])
        if self.state != CONNECTED:
            return
        rest = packets[room:]
        if self.holders:
            # Flow control holds this client back now: it decides what waits.
            # The acknowledgements it lets through must still be read and
            # handled, or two clients publishing to each other would wait on
            # each other.
            self._handle_packets(rest)
            if self.reading_paused and self.held_bytes <= HELD_BYTES_LIMIT:
                self.reading_paused = False
                self.transport.resume_reading()
            return
        if self._held is None:
            self._held = rest
        else:  # what came from the layer below (TLS, WebSocket) while this waited
            self._held.extend(rest)
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self.core.loop.call_soon(self._resume_held)

    def resume_writing(self) -> None:
        self.outbox.paused = False
        if self.state == CONNECTED and self.session is not None:
            self.core.drain(self.session)
            self.core.outboxes.flush()

    def close(self, reason: int = Reason.UNSPECIFIED_ERROR, message: str = "",
              send_disconnect: bool = True, publish_will: bool = True,
              linger: bool = True) -> None:
        """Close from the server side; a 5.0 client is told why first.

        With ``linger`` (not at shutdown) the close lingers, as HTTP servers
        do it: the write side is shut after the last bytes (the DISCONNECT or
        refusing CONNACK), and what the client still sends is read and
        discarded for LINGER_SECONDS or LINGER_BYTES at most, or until it
        closes. Closing at once would make the kernel answer the client's
        next write with a reset, and a client that was still writing would
        lose the reason before it read it."""
        if self.state == CLOSED:
            return
        if not self.close_reason:
            self.close_reason = message or reason_name(reason)
        if not self.disconnect_cause:
            self.disconnect_cause = reason_name(reason)
        if send_disconnect and self.state == CONNECTED and self.version == MQTT_5:
            self.outbox.send_explained(Disconnect(reason), message)
        if not publish_will:
            self.will = None
        self._teardown()
        # Also writes what the teardown caused elsewhere (the will), since a
        # close from a timer has no read pass that would flush afterwards.
        self.core.outboxes.flush()
        transport = self.transport
        can_write_eof = getattr(transport, "can_write_eof", None)
        if linger and can_write_eof is not None and can_write_eof():
            transport.write_eof()
            self.linger_handle = self.core.loop.call_later(LINGER_SECONDS, transport.close)
            self.core.lingering.add(transport)
        else:
            transport.close()

    # ------------------------------------------------------- packets

    def _handle_packets(self, packets) -> None:
        journal = self.core.journal
        outbox = self.outbox
        for packet in packets:
            if self.state == CLOSED:
                return
            if journal is not None:
                outbox.mark = journal.changes
            ptype = packet.type
            if self._held is not None:
                if not (self.holders > 0 and ptype in _ANSWERS):
                    self._held.append(packet)
                    continue
            if ptype == PUBLISH:
                self._on_publish(packet)
            elif self.state != CONNECTED:
                auth = self.auth
                if ptype == CONNECT and self.state == NEW and auth is None:
                    self._on_connect(packet)
                elif ptype == AUTH and auth is not None and auth.under_way:
                    auth.on_auth(packet)
                elif ptype == DISCONNECT and auth is not None and auth.under_way:
                    # The client gives up its authentication (4.12).
                    self.close_reason = "client abandoned its authentication"
                    self.close(send_disconnect=False, publish_will=False)
                else:
                    # [MQTT-3.1.0-1]: the first packet must be CONNECT.
                    self.violation(Reason.PROTOCOL_ERROR, f"{PACKET_NAMES[ptype]} before CONNECT")
            else:
                handler = _HANDLERS.get(ptype)
                if handler is None:
                    self.violation(Reason.PROTOCOL_ERROR,
                                   f"unexpected {PACKET_NAMES[ptype]} from a client")
                else:
                    handler(self, packet)

    def violation(self, reason: int, why: str) -> None:
        """A protocol violation: log why and close this connection only (5.0:
        DISCONNECT with ``reason``)."""
        if self.state == CLOSED:
            return
        log.info("closing %s: %s (%s)", self.describe(), why[:MAX_LOGGED_REASON],
                 reason_name(reason))
        self.core.stats.protocol_errors += 1
        self.close(reason, why)

    def _malformed(self, exc: MalformedPacket) -> None:
        """Bytes the decoder refused: a violation, which a client still
        connecting is told in a CONNACK."""
        why = str(exc)
        if self.state == NEW and exc.connack_v3 is not None:
            # An unknown protocol level: answer in the 3.1.1 form every client reads.
            self.outbox.write(encode(Connack(exc.connack_v3), 4))
        elif self.state == NEW and exc.connect_level == MQTT_5:
            # A 5.0 CONNECT refused for its content: say why (4.13.1).
            self.outbox.version = MQTT_5
            self.outbox.send_explained(Connack(exc.reason_code), why[:MAX_LOGGED_REASON])
        self.violation(exc.reason_code, why)

    def describe(self) -> str:
        host = endpoint(self.peer.address)
        return f"client {shown(self.client_id)} ({host} on {self.peer.listener})" \
            if self.client_id else f"connection {host} on {self.peer.listener}"

    def _event(self, event: str, reason: str | None = None) -> dict[str, Any]:
        """The fields of a logged event (see ops.logs): what, where, who, why."""
        return {"event": event, "listener": self.peer.listener,
                "peer": endpoint(self.peer.address) if self.peer.address else None,
                "client_id": self.client_id or None, "username": self.username,
                "reason": reason}

    def _log_refusal(self, message: str, *args: Any) -> None:
        """Log a refused request (a PUBLISH, SUBSCRIBE filters) at most once
        per REFUSAL_LOG_INTERVAL for this connection; those in between are
        counted into the next line, so a client cannot flood the log."""
        if not log.isEnabledFor(logging.INFO):
            return
        now = self.core.loop.time()
        if now < self.refusal_log_at:
            self.refusals_unlogged += 1
            return
        self.refusal_log_at = now + REFUSAL_LOG_INTERVAL
        unlogged, self.refusals_unlogged = self.refusals_unlogged, 0
        if unlogged:
            log.info(message + " (and %d more refusals since the last such line)", *args,
                     unlogged)
        else:
            log.info(message, *args)

    # CONNECT ---------------------------------------------------------------

    def _on_connect(self, packet: Connect) -> None:
        core = self.core
        core.stats.connects_received += 1
        settings = core.settings
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self.outbox.version = packet.protocol_level
        if self.version == MQTT_5:
            props = packet.properties
            self.outbox.max_packet_size = props.get("maximum_packet_size", 0)
            self.problem_info = props.get("request_problem_information", 1) == 1
            if "authentication_data" in props and "authentication_method" not in props:
                # 3.1.2.11.10: Authentication Data without a method is a Protocol Error.
                return self._refuse(Reason.PROTOCOL_ERROR,
                                    "authentication data without an authentication method")
        elif (settings.max_keepalive is not None and settings.max_keepalive_refuse_v3
              and not 0 < packet.keepalive <= settings.max_keepalive):
            # Mosquitto's rule: a 3.1.1 client cannot be told another keep alive.
            return self._refuse(Reason.CLIENT_IDENTIFIER_NOT_VALID,
                                f"keep alive {packet.keepalive} beyond mqtt.max_keepalive "
                                f"({settings.max_keepalive})")
        client_id = packet.client_id
        assigned = False
        if not client_id:
            if self.version == 3 or (self.version == 4 and not packet.clean_start):
                # [MQTT-3.1.3-8]: a 3.1.1 client must ask for a clean session to
                # get an identifier; 3.1 requires one.
                return self._refuse(Reason.CLIENT_IDENTIFIER_NOT_VALID, "empty client id")
            client_id = core.assign_client_id()
            assigned = True
        elif len(client_id) > settings.max_clientid_len:
            return self._refuse(Reason.CLIENT_IDENTIFIER_NOT_VALID,
                                f"client id longer than {settings.max_clientid_len}")
        elif _CONTROL_CHARACTERS.search(client_id):
            # They would reach logs, templates and rules ("dashboard\n" passes
            # a "^dashboard$" regular expression).
            return self._refuse(Reason.CLIENT_IDENTIFIER_NOT_VALID,
                                "client id with control characters")
        if packet.username is not None and _CONTROL_CHARACTERS.search(packet.username):
            return self._refuse(Reason.BAD_USER_NAME_OR_PASSWORD,
                                "username with control characters")
        self.client_id = client_id
        self.username = packet.username
        if self._too_many_user_properties(packet.properties) or (
                packet.will is not None and self._too_many_user_properties(packet.will.properties)):
            return self._refuse(Reason.QUOTA_EXCEEDED, f"more than {settings.max_user_properties} "
                                "user properties (mqtt.max_user_properties)")
        will = packet.will
        if will is not None:
            try:
                validate_topic_name(will.topic, settings.max_topic_levels)
            except InvalidTopic as exc:
                return self._refuse(Reason.TOPIC_NAME_INVALID, f"will topic: {exc}")
            if will.qos > settings.max_qos_allowed:  # [MQTT-3.2.2-12]
                return self._refuse(Reason.QOS_NOT_SUPPORTED, f"will QoS {will.qos}")
            if will.retain and not settings.retain_available:  # [MQTT-3.2.2-13]
                return self._refuse(Reason.RETAIN_NOT_SUPPORTED, "retained will")
        request = AuthRequest(client_id=client_id, username=packet.username,
                              password=packet.password, peer=self.peer,
                              protocol_level=self.version, properties=packet.properties)
        if core.identity is not None:
            settled = core.identity.apply(request)
            if isinstance(settled, AuthResult):
                return self._refuse(settled.reason_code, "identity refused")
            # Assigned Client Identifier stays for clients that sent none
            # (3.2.2.3.7): clients that sent one may take it as an error.
            request = settled
            self.client_id = client_id = request.client_id
            self.username = request.username
        username = request.username
        if settings.use_username_as_clientid and username:
            if len(username) > settings.max_clientid_len:
                return self._refuse(Reason.CLIENT_IDENTIFIER_NOT_VALID,
                                    f"username (the client id) longer than {settings.max_clientid_len}")
            request = attrs.evolve(request, client_id=username)
            self.client_id = client_id = username
        method_name = packet.properties.get("authentication_method") if self.version == MQTT_5 else None
        if method_name is not None:
            method = core.auth_methods.get(method_name)
            if method is None:
                return self._refuse(Reason.BAD_AUTHENTICATION_METHOD,
                                    f"unknown authentication method {method_name[:100]!r}")
            admit = getattr(core.authenticator, "admit_method", None)
            refusal = admit(request, method_name) if admit is not None else None
            if refusal is not None:
                return self._refuse(refusal.reason_code,
                                    f"authentication method {method_name[:100]!r} refused")
            self.auth = EnhancedAuth(self, method_name)
            # The exchange must finish within the time a CONNECT is given.
            self._idle_handle = core.loop.call_later(settings.idle_timeout, self._idle_expired)
            return self.auth.begin(method, packet, request, assigned)
        result = core.authenticator.authenticate(request)
        if inspect.isawaitable(result):
            self.state = AUTHENTICATING
            self._held = []
            self.transport.pause_reading()
            core.spawn(self._finish_connect_async(result, packet, assigned))
            return
        self.finish_connect(result, packet, assigned)

    async def _finish_connect_async(self, pending, packet: Connect, assigned: bool,
                                    fetching_for: AuthResult | None = None,
                                    auth_props: dict[str, Any] | None = None) -> None:
        """Finish CONNECT once ``pending`` is answered: an authentication
        (its AuthResult), or (``fetching_for``: the client's AuthResult) the
        cluster's search for its session (whether it is refused)."""
        try:
            answer = await pending
        except Exception:
            log.exception("%s of %s failed", "authentication" if fetching_for is None
                          else "finding the session", self.describe())
            answer = (AuthResult(Reason.SERVER_UNAVAILABLE) if fetching_for is None
                      else Reason.SERVER_UNAVAILABLE)
        if self.state == CLOSED:
            return
        self.state = NEW
        held, self._held = self._held, None
        if fetching_for is None:
            self.finish_connect(answer, packet, assigned)
        elif answer == Reason.NOT_AUTHORIZED:
            self._refuse(Reason.NOT_AUTHORIZED,
                         "client id in use by a session of another identity (on another node)")
        elif answer:
            self._refuse(answer, "its session is on a node out of reach for the moment")
        else:
            self.finish_connect(fetching_for, packet, assigned, auth_props, fetched=True)
        if self.state == CONNECTED:
            self.transport.resume_reading()
            self._handle_packets(held or ())
        self.core.outboxes.flush()

    def _refuse(self, reason: int, why: str) -> None:
        log.info("refusing %s: %s (%s)", self.describe(), why, reason_name(reason),
                 extra=self._event("refuse", f"{why} ({reason_name(reason)})"))
        stats = self.core.stats
        stats.connections_refused += 1
        stats.connacks[reason] = stats.connacks.get(reason, 0) + 1
        if self.version == MQTT_5:
            self.outbox.send_explained(Connack(reason), why)
        else:
            self.outbox.send(Connack(CONNACK_V3_CODES.get(reason, 3)))
        self.close(reason, why, send_disconnect=False, publish_will=False)

    def finish_connect(self, result: AuthResult, packet: Connect, assigned: bool,
                       auth_props: dict[str, Any] | None = None, fetched: bool = False) -> None:
        """Answer CONNECT once authentication has decided (``auth_props``:
        the last step of an enhanced authentication, for the CONNACK;
        ``fetched``: the cluster was asked for the session already)."""
        if self._idle_handle is not None:  # the time an exchange was given
            self._idle_handle.cancel()
            self._idle_handle = None
        if not result.allowed:
            return self._refuse(result.reason_code, "authentication failed")
        core = self.core
        settings = core.settings
        self.superuser = result.superuser
        if result.identity is not None:
            self.username = result.identity
        props = packet.properties
        if self.version == MQTT_5:
            # mqtt.session_expiry_interval caps what the client asks for (even "never").
            expiry = min(props.get("session_expiry_interval", 0),
                         int(settings.session_expiry_interval))
            outbox = self.outbox
            outbox.send_window = min(settings.max_inflight, props.get("receive_maximum", _MAX_U16))
            outbox.alias_max = min(settings.max_topic_alias, props.get("topic_alias_maximum", 0))
            if outbox.alias_max:
                outbox.aliases = {}
        else:
            expiry = 0 if packet.clean_start else int(settings.session_expiry_interval)
        self.client_info = ClientInfo(client_id=self.client_id, username=self.username,
                                      peer=self.peer, superuser=self.superuser)
        if not (fetched or packet.clean_start or core.cluster is None
                or self.client_id in core.sessions):
            # A session to resume that is not here may be on another node.
            pending = core.cluster.fetch_session(self.client_info)
            if pending is not None:
                self.state = AUTHENTICATING
                self._held = []
                self.transport.pause_reading()
                core.spawn(self._finish_connect_async(pending, packet, assigned, result,
                                                      auth_props))
                return
        if core.session_refused(self.client_info):
            return self._refuse(Reason.NOT_AUTHORIZED,
                                "client id in use by a session of another identity")
        session, present = core.open_session(self, packet.clean_start, expiry, self.client_info)
        self.session = session
        if core.access is not None:
            self.access_cache = core.access.new_cache()
        self.will = packet.will
        if packet.will is not None:
            # Kept while the client is connected: a crash of the broker ends
            # the connection too, and the will is published after a restart
            # (or by another node of a cluster).
            self.will_stored = core.keep_will(self.client_info, packet.will, None)
        self.keepalive = packet.keepalive
        self.state = CONNECTED
        self.connected_at = time.time()
        self.decoder.max_packet_size = settings.max_packet_size
        connack_props: dict[str, Any] = dict(auth_props) if auth_props else {}
        if self.version == MQTT_5:
            if assigned:
                connack_props["assigned_client_identifier"] = self.client_id
            if expiry != props.get("session_expiry_interval", 0):
                connack_props["session_expiry_interval"] = expiry
            connack_props["receive_maximum"] = settings.max_awaiting_rel
            connack_props["maximum_packet_size"] = settings.max_packet_size
            # Absent means "supported" for these; say so only when they are not (3.2.2.3).
            if settings.max_qos_allowed < 2:
                connack_props["maximum_qos"] = settings.max_qos_allowed
            if not settings.retain_available:
                connack_props["retain_available"] = 0
            if not settings.wildcard_subscription:
                connack_props["wildcard_subscription_available"] = 0
            if not settings.shared_subscription:
                connack_props["shared_subscription_available"] = 0
            if settings.max_topic_alias:
                connack_props["topic_alias_maximum"] = settings.max_topic_alias
            if settings.server_keepalive is not None:
                # [MQTT-3.2.2-21]: the client must use the server's keep alive.
                self.keepalive = settings.server_keepalive
                connack_props["server_keep_alive"] = settings.server_keepalive
            elif settings.max_keepalive is not None and not 0 < self.keepalive <= settings.max_keepalive:
                # More than the cap (or 0, never): the cap, as Server Keep Alive.
                self.keepalive = settings.max_keepalive
                connack_props["server_keep_alive"] = settings.max_keepalive
        elif settings.max_keepalive is not None and not 0 < self.keepalive <= settings.max_keepalive:
            log.warning("%s: keep alive %d beyond mqtt.max_keepalive (%d): a 3.1.1 client "
                        "cannot be told otherwise; served with its own "
                        "(mqtt.max_keepalive_refuse_v3 refuses it)", self.describe(),
                        self.keepalive, settings.max_keepalive)
        self.outbox.send(Connack(0, present, connack_props))
        connacks = core.stats.connacks
        connacks[0] = connacks.get(0, 0) + 1
        if self.keepalive:
            core.keepalives.add(self, core.loop.time() + self.keepalive
                                * settings.keepalive_multiplier)
        log.info("%s connected (protocol %d, clean start %s, session present %s)",
                 self.describe(), self.version, packet.clean_start, present,
                 extra=self._event("connect"))
        core.resume_session(session)

    # PUBLISH ---------------------------------------------------------------

    def _on_publish(self, packet: Publish) -> None:
        if self.state != CONNECTED:
            return self.violation(Reason.PROTOCOL_ERROR, "PUBLISH before CONNECT")
        core = self.core
        stats = core.stats
        stats.received_by_qos[packet.qos] += 1
        stats.publish_bytes_received += len(packet.payload)
        props = packet.properties
        if props:
            if self._too_many_user_properties(props):
                return self.violation(
                    Reason.QUOTA_EXCEEDED, f"more than {core.settings.max_user_properties} "
                    "user properties (mqtt.max_user_properties)")
            if "subscription_identifier" in props:
                # [MQTT-3.3.4-6]: only the server sends subscription identifiers.
                return self.violation(Reason.PROTOCOL_ERROR,
                                      "PUBLISH from a client with a subscription identifier")
            if props.get("payload_format_indicator") == 1:
                try:
                    packet.payload.decode("utf-8")
                except UnicodeDecodeError:
                    return self.violation(Reason.PAYLOAD_FORMAT_INVALID,
                                          "payload is not UTF-8 as its format indicator says")
        topic: str | None  # None after a bad topic alias, which has closed the connection
        topic = packet.topic
        if props and "topic_alias" in props:
            topic, props = self._resolve_alias(topic, props)
            if topic is None:
                return
        if core.publish_restricted and self._refuse_publish(packet):
            return
        if topic.count("/") >= core.settings.max_topic_levels:
            return self.violation(
                Reason.TOPIC_NAME_INVALID,
                f"topic with more than {core.settings.max_topic_levels} levels")
        # Where qos is 1 or 2 below, packet.packet_id is an int (the decoder
        # refuses such a PUBLISH without one); the type checker is told so by
        # ignores, not by checks that the hot path would pay for.
        qos = packet.qos
        if qos:
            # Receive Maximum (3.3.4): QoS 1 is acknowledged at once, so what
            # counts against the quota are QoS 2 messages awaiting PUBREL.
            session = self.session
            awaiting = session.awaiting_rel
            if qos == 2:
                if awaiting is None:
                    awaiting = session.awaiting_rel = {}
                if packet.packet_id in awaiting:
                    # A resend of a message already accepted: acknowledge, don't
                    # route again; the acceptance may not have committed yet.
                    return self._accepted_again(packet, topic, props,
                                                awaiting[packet.packet_id])
            if awaiting and len(awaiting) >= core.settings.max_awaiting_rel:
                return self.violation(
                    Reason.RECEIVE_MAXIMUM_EXCEEDED, f"more than {core.settings.max_awaiting_rel} "
                    "unacknowledged QoS 1 and 2 messages (Receive Maximum)")
        if topic.startswith("$SYS/"):
            # The broker's own figures: no client writes them (as Mosquitto).
            return self._publish_denied(packet, topic)
        access = core.access
        if access is not None:
            allowed = access.permits(
                self.client_info,  # type: ignore[arg-type]  # set before the state is CONNECTED
                self.access_cache, PUBLISH_ACTION, topic, qos, packet.retain)
            if allowed is not True:
                if allowed is False:
                    return self._publish_denied(packet, topic)
                if self.holders < 0:
                    # Sent before the client went (its held packets are being
                    # handled): routed once allowed, as it would have been.
                    return allowed.then(partial(self._publish_after_close, packet, topic, props))
                # Handled again once decided, and counted then.
                stats.received_by_qos[qos] -= 1
                stats.publish_bytes_received -= len(packet.payload)
                return self._wait_for(allowed, packet)
        stream_id = None
        if qos == 2:
            if core.cluster is not None:
                stream_id = core.cluster.new_stream_id()
            self._awaiting_release(packet.packet_id, stream_id)  # type: ignore[arg-type]
        message = Message(topic, packet.payload, qos, packet.retain, props)
        if props:
            message.stamp_expiry(core.loop.time())
        delivered = core.route(message, self.session)
        stored = None
        if core.cluster is not None:
            # A QoS 1/2 message's acknowledgement waits for the cluster's
            # stream. A QoS 2 message of a stored session goes there once its
            # id is committed with the session: a resend after a crash then
            # finds the id and is stored under it again, never twice.
            stored = core.cluster.forward(message, stream_id,
                                          stream_id is not None and bool(self.session.store_id))
            delivered = 1  # the other nodes' subscribers are not counted here
        if packet.retain:
            core.retain(message)
        if qos == 1:
            self.outbox.puback(packet.packet_id,  # type: ignore[arg-type]
                               0 if delivered else Reason.NO_MATCHING_SUBSCRIBERS, False, stored)
        elif qos:
            self.outbox.pubrec(packet.packet_id,  # type: ignore[arg-type]
                               0 if delivered else Reason.NO_MATCHING_SUBSCRIBERS, False, stored)

    def _publish_after_close(self, packet: Publish, topic: str, props: Any,
                             allowed: bool) -> None:
        """A PUBLISH its client sent before it went, decided later: routed
        if allowed (there is no one left to acknowledge it to)."""
        if not allowed:
            self.core.stats.publish_denied += 1
            return
        self.core.publish(topic, packet.payload, packet.qos, packet.retain, props,
                          sender=self.session)

    def _too_many_user_properties(self, props) -> bool:
        return len(props.get("user_property", ())) > self.core.settings.max_user_properties

    def _publish_denied(self, packet: Publish, topic: str) -> None:
        """A PUBLISH the authorization chain denies: refused (5.0: reason
        0x87) and not routed, or the client disconnected (deny_action)."""
        core = self.core
        core.stats.publish_denied += 1
        self._log_refusal("%s: not authorized to publish to %s", self.describe(), shown(topic))
        if core.access is not None and core.access.disconnect_on_deny:
            return self.close(Reason.NOT_AUTHORIZED, f"not authorized to publish to {shown(topic)}")
        qos = packet.qos
        if not qos:
            return  # nothing to answer
        packet_id = packet.packet_id
        assert packet_id is not None  # a QoS 1/2 PUBLISH has one (the decoder checks it)
        if self.version == MQTT_5:
            answer = self.outbox.puback if qos == 1 else self.outbox.pubrec
            answer(packet_id, Reason.NOT_AUTHORIZED)
        elif qos == 1:
            self.outbox.puback(packet_id)  # 3.1.1 has no refusal: drop, but acknowledge
        elif qos == 2:
            self._awaiting_release(packet_id)  # so that PUBREL gets PUBCOMP
            self.outbox.pubrec(packet_id)

    def _awaiting_release(self, packet_id: int, stream_id: str | None = None) -> None:
        session = self.session
        session.awaiting_rel[packet_id] = stream_id  # type: ignore[index]  # _on_publish made it
        if session.store_id:
            # Kept across a restart, so that a resend after it is known for
            # one and not delivered twice ([MQTT-4.3.3-9]).
            assert self.core.journal is not None  # a stored session implies a journal
            self.core.journal.awaiting_saved(session, packet_id, stream_id)

    def _accepted_again(self, packet: Publish, topic: str, props: Any,
                        stream_id: str | None) -> None:
        """A QoS 2 PUBLISH resent with a packet id still awaiting PUBREL. In
        a cluster the stream may not have the message yet (its node died
        before it went, the session moved since): it is stored again under
        the id it had, which the stream drops if it has it; its subscribers
        here had it the first time."""
        stored = None
        core = self.core
        if stream_id is not None and core.cluster is not None:
            message = Message(topic, packet.payload, 2, packet.retain, props)
            if props:
                message.stamp_expiry(core.loop.time())
            stored = core.cluster.store_again(message, stream_id)
        self.outbox.pubrec(packet.packet_id, after_commit=True,  # type: ignore[arg-type]
                           stored=stored)

    def _refuse_publish(self, packet: Publish) -> bool:
        """Close for a PUBLISH beyond the announced Maximum QoS or Retain Available."""
        settings = self.core.settings
        if packet.qos > settings.max_qos_allowed:  # [MQTT-3.2.2-11]
            self.violation(Reason.QOS_NOT_SUPPORTED, f"PUBLISH with QoS {packet.qos} above "
                           f"the maximum of {settings.max_qos_allowed}")
            return True
        if packet.retain and not settings.retain_available:  # [MQTT-3.2.2-14]
            self.violation(Reason.RETAIN_NOT_SUPPORTED,
                           "retained PUBLISH while retain is not available")
            return True
        return False

    def _resolve_alias(self, topic: str | None,
                       props: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
        """Apply an inbound topic alias (3.3.2.3.4); the alias is not forwarded.

        Returns (None, _) after closing the connection for a bad alias.
        """
        alias = props["topic_alias"]
        maximum = self.core.settings.max_topic_alias
        if alias > maximum:
            self.violation(Reason.TOPIC_ALIAS_INVALID,
                           f"topic alias {alias} above the maximum of {maximum}")
            return None, props
        aliases = self.topic_aliases
        if topic:
            if aliases is None:
                aliases = self.topic_aliases = {}
            aliases[alias] = topic
        else:
            topic = aliases.get(alias) if aliases else None
            if topic is None:
                self.violation(Reason.PROTOCOL_ERROR, f"topic alias {alias} was never set")
                return None, props
        return topic, {k: v for k, v in props.items() if k != "topic_alias"}

    # acknowledgements ------------------------------------------------------

    def _on_puback(self, packet: Puback) -> None:
        self.core.acknowledge(self.session, packet.packet_id, PUBACK)

    def _on_pubrec(self, packet: Pubrec) -> None:
        session = self.session
        entry = session.inflight.get(packet.packet_id) if session.inflight else None
        if entry is None or entry.qos != 2:
            self.outbox.pubrel(packet.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND)
            return
        if packet.reason_code >= 0x80:
            # [MQTT-4.4.0-2]: a PUBREC with a failure code acknowledges the message.
            self.core.acknowledge(session, packet.packet_id, PUBREC)
            return
        entry.released = True
        if session.store_id:
            # PUBREL goes once this is stored: after a restart the message must
            # not be sent again as a PUBLISH the client already released.
            assert self.core.journal is not None  # a stored session implies a journal
            self.core.journal.inflight_saved(session, packet.packet_id, entry, False)
        if self.core.cluster is not None and session.expiry_interval:
            # Once the session's copy knows it: PUBREL, not PUBLISH, after a failover.
            self.core.cluster.after_copy(session, partial(self._pubrel_held, packet.packet_id))
        else:
            self.outbox.pubrel(packet.packet_id)

    def _pubrel_held(self, packet_id: int) -> None:
        if not self.outbox.closed:
            self.outbox.pubrel(packet_id, after_commit=True)

    def _on_pubrel(self, packet: Pubrel) -> None:
        session = self.session
        awaiting = session.awaiting_rel
        if awaiting and packet.packet_id in awaiting:
            del awaiting[packet.packet_id]
            if session.store_id:
                # PUBCOMP goes once this is stored: the client may reuse the
                # packet id then, and a restart must not take it for a resend.
                assert self.core.journal is not None  # a stored session implies a journal
                self.core.journal.awaiting_deleted(session, packet.packet_id)
            self.outbox.pubcomp(packet.packet_id)
        else:
            self.outbox.pubcomp(packet.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND)

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        self.core.acknowledge(self.session, packet.packet_id, PUBCOMP)

    # SUBSCRIBE / UNSUBSCRIBE -----------------------------------------------

    def _on_subscribe(self, packet: Subscribe) -> None:
        core = self.core
        assert self.client_info is not None  # set before the state is CONNECTED
        codes = []
        identifier = packet.properties.get("subscription_identifier")
        granted = []
        settings = core.settings
        refused = 0
        first = ""
        # Every filter is judged before any is subscribed: a decision that
        # comes later makes the whole packet wait, and it is judged again.
        judged = []
        waiting = None
        for sub in packet.subscriptions:
            refusal, why = self._refuse_filter(sub.filter)
            if refusal == Reason.TOPIC_FILTER_INVALID and self.version != MQTT_5:
                # [MQTT-4.8.0-1]: a filter malformed by 3.1.1's own rules is a
                # protocol violation ([MQTT-4.7.1-2], [MQTT-4.7.1-3],
                # [MQTT-4.7.3-1]); 0x80 stays for filters refused by policy
                # (a $share form 3.1.1 does not know, ACL, quotas).
                try:
                    validate_filter(sub.filter, settings.max_topic_levels)
                except InvalidTopic as exc:
                    return self.violation(refusal,
                                          f"invalid topic filter {shown(sub.filter)}: {exc}")
            if not refusal and sub.no_local and sub.filter.startswith("$share/"):
                # [MQTT-3.8.3-4]
                return self.violation(Reason.PROTOCOL_ERROR,
                                      f"No Local on the shared subscription {sub.filter!r}")
            if not refusal and core.access is not None:
                allowed = core.access.permits(self.client_info, self.access_cache,
                                              SUBSCRIBE_ACTION, shared_inner(sub.filter), sub.qos)
                if allowed is False:
                    refusal, why = Reason.NOT_AUTHORIZED, "not authorized"
                    if core.access.disconnect_on_deny:
                        core.stats.subscribe_denied += 1
                        return self.close(Reason.NOT_AUTHORIZED,
                                          f"not authorized to subscribe to {shown(sub.filter)}")
                elif allowed is not True:
                    waiting = allowed
            judged.append((sub, refusal, why))
        if waiting is not None:
            return self._wait_for(waiting, packet)
        for sub, refusal, why in judged:
            if refusal == Reason.NOT_AUTHORIZED:
                core.stats.subscribe_denied += 1
            if not refusal and settings.max_subscriptions is not None:
                subscriptions = self.session.subscriptions
                if (sub.filter not in subscriptions
                        and len(subscriptions) >= settings.max_subscriptions):
                    refusal = Reason.QUOTA_EXCEEDED
                    why = f"already {len(subscriptions)} subscriptions (mqtt.max_subscriptions)"
            if refusal:
                codes.append(refusal if self.version == MQTT_5 else 0x80)
                if not refused:
                    first = f"{shown(sub.filter)}: {why}"
                refused += 1
                continue
            if sub.qos > settings.max_qos_allowed:
                # Granted at the broker's maximum, as the SUBACK tells ([MQTT-3.9.3-2]).
                sub = attrs.evolve(sub, qos=settings.max_qos_allowed)
            existed = core.subscribe(self.session, sub, identifier)
            codes.append(sub.qos)
            granted.append((sub, existed))
        explanation = ""
        if refused:
            # One line, and one reason string, for the whole packet.
            explanation = first if refused == 1 else f"{first}; and {refused - 1} more filters"
            self._log_refusal("%s: refusing %d of %d filters: %s", self.describe(), refused,
                              len(packet.subscriptions), explanation)
        suback = Suback(packet.packet_id, codes)
        outbox = self.outbox
        outbox.write_stored(outbox.explained(suback, explanation if self.problem_info else ""))
        # Retained messages follow the SUBACK, unless the SUBACK waits for the
        # durable store: a server may send them first (3.8.4).
        for sub, existed in granted:
            core.send_retained(self.session, sub, identifier, existed)

    def _refuse_filter(self, topic_filter: str) -> tuple[int, str]:
        """The 5.0 reason a filter is refused with and why, or (0, "") when it
        may subscribe."""
        settings = self.core.settings
        try:
            shared = split_shared(topic_filter)
            validate_filter(shared[1] if shared else topic_filter, settings.max_topic_levels)
        except InvalidTopic as exc:
            reason, why = Reason.TOPIC_FILTER_INVALID, str(exc)
        else:
            if shared and not settings.shared_subscription:
                reason, why = Reason.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, "shared subscriptions are turned off"
            elif not settings.wildcard_subscription and ("+" in topic_filter or "#" in topic_filter):
                reason, why = Reason.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED, "wildcards are turned off"
            else:
                return 0, ""
        return reason, why

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        codes: list[int] = []
        for topic_filter in packet.filters:
            removed = self.core.unsubscribe(self.session, topic_filter)
            codes.append(Reason.SUCCESS if removed else Reason.NO_SUBSCRIPTION_EXISTED)
        unsuback = Unsuback(packet.packet_id, codes if self.version == MQTT_5 else [])
        self.outbox.write_stored(encode(unsuback, self.version))

    # PINGREQ / DISCONNECT --------------------------------------------------

    def _on_pingreq(self, packet) -> None:
        self.outbox.write(PINGRESP_BYTES)

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.session
        new_expiry = packet.properties.get("session_expiry_interval")
        if new_expiry is not None:
            if session.expiry_interval == 0 and new_expiry != 0:
                # [MQTT-3.14.2-2]
                return self.violation(
                    Reason.PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 on CONNECT")
            session.expiry_interval = min(new_expiry, int(self.core.settings.session_expiry_interval))
        if packet.reason_code != Reason.DISCONNECT_WITH_WILL:
            self.will = None  # [MQTT-3.14.4-3]
        self.close_reason = "client disconnected"
        self.disconnect_cause = "client disconnect"
        self.close(send_disconnect=False)

    # AUTH (enhanced authentication, 4.12) ---------------------------------

    def _on_auth(self, packet: Auth) -> None:
        if self.auth is None:
            return self.violation(
                Reason.PROTOCOL_ERROR,
                "AUTH from a client that connected without an authentication method")
        self.auth.on_auth(packet)

    # timers ----------------------------------------------------------------

    def _idle_expired(self) -> None:
        self._idle_handle = None
        if self.state == NEW:
            log.info("closing %s: no CONNECT within %ss", self.describe(),
                     self.core.settings.idle_timeout)
            self.close(message="no CONNECT in time")

    def _keepalive_check(self) -> None:
        limit = self.keepalive * self.core.settings.keepalive_multiplier
        if self.reading_paused:
            self.last_seen = self.core.loop.time()  # the silence is the broker's doing
        silent = self.core.loop.time() - self.last_seen
        if silent >= limit:
            log.info("closing %s: keep alive timeout (%ss silent)", self.describe(), round(silent, 1))
            self.close(Reason.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
        else:
            self.core.keepalives.add(self, self.last_seen + limit)

    # teardown --------------------------------------------------------------

    def _teardown(self) -> None:
        """Leave the broker: cancel timers, publish the will, park or end the session."""
        if self.state == CLOSED:
            return
        was_connected = self.state == CONNECTED
        self.state = CLOSED
        self.outbox.closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self.keepalive_bucket:
            self.core.keepalives.remove(self)
        core = self.core
        core.detach(self)
        if was_connected:
            log.info("%s disconnected: %s", self.describe(), self.close_reason,
                     extra=self._event("disconnect", self.close_reason))
            disconnects = core.stats.disconnects
            cause = self.disconnect_cause or "unspecified"
            disconnects[cause] = disconnects.get(cause, 0) + 1
            will, self.will = self.will, None
            core.end_connection(self, will)


#: What a client held back by flow control still gets handled: the answers
#: to what the broker sends it, and keep-alive.
_ANSWERS = frozenset((PUBACK, PUBREC, PUBCOMP, PINGREQ))

#: Packet type -> its handler, which takes a packet of that type.
_HANDLERS: dict[int, Callable[[Connection, Any], None]] = {
    PUBACK: Connection._on_puback,
    PUBREC: Connection._on_pubrec,
    PUBREL: Connection._on_pubrel,
    PUBCOMP: Connection._on_pubcomp,
    SUBSCRIBE: Connection._on_subscribe,
    UNSUBSCRIBE: Connection._on_unsubscribe,
    PINGREQ: Connection._on_pingreq,
    DISCONNECT: Connection._on_disconnect,
    AUTH: Connection._on_auth,
    CONNECT: lambda self, packet: self.violation(  # [MQTT-3.1.0-2]
        Reason.PROTOCOL_ERROR, "second CONNECT"),
}
