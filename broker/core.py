"""The broker core: sessions, takeover, routing a publish to its subscribers.

Routing is the hot path. A publish is matched through the trie (cached per
topic), and each subscriber's bytes go into its session's outbox
(``broker.outbox``); ``outboxes.flush`` then writes every touched outbox once.
Callers that enter the core from outside a read (timers, the embedding API)
flush themselves. The core sees a connection only as a ``Client``
(broker.ports): to close it, to hold it back, and to ask who it is.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from functools import partial
from typing import Any, Callable, Coroutine, Mapping


from .codec import MQTT_5, Subscription, Will
from .logtext import shown
from .message import Message, retained_form
from .keepalive import KeepAliveWheel
from .outbox import Outbox, Outboxes
from .access import AccessControl, Authorizer, Pending
from .ports import (
    PUBLISH_ACTION, SUBSCRIBE_ACTION, AuthMethod, Authenticator, CertificateFacts, Client,
    ClientInfo, ClusterBus, IdentityPolicy, Observer,
)
from .ownership import owner_of, same_owner
from .store import Journal
from .packet_types import PUBACK, PUBCOMP
from .properties import NO_PROPERTIES, Reason
from .retained import RetainedStore
from .sessions import NEVER_EXPIRES, Inflight, QueuedMessage, Session, SubscriptionEntry
from .settings import MqttSettings
from .shared import SharedGroup, split_shared
from .stats import Stats
from .topics import SubscriptionTrie, validate_topic_name

log = logging.getLogger("bastionmq.core")

#: Where a topic's messages go, one per subscribed session, as the trie
#: caches them per topic: (session, the highest QoS its matching
#: subscriptions granted, no local, retain as published, subscription ids).
#: Unpacked whole at each delivery, never read by index; a plain tuple
#: because route() unpacks one per subscriber and message, and unpacking a
#: NamedTuple costs 2.5 times as much (no specialisation for subclasses).
Route = tuple[Session, int, bool, bool, tuple[int, ...]]


SYS_PREFIX = "$SYS/"

#: Seconds between two log lines about slow subscribers, at the least.
SLOW_LOG_INTERVAL = 10.0


def _merge_routes(found: list[tuple[Session, SubscriptionEntry]]) -> list[Route]:
    """One route per session: overlapping subscriptions deliver once, at the
    highest granted QoS, with every subscription identifier ([MQTT-3.3.4-3/5])."""
    routes: dict[Session, list] = {}
    for session, entry in found:
        options = entry.options
        ids = (entry.identifier,) if entry.identifier else ()
        route = routes.get(session)
        if route is None:
            routes[session] = [session, options.qos, options.no_local,
                               options.retain_as_published, ids]
        else:
            route[1] = max(route[1], options.qos)
            route[2] = route[2] and options.no_local
            route[3] = route[3] or options.retain_as_published
            route[4] = tuple(sorted(set(route[4] + ids)))
    return [(session, qos, no_local, as_published, ids)
            for session, qos, no_local, as_published, ids in routes.values()]


class BrokerCore:
    def __init__(self, settings: MqttSettings, authenticator: Authenticator,
                 loop: asyncio.AbstractEventLoop,
                 auth_methods: Mapping[str, AuthMethod] | None = None,
                 identity: IdentityPolicy | None = None,
                 authorizer: Authorizer | None = None) -> None:
        #: Authorization with its per-client cache; None lets everything through.
        self.access = AccessControl(authorizer, loop) if authorizer is not None else None
        #: Applied to every CONNECT before authentication, when given.
        self.identity = identity
        #: Enhanced authentication methods by the name clients give (4.12).
        self.auth_methods: Mapping[str, AuthMethod] = dict(auth_methods or {})
        self.authenticator = authenticator
        self.loop = loop
        self.stats = Stats()
        self.sessions: dict[str, Session] = {}
        #: Every open connection, CONNECT received or not.
        self.connections: set[Client] = set()
        #: Transports of connections closed with a lingering close, until
        #: the client closes or the linger ends (see Connection.close).
        self.lingering: set[Any] = set()
        self.trie: SubscriptionTrie[Session] = SubscriptionTrie(merge=self._routes)
        #: Routes of the topic being matched whose read decision is under way
        #: (an authorizer that answers later), as (Pending, route): ``route``
        #: makes the message wait for each (see _routes).
        self.gated: list[tuple[Pending, Route]] | None = None
        self.retained: RetainedStore[Message] = RetainedStore()
        #: Shared subscriptions: (share name, filter) -> group, and a trie of
        #: the groups by filter (its subscribers are the groups themselves).
        self.groups: dict[tuple[str, str], SharedGroup] = {}
        self.shared_trie: SubscriptionTrie[SharedGroup] = SubscriptionTrie()
        #: The write side of every connection (see broker.outbox).
        self.outboxes = Outboxes(self.stats, loop.time)
        #: Every client's keep-alive, on one timer.
        self.keepalives = KeepAliveWheel(loop)
        self.apply_settings(settings)
        self._slow_logged_at = -SLOW_LOG_INTERVAL
        self._tasks: set[asyncio.Task] = set()
        #: Where changes to durable state are recorded; None keeps state in
        #: memory only. Sessions are durable when ``store_id`` is set. Set it
        #: with use_journal only: the outboxes hold acknowledgements for it too.
        self.journal: Journal | None = None
        #: Reads a stored client certificate (DER) again for restored
        #: sessions and wills; the listeners' parser, set by the application.
        self.certificate_parser: Callable[[bytes], CertificateFacts] | None = None
        #: Told of each message routed, each client connected and gone (an
        #: embedding application's hooks, bastionmq.hooks); None, the usual
        #: case, costs one attribute check per message routed.
        self.observer: Observer | None = None
        #: The other nodes of a cluster (cluster.bus): told of the messages
        #: published here, the retained messages set here, and the filters
        #: this node's subscribers take and leave. None: a node alone.
        self.cluster: ClusterBus | None = None

    def apply_settings(self, settings: MqttSettings) -> None:
        """Use ``settings`` from now on (a reload): connections made from
        now on take them; those open keep what they agreed at CONNECT."""
        self.settings = settings
        #: Whether a PUBLISH must be checked against QoS or retain limits; with
        #: the defaults the hot path skips both checks.
        self.publish_restricted = settings.max_qos_allowed < 2 or not settings.retain_available
        #: Publisher flow control: an online subscriber's queue length that
        #: holds its publishers back, and the length that lets them go.
        high = settings.mqueue_high_watermark
        if settings.max_mqueue_len:
            high = max(1, min(high, settings.max_mqueue_len // 2))
        self.flow_high = high
        self.flow_low = high // 4

    # ------------------------------------------------------- connections

    def use_journal(self, journal: Journal) -> None:
        """Record changes to durable state in ``journal`` from now on."""
        self.journal = self.outboxes.journal = journal

    def detach(self, connection: Client) -> None:
        self.connections.discard(connection)

    def assign_client_id(self) -> str:
        while True:
            client_id = "bastionmq-" + secrets.token_hex(8)
            if client_id not in self.sessions:
                return client_id

    def spawn(self, coroutine: Coroutine) -> asyncio.Task:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------- sessions

    def session_refused(self, client: ClientInfo) -> bool:
        """Whether ``client`` is refused the session of its client id because
        that session belongs to another identity (another username, or
        another verified certificate): it may neither resume it, nor take
        over its connection, nor wipe it with a clean start. With
        ``mqtt.session_takeover_by_other_identity = clean`` it is not
        refused: the other identity's session ends and it gets a new one."""
        session = self.sessions.get(client.client_id)
        if session is None or session.client is None or same_owner(
                session.owner, session.client.username, client):
            return False
        if self.settings.session_takeover_by_other_identity == "clean":
            log.info("client id %s: the session of another identity ends for a new one",
                     shown(client.client_id))
            if session.connection is not None:
                session.connection.close(Reason.SESSION_TAKEN_OVER, "session taken over")
            session = self.sessions.get(client.client_id)
            if session is not None:
                self.end_session(session)
            return False
        return True

    def open_session(self, connection: Client, clean_start: bool,
                     expiry: int, client: ClientInfo) -> tuple[Session, bool]:
        """Attach ``connection`` to its session; returns (session, session present)."""
        client_id = connection.client_id
        session = self.sessions.get(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            log.info("client %s connected again from %s: closing its previous connection",
                     shown(client_id), connection.peer.address)
            # [MQTT-3.1.4-3]: the existing connection goes (5.0: DISCONNECT 0x8E).
            old.close(Reason.SESSION_TAKEN_OVER, "session taken over")
            session = self.sessions.get(client_id)
        if session is not None and clean_start:
            self.end_session(session)
            session = None
        present = session is not None
        if session is None:
            session = self.sessions[client_id] = Session(client_id)
            if len(self.sessions) > self.stats.clients_maximum:
                self.stats.clients_maximum = len(self.sessions)
        else:
            if session.expiry_handle is not None:
                session.expiry_handle.cancel()
                session.expiry_handle = None
            if session.will_handle is not None:
                # 3.1.3.2.2: a reconnect within the will delay cancels the will.
                session.will_handle.cancel()
                session.will_handle = session.pending_will = session.will_due = None
                self.forget_will(client_id)
        if session.owner is None:
            # A new session, or one of an old store known by username only.
            session.owner = owner_of(client)
        session.expiry_interval = expiry
        session.connection = connection
        session.outbox = connection.outbox
        if present and self.access is not None and session.subscriptions \
                and session.client != client:
            self.access_changed()  # its routes were decided for who it was before
        session.client = client
        session.offline_since = None
        if self.cluster is not None:
            self.cluster.claimed(client_id, session.owner, clean_start)
            self.cluster.session_changed(session, True)
        journal = self.journal
        if journal is not None:
            if expiry:
                journal.session_saved(session)
            elif session.store_id:
                journal.session_deleted(session)  # it ends with this connection now
        if self.observer is not None:
            self.observer.connected(connection)
        return session, present

    def held_against(self, client_id: str, owner: str | None) -> bool:
        """Whether this node holds the session of ``client_id`` for another
        identity than ``owner``, who connected with it on another node: the
        session stays here, and that connection is refused
        (``refused_elsewhere`` there), unless
        ``mqtt.session_takeover_by_other_identity = clean``."""
        session = self.sessions.get(client_id)
        if (session is None or session.owner is None or owner == session.owner
                or self.settings.session_takeover_by_other_identity == "clean"):
            return False
        log.warning("client id %s connected on another node by another identity: "
                    "its session here is kept, and that connection refused", shown(client_id))
        return True

    def refused_elsewhere(self, client_id: str, node: str) -> bool:
        """Another node holds the session of ``client_id`` for another
        identity (``held_against`` there): the connection made here with
        that id goes, as the CONNECT would have been refused on one node
        (5.0: DISCONNECT 0x87, no will), and the session it began with it.
        Whether there was one."""
        session = self.sessions.get(client_id)
        if session is None:
            return False
        if session.connection is not None:
            session.connection.close(
                Reason.NOT_AUTHORIZED,
                f"client id in use by a session of another identity (on node {node})",
                publish_will=False)
        session = self.sessions.get(client_id)
        if session is not None:
            self.end_session(session)
        return True

    def taken_over_elsewhere(self, client_id: str, owner: str | None,
                             clean_start: bool = False) -> bool:
        """Another node of the cluster connected ``client_id`` after this
        one did, for the same identity (``held_against`` says otherwise):
        its connection here goes, as in a takeover on one node
        ([MQTT-3.1.4-3], 5.0: DISCONNECT 0x8E). Whether the connection here
        was closed."""
        session = self.sessions.get(client_id)
        if session is None or (session.connection is None and not clean_start):
            return False
        closed = session.connection is not None
        if closed:
            log.info("client %s connected on another node: closing its connection here",
                     shown(client_id))
            session.connection.close(Reason.SESSION_TAKEN_OVER, "session taken over")
        session = self.sessions.get(client_id)
        if clean_start and session is not None:
            # Clean Start discards the session, wherever it is (3.1.2.4).
            self.end_session(session)
        return closed

    def give_up_session(self, session: Session) -> None:
        """``session`` (offline) goes on on another node of the cluster,
        which took it with its messages: it leaves here without a trace,
        its held-back will dropped (its client connected again), its
        messages not handed to other members of their shared groups."""
        if session.will_handle is not None:
            session.will_handle.cancel()
            session.will_handle = session.pending_will = session.will_due = None
            self.forget_will(session.client_id)
        if session.store_id:
            assert self.journal is not None  # a stored session implies a journal
            self.journal.session_deleted(session)
        session.inflight = session.queue = None
        self.end_session(session)
        if self.cluster is not None:
            # After the ending: its copy is the other node's to write now.
            self.cluster.session_moved(session)

    def resume_session(self, session: Session) -> None:
        """Resend what was in flight (DUP set, [MQTT-4.4.0-1]), then the queue."""
        outbox = session.outbox
        if session.inflight:
            now = self.loop.time()
            for packet_id, entry in list(session.inflight.items()):
                if entry.released:
                    outbox.pubrel(packet_id, after_commit=True)
                elif entry.message.expired(now):
                    del session.inflight[packet_id]
                    self.stats.dropped_expired += 1
                    if session.store_id:
                        assert self.journal is not None  # a stored session implies a journal
                        self.journal.inflight_deleted(session, packet_id, entry)
                else:
                    outbox.send_publish(entry.message, entry.qos, entry.retain,
                                        entry.subscription_ids, packet_id, dup=True)
        self.drain(session)

    def end_connection(self, connection: Client, will: Will | None) -> None:
        """The connection of a session has gone: publish its will, park or end the session."""
        session = connection.session
        if session is None or session.connection is not connection:
            return
        if self.observer is not None:
            self.observer.disconnected(connection)
        session.connection = session.outbox = None
        now = session.offline_since = self.loop.time()
        if session.waiters is not None or session.slow:
            self._release(session)  # offline sessions hold nobody back
        if session.shared_count and session.expiry_interval:
            self._redispatch_shared(session, ending=False)
        journal = self.journal
        if will is not None:
            delay = will.properties.get("will_delay_interval", 0) if connection.version == MQTT_5 else 0
            if delay and session.expiry_interval:
                # Sent when the delay or the session ends, whichever is first.
                delay = min(delay, session.expiry_interval)
                session.pending_will = will
                session.will_due = now + delay
                session.will_handle = self.loop.call_later(delay, self.publish_delayed_will,
                                                           session)
                self.keep_will(connection.client_info, will, session.will_due)
            else:
                self.publish_will(will, session.client)
                self.forget_will(session.client_id)
        elif connection.will_stored:
            self.forget_will(session.client_id)  # discarded: DISCONNECT, or a stop
        if session.expiry_interval == 0:
            self.end_session(session)
            return
        if session.expiry_interval != NEVER_EXPIRES:
            session.expiry_handle = self.loop.call_later(
                session.expiry_interval, self.expire_session, session)
        if session.store_id:
            assert journal is not None  # a stored session implies a journal
            journal.session_saved(session)
        if self.cluster is not None:
            self.cluster.session_changed(session, True)

    def keep_will(self, client: ClientInfo, will: Will, due: float | None) -> bool:
        """Keep a will where it outlives this process: the durable store
        (published after a crash, at the restart) and the cluster's stream
        (published by another node when this one dies). ``due``: when a will
        held back after its connection ended is due; None while connected.
        Whether anything keeps it."""
        if self.journal is not None:
            self.journal.will_saved(client, will, due)
        if self.cluster is not None:
            self.cluster.will_saved(client, will, due)
        return self.journal is not None or self.cluster is not None

    def forget_will(self, client_id: str) -> None:
        """The will kept by keep_will was published or discarded."""
        if self.journal is not None:
            self.journal.will_deleted(client_id)
        if self.cluster is not None:
            self.cluster.will_deleted(client_id)

    def publish_will(self, will: Will, client: ClientInfo | None) -> None:
        access = self.access
        if access is not None and client is not None:
            # Checked now, not at CONNECT: the rules may have changed since.
            allowed = access.permits(client, None, PUBLISH_ACTION, will.topic, will.qos,
                                     will.retain)
            if allowed is not True:
                if allowed is False:
                    log.info("not publishing the will of %s to %s: not authorized",
                             shown(client.client_id), shown(will.topic))
                else:
                    allowed.then(lambda _: self._publish_will_decided(will, client))
                return
        props = will.properties
        if props:
            props = {k: v for k, v in props.items() if k != "will_delay_interval"}
        message = Message(will.topic, will.payload, will.qos, will.retain,
                          props or NO_PROPERTIES)
        message.stamp_expiry(self.loop.time())
        self.route(message, None)
        if self.cluster is not None:
            self.cluster.forward(message)
        if will.retain:
            self.retain(message)

    def _publish_will_decided(self, will: Will, client: ClientInfo) -> None:
        self.publish_will(will, client)  # the answer is kept: asking again finds it
        self.outboxes.flush()

    def publish_delayed_will(self, session: Session) -> None:
        will, session.pending_will, session.will_handle = session.pending_will, None, None
        session.will_due = None
        if will is not None:
            self.forget_will(session.client_id)
            self.publish_will(will, session.client)
            self.outboxes.flush()

    def expire_session(self, session: Session) -> None:
        session.expiry_handle = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.debug("session %s expired", shown(session.client_id))
            self.stats.clients_expired += 1
            self.end_session(session)
            self.outboxes.flush()

    def end_session(self, session: Session) -> None:
        if session.shared_count:
            self._redispatch_shared(session, ending=True)
        if session.store_id:
            assert self.journal is not None  # a stored session implies a journal
            self.journal.session_deleted(session)
        for topic_filter in list(session.subscriptions):
            self.unsubscribe(session, topic_filter)
        if self.cluster is not None:
            # After the unsubscribes, each a change of the session: the last
            # word on its copy in the cluster is that it ended.
            self.cluster.session_ended(session)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if session.expiry_handle is not None:
            session.expiry_handle.cancel()
            session.expiry_handle = None
        if session.will_handle is not None:
            # The session ends before the will delay: the will goes now.
            session.will_handle.cancel()
            self.publish_delayed_will(session)

    # ------------------------------------------------------- subscriptions

    def subscribe(self, session: Session, options: Subscription, identifier: int | None) -> bool:
        """Add or replace a subscription; returns whether it existed before.

        ``options.filter`` has been validated (``$share`` form included).
        """
        existed = options.filter in session.subscriptions
        entry = SubscriptionEntry(options, identifier)
        session.subscriptions[options.filter] = entry
        if session.store_id:
            assert self.journal is not None  # a stored session implies a journal
            self.journal.subscription_saved(session, entry)
        if self.cluster is not None and session.expiry_interval:
            self.cluster.session_changed(session, True)
        shared = split_shared(options.filter)
        if shared is None:
            if self.trie.add(options.filter, session, entry) and self.cluster is not None:
                self.cluster.subscribed(options.filter)
            return existed
        group = self.groups.get(shared)
        if group is None:
            group = self.groups[shared] = SharedGroup(*shared)
            self.shared_trie.add(shared[1], group, group)
            if self.cluster is not None:
                self.cluster.subscribed(options.filter)  # the group's first member here
        group.add(session, entry)
        session.shared_count += not existed
        return existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        if session.store_id:
            assert self.journal is not None  # a stored session implies a journal
            self.journal.subscription_deleted(session, topic_filter)
        if self.cluster is not None and session.expiry_interval:
            self.cluster.session_changed(session, True)
        shared = split_shared(topic_filter)
        if shared is None:
            if self.trie.remove(topic_filter, session) and self.cluster is not None:
                self.cluster.unsubscribed(topic_filter)
            return True
        session.shared_count -= 1
        group = self.groups[shared]
        group.remove(session)
        if not group.members:
            del self.groups[shared]
            self.shared_trie.remove(shared[1], group)
            if self.cluster is not None:
                self.cluster.unsubscribed(topic_filter)
        return True

    def subscription_count(self) -> int:
        return len(self.trie) + sum(len(group.members) for group in self.groups.values())

    def send_retained(self, session: Session, options: Subscription,
                      identifier: int | None, existed: bool) -> None:
        """Deliver retained messages for a new subscription (3.3.1.3, retain handling)."""
        if options.retain_handling == 2 or (options.retain_handling == 1 and existed):
            return
        if options.filter.startswith("$share/"):
            return  # 4.8.2: a new shared subscription gets no retained messages
        ids = (identifier,) if identifier else ()
        now = self.loop.time()
        for message in self.retained.match(options.filter):
            if message.expired(now):
                self.forget_retained(message.topic)
                continue
            qos = min(message.qos, options.qos)
            allowed = self._may_read(session, message.topic, options.qos)
            if allowed is not True:
                if allowed is not False:  # decided later: the retained message waits
                    allowed.then(partial(self._retained_decided, session, message, qos, ids))
                continue  # a topic this client may not read, under a filter it may
            self._send_retained(session, message, qos, ids)

    def _send_retained(self, session: Session, message: Message, qos: int,
                       ids: tuple[int, ...]) -> None:
        # [MQTT-3.3.1-8]: retained messages sent on subscribe carry RETAIN 1.
        if qos == 0:
            if session.outbox is not None:
                session.outbox.send_publish(message, 0, True, ids)
        else:
            self.deliver(session, message, qos, True, ids)

    def _retained_decided(self, session: Session, message: Message, qos: int,
                          ids: tuple[int, ...], allowed: bool) -> None:
        if allowed and self._subscribed(session):
            self._send_retained(session, message, qos, ids)
            self.outboxes.flush()

    def retain(self, message: Message, forward: bool = True) -> None:
        """Keep (or, with an empty payload, clear) the retained message of its
        topic; ``forward`` false for one another node set."""
        if forward and self.cluster is not None:
            self.cluster.retained(message)
        # [MQTT-3.3.1-10/11]: an empty payload clears the topic and is not stored.
        if message.payload:
            self.retained.set(message.topic, retained_form(message))
            if self.journal is not None and not message.topic.startswith(SYS_PREFIX):
                # $SYS figures are the broker's own, made again after a restart.
                self.journal.retained_saved(message)
        else:
            self.forget_retained(message.topic)

    def forget_retained(self, topic: str) -> None:
        """Delete the retained message of ``topic``, without telling anyone."""
        if (self.retained.delete(topic) and self.journal is not None
                and not topic.startswith(SYS_PREFIX)):
            self.journal.retained_deleted(topic)

    # ------------------------------------------------------- routing

    def _routes(self, found: list[tuple[Session, SubscriptionEntry]], topic: str) -> list[Route]:
        """The routes of a topic, as the trie caches them: one per session,
        and, with authorization on, only to sessions whose client may read
        the topic. Read access is so decided once per (subscriber, topic)
        until the rules or a subscriber's identity change (``access_changed``),
        not at each delivery, and a granted "a/#" does not carry "a/secret"
        to a client denied it."""
        routes = _merge_routes(found)
        access = self.access
        if access is None:
            return routes
        readable = []
        for route in routes:
            session, qos, _, _, _ = route
            client = session.client
            if client is None:
                readable.append(route)
                continue
            allowed = access.permits(client, None, SUBSCRIBE_ACTION, topic, qos)
            if allowed is True:
                readable.append(route)
            elif allowed is False:
                self.stats.read_denied += 1
            else:  # decided later: ``route`` makes the message wait for it
                if self.gated is None:
                    self.gated = []
                self.gated.append((allowed, route))
        return readable

    def _gate(self, message: Message, sender: Session | None) -> int:
        """The message waits for the read decisions under way for some of
        its routes; the topic's routes are not kept until they are made, so
        the next messages of the topic wait behind it, in order."""
        gated, self.gated = self.gated, None
        assert gated is not None
        self.trie.forget_match(message.topic)
        for pending, route in gated:
            pending.then(partial(self._read_decided, route, message, sender))
        return len(gated)

    def _read_decided(self, route: Route, message: Message, sender: Session | None,
                      allowed: bool) -> None:
        if not allowed:
            self.stats.read_denied += 1
        elif self._subscribed(route[0]):
            self._send(message, sender, [route])
            self.outboxes.flush()

    @staticmethod
    def _subscribed(session: Session) -> bool:
        """Whether ``session`` still subscribes, after a wait (an ended
        session has no subscriptions left)."""
        return bool(session.subscriptions)

    def _may_read(self, session: Session, topic: str, qos: int) -> bool | Pending:
        """Whether the session's client may read ``topic`` (its connection's
        decision cache used, when it has one)."""
        access = self.access
        client = session.client
        if access is None or client is None:
            return True
        connection = session.connection
        return access.permits(client, connection.access_cache if connection is not None else None,
                              SUBSCRIBE_ACTION, topic, qos)

    def access_changed(self) -> None:
        """The rules, or the identity of a subscriber, changed: read access is
        decided again at the next message of each topic."""
        self.trie.forget_matches()

    def route(self, message: Message, sender: Session | None) -> int:
        """Deliver to every matching subscriber of this node; returns how
        many matched. Where a message is published, the caller then forwards
        it to the other nodes of a cluster (``cluster.forward``): here it
        would cost every message a check, and a message from another node
        is routed here too."""
        if self.observer is not None:
            self.observer.message(message, sender)
        routes = self.trie.match(message.topic)
        matched = self._route_shared(message, sender) if self.groups else 0
        if self.gated is not None:
            matched += self._gate(message, sender)
        if not routes:
            return matched
        self._send(message, sender, routes)
        return matched + len(routes)

    def _send(self, message: Message, sender: Session | None, routes: list[Route]) -> None:
        msg_qos = message.qos
        msg_retain = message.retain
        sent = 0  # QoS 0 written here: their bytes are counted once, below
        for session, qos, no_local, as_published, ids in routes:
            if no_local and session is sender:
                continue  # [MQTT-3.8.3-3]
            if msg_qos < qos:
                qos = msg_qos
            # [MQTT-3.3.1-9/12]: live deliveries clear RETAIN unless asked to keep it.
            retain = msg_retain and as_published
            outbox = session.outbox
            if qos:
                self.deliver(session, message, qos, retain, ids, None, sender)
            elif outbox is None:
                if self.settings.mqueue_store_qos0:
                    self._enqueue(session, message, 0, retain, ids, None)
            elif outbox.paused:
                self._qos0_to_paused(session, message, retain, ids, sender)
            elif outbox.queue_publish(message, 0, retain, ids):
                sent += 1
        if sent:
            self.stats.publish_bytes_sent += sent * len(message.payload)

    def route_remote(self, message: Message, source: Any = None,
                     without: Session | None = None) -> None:
        """Deliver a message another node published to this node's
        subscribers (but ``without``). Not to its shared groups: each group
        takes its messages from another node through its own queue
        subscription (deliver_to_group). ``source``: what it came through,
        as a sender whose ``connection`` can be held back like a publisher's
        (a cluster's stream), or None."""
        routes = self.trie.match(message.topic)
        if without is not None:
            self._route_only(message, source, lambda session: session is not without, routes)
            return
        if self.gated is not None:
            self._gate(message, None)
        if routes:
            self._send(message, source, routes)

    def route_to(self, session: Session, message: Message, source: Any = None) -> None:
        """Deliver a message of another node to ``session`` alone, as
        route_remote would (a session that came from a node that died gets
        what the stream stored for it meanwhile: cluster.replica)."""
        self._route_only(message, source, lambda other: other is session,
                         self.trie.match(message.topic))

    def _route_only(self, message: Message, source: Any, keep: Callable[[Session], bool],
                    routes: list[Route]) -> None:
        routes = [route for route in routes if keep(route[0])]
        gated, self.gated = self.gated, None
        if gated:
            self.trie.forget_match(message.topic)
            for pending, route in gated:
                if keep(route[0]):
                    pending.then(partial(self._read_decided, route, message, source))
        if routes:
            self._send(message, source, routes)

    def deliver_to_group(self, message: Message, share: str, topic_filter: str) -> bool:
        """Deliver a message another node published to one member of the
        shared group (share, topic_filter) of this node; whether it is here."""
        group = self.groups.get((share, topic_filter))
        if group is None:
            return False
        member = group.pick(self.settings.shared_subscription_strategy, message.topic, "")
        self._deliver_shared(group, member, message, message.retain, None)
        return True

    def _route_shared(self, message: Message, sender: Session | None) -> int:
        """One member of each matching shared subscription gets the message."""
        groups = self.shared_trie.match(message.topic)
        publisher = sender.client_id if sender is not None else ""
        strategy = self.settings.shared_subscription_strategy
        for group, _ in groups:
            member = group.pick(strategy, message.topic, publisher)
            self._deliver_shared(group, member, message, message.retain, sender)
        return len(groups)

    def _deliver_shared(self, group: SharedGroup, member: Session, message: Message,
                        retain: bool, sender: Session | None = None) -> None:
        entry = group.members[member]
        options = entry.options
        allowed = self._may_read(member, message.topic, options.qos)
        if allowed is not True:
            if allowed is False:
                self.stats.read_denied += 1  # the member picked may not read this topic
            else:
                allowed.then(partial(self._shared_read_decided, group, member, message,
                                     retain, sender))
            return
        qos = min(message.qos, options.qos)
        retain = retain and options.retain_as_published
        ids = (entry.identifier,) if entry.identifier else ()
        if qos:
            self.deliver(member, message, qos, retain, ids, group, sender)
        elif member.outbox is None:
            if self.settings.mqueue_store_qos0:
                self._enqueue(member, message, 0, retain, ids, group)
        elif member.outbox.paused:
            self._qos0_to_paused(member, message, retain, ids, sender)
        else:
            member.outbox.send_publish(message, 0, retain, ids)

    def _shared_read_decided(self, group: SharedGroup, member: Session, message: Message,
                             retain: bool, sender: Session | None, allowed: bool) -> None:
        if not allowed:
            self.stats.read_denied += 1
        elif member in group.members:
            self._deliver_shared(group, member, message, retain, sender)
            self.outboxes.flush()

    def _qos0_to_paused(self, session: Session, message: Message, retain: bool,
                        ids: tuple[int, ...], sender: Session | None) -> None:
        """A QoS 0 message for a subscriber whose transport is over its write
        high-water mark: written all the same while the publisher can be
        held back instead (one message over the mark per publisher), dropped
        when the subscriber is slow or nobody can be held back."""
        publisher = sender.connection if sender is not None else None
        if session.slow or publisher is None:
            self.stats.dropped_qos0_backpressure += 1
            session.outbox.displace(message, retain, ids)
        else:
            session.outbox.send_publish(message, 0, retain, ids)
            self.hold_back(session, publisher)

    def _redispatch_shared(self, session: Session, ending: bool) -> None:
        """Hand the shared-subscription messages a departing member has not
        acknowledged to another member of their group (4.8.2).

        When the member's connection goes, a message moves if another member
        is connected; when its session ends, to any other member, queued if
        need be. A QoS 2 message whose PUBREC arrived stays: its receiver has
        it, and sending it again elsewhere would break exactly once.
        """
        strategy = self.settings.shared_subscription_strategy
        client_id = session.client_id

        def new_member(group: SharedGroup, message: Message) -> Session | None:
            # The publisher is not kept with the message: hash_clientid picks as for "".
            member = group.pick(strategy, message.topic, "", exclude=session)
            if member is None or (member.connection is None and not ending):
                return None
            return member

        moved = 0
        if session.inflight:
            for packet_id, entry in list(session.inflight.items()):
                group = entry.group
                if group is None or entry.released:
                    continue
                member = new_member(group, entry.message)
                if member is not None:
                    del session.inflight[packet_id]
                    self._deliver_shared(group, member, entry.message, entry.retain)
                    if session.store_id:
                        assert self.journal is not None  # a stored session implies a journal
                        self.journal.inflight_deleted(session, packet_id, entry)
                    moved += 1
        if session.queue:
            kept: deque[QueuedMessage] = deque()
            for item in session.queue:
                message, _, retain, _, group, _ = item
                member = new_member(group, message) if group is not None else None
                if member is None:
                    kept.append(item)
                else:
                    self._deliver_shared(group, member, message, retain)
                    self.unqueued(session, item)
                    moved += 1
            session.queue = kept
        if moved:
            log.debug("moved %d shared-subscription messages of %s to other members",
                      moved, shown(client_id))

    def deliver(self, session: Session, message: Message, qos: int, retain: bool,
                ids: tuple[int, ...], group: SharedGroup | None = None,
                sender: Session | None = None) -> None:
        """Send a QoS 1/2 message now if the window allows, else queue it
        (``sender``, the publisher, may then be held back)."""
        outbox = session.outbox
        if (outbox is not None and not outbox.paused
                and session.inflight_count() < outbox.send_window):
            self._send_inflight(session, outbox, message, qos, retain, ids, group, 0)
        else:
            self._enqueue(session, message, qos, retain, ids, group, sender)

    def _send_inflight(self, session: Session, outbox: Outbox, message: Message, qos: int,
                       retain: bool, ids: tuple[int, ...], group: SharedGroup | None,
                       store_key: int) -> None:
        """Send a QoS 1/2 message into the window (``store_key``: it was
        queued in the durable store)."""
        # Hot path, so the type checker gets ignores rather than checks:
        # allocate_packet_id has made the in-flight table, and store_id is set
        # only while a journal is in use.
        packet_id = session.allocate_packet_id()
        if qos == 2 and self.cluster is not None and session.expiry_interval:
            # In a cluster a QoS 2 PUBLISH leaves once the session's copy
            # has it: after a failover it is sent again under its packet
            # id, never as a new message the client could take twice.
            entry = session.inflight[packet_id] = Inflight(  # type: ignore[index]
                message, qos, retain, ids, group)
            if session.store_id:
                self.journal.inflight_saved(  # type: ignore[union-attr]
                    session, packet_id, entry, True)
            self.cluster.after_copy(session, partial(self._publish_held, session, outbox,
                                                     packet_id, entry))
        elif outbox.queue_publish(message, qos, retain, ids, packet_id):
            self.stats.publish_bytes_sent += len(message.payload)
            entry = session.inflight[packet_id] = Inflight(  # type: ignore[index]
                message, qos, retain, ids, group)
            if session.store_id:
                # Recorded before the queue entry goes, so that the message
                # body's row is not dropped and written again.
                self.journal.inflight_saved(  # type: ignore[union-attr]
                    session, packet_id, entry, True)
        if store_key and session.store_id:
            self.journal.unqueued(session, store_key, message)  # type: ignore[union-attr]

    def _publish_held(self, session: Session, outbox: Outbox, packet_id: int,
                      entry: Inflight) -> None:
        """Send a QoS 2 message held for the session's copy (``_send_inflight``)."""
        if outbox.closed or session.outbox is not outbox or session.inflight is None \
                or session.inflight.get(packet_id) is not entry:
            return  # gone, or sent again with DUP by the resume of a new connection
        message = entry.message
        if outbox.queue_publish(message, 2, entry.retain, entry.subscription_ids, packet_id):
            self.stats.publish_bytes_sent += len(message.payload)
            return
        del session.inflight[packet_id]  # more than the client takes: discarded
        if session.store_id:
            assert self.journal is not None  # a stored session implies a journal
            self.journal.inflight_deleted(session, packet_id, entry)

    def _enqueue(self, session: Session, message: Message, qos: int, retain: bool,
                 ids: tuple[int, ...], group: SharedGroup | None,
                 sender: Session | None = None) -> None:
        """Queue for later; a durable session's QoS 1/2 entries are recorded.

        An online subscriber that keeps up loses nothing: at its high-water
        mark the publisher is held back, and what held-back publishers had
        already sent is queued beyond ``max_mqueue_len`` (at most one message
        each). The bound applies to offline and slow sessions, and to what
        no publisher can be held back for (wills, the embedding API).
        """
        key = 0
        if qos and session.store_id:
            assert self.journal is not None  # a stored session implies a journal
            key = self.journal.queued(session, message, qos, retain, ids,
                                      group.share_filter if group is not None else None)
        limit = self.settings.max_mqueue_len
        if session.connection is not None and not session.slow and session.queue \
                and len(session.queue) >= self.flow_high:
            publisher = sender.connection if sender is not None else None
            if publisher is not None:
                self.hold_back(session, publisher)
                limit = 0
        dropped = session.enqueue((message, qos, retain, ids, group, key), limit)
        if dropped is not None:
            self.stats.dropped_queue_full += 1
            self.unqueued(session, dropped)

    def unqueued(self, session: Session, item: QueuedMessage) -> None:
        """``item`` left the queue other than into the window."""
        message, _, _, _, _, store_key = item
        if store_key and session.store_id:
            assert self.journal is not None  # a stored session implies a journal
            self.journal.unqueued(session, store_key, message)

    def drain(self, session: Session) -> None:
        """Move queued messages into the window while the client can take them."""
        queue = session.queue
        outbox = session.outbox
        now = self.loop.time()
        while queue and outbox is not None and not outbox.paused:
            message, qos, retain, ids, group, store_key = queue[0]
            if message.expired(now):
                self.unqueued(session, queue.popleft())
                self.stats.dropped_expired += 1
            elif qos == 0:
                queue.popleft()
                outbox.send_publish(message, 0, retain, ids)
            elif session.inflight_count() < outbox.send_window:
                queue.popleft()
                self._send_inflight(session, outbox, message, qos, retain, ids, group, store_key)
            else:
                break
        if ((session.waiters is not None or session.slow) and outbox is not None
                and not outbox.paused and (len(queue) if queue else 0) <= self.flow_low):
            self._release(session)

    # ------------------------------------------------------- flow control

    def hold_back(self, session: Session, publisher: Client) -> None:
        """``session``, online and not slow, is over its high-water mark:
        stop reading new packets from ``publisher`` until it has drained
        (``drain`` releases it), or until it has been over the mark for
        ``slow_subscriber_timeout`` and is taken for slow."""
        waiters = session.waiters
        if waiters is None:
            waiters = session.waiters = set()
            session.slow_handle = self.loop.call_later(
                self.settings.slow_subscriber_timeout, self._slow_expired, session)
        elif publisher in waiters:
            return
        waiters.add(publisher)
        publisher.hold()

    def _release(self, session: Session) -> None:
        """``session`` drained or went offline: its publishers go on, and it
        is no longer slow."""
        session.slow = False
        if session.slow_handle is not None:
            session.slow_handle.cancel()
            session.slow_handle = None
        waiters, session.waiters = session.waiters, None
        if waiters:
            for publisher in waiters:
                publisher.release()

    def _slow_expired(self, session: Session) -> None:
        """A subscriber held its publishers back for the whole timeout."""
        session.slow_handle = None
        waiters, session.waiters = session.waiters, None
        if session.connection is None or not waiters:
            return
        session.slow = True
        stats = self.stats
        stats.slow_subscribers += 1
        now = self.loop.time()
        if now - self._slow_logged_at >= SLOW_LOG_INTERVAL:
            self._slow_logged_at = now
            log.warning("client %s has held %d publishers back for %ss: it no longer does, "
                        "and its own queue bound applies (slow subscribers so far: %d; "
                        "dropped so far: %d QoS 0 over the write mark, %d from full queues)",
                        shown(session.client_id), len(waiters),
                        self.settings.slow_subscriber_timeout, stats.slow_subscribers,
                        stats.dropped_qos0_backpressure, stats.dropped_queue_full)
        for publisher in waiters:
            publisher.release()

    def acknowledge(self, session: Session, packet_id: int, kind: int) -> None:
        inflight = session.inflight
        if not inflight:
            return  # an unknown id: nothing to release (4.3.2, duplicates are harmless)
        entry = inflight.get(packet_id)
        if entry is None:
            return  # likewise
        if kind == PUBACK and entry.qos != 1:
            return
        if kind == PUBCOMP and not entry.released:
            return
        del inflight[packet_id]
        if session.store_id:
            # Hot path, so an ignore rather than a check: store_id is set only
            # while a journal is in use.
            self.journal.inflight_deleted(  # type: ignore[union-attr]
                session, packet_id, entry)
        if session.expiry_interval and self.cluster is not None:
            self.cluster.session_changed(session, False)
        if session.queue:
            self.drain(session)

    # ------------------------------------------------------- embedding API

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties: Mapping[str, Any] | None = None,
                sender: Session | None = None) -> int:
        """Inject a message as if a client had published it (``sender``'s
        session, if given: no-local applies); returns the match count."""
        try:
            validate_topic_name(topic, self.settings.max_topic_levels)
        except ValueError as exc:
            raise ValueError(f"invalid topic name {topic[:100]!r}: {exc}") from None
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid QoS {qos}")
        message = Message(topic, bytes(payload), qos, retain, properties or NO_PROPERTIES)
        message.stamp_expiry(self.loop.time())
        matched = self.route(message, sender)
        if self.cluster is not None:
            self.cluster.forward(message)
        if retain:
            self.retain(message)
        self.outboxes.flush()
        return matched

    def close_all(self, reason: int, message: str) -> None:
        """Disconnect every client (5.0: with ``reason``); wills are not published."""
        for connection in list(self.connections):
            connection.close(reason, message, publish_will=False, linger=False)
        for transport in list(self.lingering):
            transport.close()
        for session in self.sessions.values():
            for handle in (session.expiry_handle, session.will_handle):
                if handle is not None:
                    handle.cancel()
            session.expiry_handle = session.will_handle = None
        for task in list(self._tasks):
            task.cancel()
