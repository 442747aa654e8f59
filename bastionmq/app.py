"""Builds a running broker from a Config: the core, its listeners, the auth chain."""

from __future__ import annotations

import asyncio
import logging

import attrs
import itertools
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, TypeVar

from bastionmq.acl.chain import AclLoadError, AuthorizationChain, load_sources
from bastionmq.auth.ban import LoginBans
from bastionmq.auth.banned import BannedFirst, OperatorBans
from bastionmq.acl.builtin_db import BuiltinAclSource, check_rule
from bastionmq.auth.builtin_db import AuthDatabase, AuthDatabaseError, Ban, read_rules
from bastionmq.auth.scram import ScramSha256
from bastionmq.auth.chain import (
    AuthenticationChain, AuthnLoadError, AuthStats,
    ListenerAuthenticators, build_authenticators,
)
from bastionmq.auth.identity import IdentityRule, PeerIdentity
from bastionmq.auth.mechanisms import BuiltinPasswordAuthenticator
from bastionmq.broker.access import AccessControl
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.local import DEFAULT_LIMIT, LocalSubscriber, LocalSubscription
from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import AuthMethod
from bastionmq.broker.properties import Reason
from bastionmq.broker.restore import restore
from bastionmq.broker.store import RestoreReport, SqliteStore, StoreError
from bastionmq.broker.sys_topics import SysTopics
from bastionmq.cluster.admin import AdminRelay
from bastionmq.cluster.bus import ClusterUnavailable, NatsBus
from bastionmq.cluster.embedded import EmbeddedError, EmbeddedNats, embedded_directory
from bastionmq.cluster.jetstream import JetStreamError
from bastionmq.cluster.retained import load_retained
from bastionmq.cluster.replica import SessionReplica
from bastionmq.cluster.sessions import SessionMover
from bastionmq.cluster.stream import POSITION, MessageStream
from bastionmq.cluster.wills import Wills
from bastionmq.hooks import (
    ConnectedClient, HookAuthenticator, Hooks, Observers, acl_sources, check_authorize_hook,
    hook_stats,
)
from bastionmq.config import (
    TLS_KINDS, Config, ConfigError, SslListenerConfig, load_config, resolve_data_dir,
)
from bastionmq.listeners.base import Listener
from bastionmq.listeners.certificates import certificate_facts
from bastionmq.listeners.proxied import ProxySettings
from bastionmq.listeners.tls import TlsListener
from bastionmq.listeners.tls_context import (
    TlsSetupError, build_client_context, load_material, ssl_options_path,
)
from bastionmq.listeners.ws import WsListener, WssListener
from bastionmq.ops.logs import configure_logging
from bastionmq.ops.server import OpsServer
from bastionmq.pki import init_pki
from bastionmq.reload import ReloadReport, plan_reload
from bastionmq.version import __version__

log = logging.getLogger("bastionmq")

ConfigSource = Config | str | os.PathLike

HookT = TypeVar("HookT", bound=Callable[..., Any])


def resolve_config(config: ConfigSource | None, env: bool = False) -> Config:
    """A Config from a Config, a file path or a HOCON string; ``BASTIONMQ_*``
    environment variables apply only with ``env``."""
    overrides: dict[str, str] | None = None if env else {}
    if config is None:
        return load_config(env=overrides)
    if isinstance(config, Config):
        # One made by hand: its data directory is chosen now, as load_config does.
        return config if config.node.chosen is not None else resolve_data_dir(config)
    if isinstance(config, os.PathLike):
        return load_config(config, env=overrides)
    if _is_hocon_text(config):
        return load_config(text=config, env=overrides)
    return load_config(config, env=overrides)


def _is_hocon_text(config: str | os.PathLike) -> bool:
    return isinstance(config, str) and ("\n" in config or "{" in config or "=" in config)


def _listener_plan(config: Config, kind: str, name: str,
                   block: Any) -> tuple[type[Listener], str, Any, dict]:
    """What a listener needs besides its socket options; TLS material is
    loaded here, before any port opens, so a bad file stops start-up."""
    if kind == "tcp":
        return Listener, name, block, {}
    if kind == "ws":
        return WsListener, name, block, {"options": _websocket(config, block)}
    options = block.ssl_options
    try:
        material = load_material(options, config.crl_cache, config.psk_authentication)
    except TlsSetupError as exc:
        raise ConfigError([(exc.key_path(ssl_options_path(kind, name)), str(exc))]) from None
    tls = {"options": options, "crl_cache": config.crl_cache,
           "psk": config.psk_authentication, "material": material}
    if kind == "wss":
        return WssListener, name, block, {**tls, "websocket": _websocket(config, block)}
    return TlsListener, name, block, tls


def _websocket(config: Config, block: Any) -> Any:
    """The listener's websocket options with check_origin_enable decided:
    when not set, on where anonymous access is."""
    options = block.websocket
    if options.check_origin_enable is None:
        options = attrs.evolve(options, check_origin_enable=config.anonymous_allowed(block))
    return options


def _authenticators(config: Config, kind: str, name: str, block: Any,
                    database: Any = None) -> list | None:
    """The listener's authenticators; None when no chain is configured.
    Without a ``database`` (checking only), built-in database entries are
    left out."""
    entries = config.authentication_of(block)
    if entries is None:
        return None
    if database is None:
        entries = tuple(e for e in entries if e.backend != "built_in_database")
    extra = {("password_based", "built_in_database"):
             lambda entry: BuiltinPasswordAuthenticator(database, entry.user_id_type)}
    try:
        return build_authenticators(entries, extra)
    except AuthnLoadError as exc:
        where = (f"listeners.{kind}.{name}.authentication" if block.authentication is not None
                 else "authentication")
        raise ConfigError([(exc.key_path(where), str(exc))]) from None


def _load_emqx_acl(source: Any) -> Any:
    from bastionmq.acl.emqx_file import parse_acl_file
    return parse_acl_file(source.path)


def _load_mosquitto_acl(source: Any) -> Any:
    from bastionmq.acl.mosquitto_file import parse_mosquitto_acl
    return parse_mosquitto_acl(source.path)


def _acl_loaders(config: Config) -> dict[str, Any]:
    def load_builtin(source: Any) -> Any:
        return BuiltinAclSource(read_rules(config.node.auth_database))
    return {"file": _load_emqx_acl, "mosquitto_acl": _load_mosquitto_acl,
            "built_in_database": load_builtin}


def _has_scram(config: Config, block: Any) -> bool:
    """Whether the listener's chain has an enabled ``mechanism = scram`` entry."""
    return any(entry.enable and entry.mechanism == "scram"
               for entry in config.authentication_of(block) or ())


def _uses_database(config: Config) -> bool:
    if config.http_api.enable:
        return True  # API keys and the operator's bans
    entries = [*config.authentication, *(entry for _, _, block in config.enabled_listeners()
                                         for entry in block.authentication or ())]
    return any(entry.enable and (entry.backend == "built_in_database" or entry.mechanism == "scram")
               for entry in entries)


def _acl_sources(config: Config) -> list:
    try:
        return load_sources(config.authorization.sources, _acl_loaders(config))
    except AclLoadError as exc:
        raise ConfigError([(exc.key_path("authorization.sources"), str(exc))]) from None


def _authorization(config: Config, hooks: list | None = None) -> AuthorizationChain | None:
    """The authorization chain, or None when nothing can be denied; an
    embedding application's authorize ``hooks`` (bastionmq.hooks.acl_sources)
    are its first sources."""
    authz = config.authorization
    if not authz.active and not hooks:
        return None
    return AuthorizationChain(
        [*(hooks or ()), *_acl_sources(config)], no_match=authz.no_match,
        deny_action=authz.deny_action,
        cache_max_size=authz.cache.max_size if authz.cache.enable else 0,
        cache_ttl=authz.cache.ttl)


def check_rule_files(config: Config) -> list[tuple[str, str]]:
    """Load what authentication and authorization read from disk (password
    files, ACL files) as start-up would; the problems, with key paths."""
    problems = []
    try:
        if config.authorization.active:
            _acl_sources(config)
    except ConfigError as exc:
        problems.extend(exc.errors)
    for kind, name, block in config.enabled_listeners():
        try:
            _authenticators(config, kind, name, block)
        except ConfigError as exc:
            problems.extend(error for error in exc.errors if error not in problems)
    return problems


def make_dev_pki_on_first_start(config: Config) -> None:
    """When a TLS listener uses the development PKI's default paths (in
    node.data_dir/certs, where ``bastionmq certs`` works by default) and none
    of its files exists yet, make that PKI, so the shipped config starts."""
    pki_dir = config.node.pki_dir
    for kind, _name, block in config.enabled_listeners():
        if kind not in TLS_KINDS:
            continue
        assert isinstance(block, SslListenerConfig)  # the block of an ssl or wss listener
        if block.ssl_options.awaits_dev_pki(pki_dir):
            init_pki(Path(pki_dir))
            log.warning(
                "made a development PKI in %s (CA, server certificate for localhost, "
                "127.0.0.1 and ::1, empty CRL): fine for trying the broker, not for "
                "production. Issue a client certificate with: bastionmq certs client NAME",
                os.path.abspath(pki_dir))
            return


def describe_restore(report: RestoreReport, path: str, bodies: int) -> str:
    """The one log line that says what start-up found in the store."""
    line = (f"restored from {path}: {report.sessions} sessions with "
            f"{report.subscriptions} subscriptions, {report.queued} queued and "
            f"{report.inflight} in-flight messages ({bodies} distinct bodies), "
            f"{report.awaiting_rel} QoS 2 messages awaiting release, "
            f"{report.retained} retained messages")
    if report.expired_sessions or report.expired_messages or report.wills_published:
        line += (f"; while the broker was down {report.expired_sessions} sessions and "
                 f"{report.expired_messages} messages expired, and {report.wills_published} "
                 "wills fell due (of clients cut off by a crash, or whose delay ran out) and "
                 "were published")
    return line


async def start_embedded_nats(config: Config) -> EmbeddedNats:
    """The nats-server of ``cluster.nats.embedded`` (or the one answering
    at its address already); ConfigError with the key path when it cannot be."""
    nats = config.cluster.nats
    host, port = nats.addresses[0]
    if nats.tls.enable:
        raise ConfigError([("cluster.nats.tls.enable", "the embedded server listens "
                            "on loopback without TLS: turn one of them off")])
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError([("cluster.nats.servers", f"the embedded server listens on "
                            f"loopback: the first server must be 127.0.0.1:PORT, "
                            f"not {host}:{port}")])
    try:
        embedded = EmbeddedNats(nats.embedded_binary, port,
                                embedded_directory(config.node.directory), config.cluster.name)
        await embedded.start()
    except EmbeddedError as exc:
        raise ConfigError([("cluster.nats.embedded", str(exc))]) from None
    return embedded


class Broker:
    """A broker an application can embed::

        async with Broker("listeners.tcp.default.bind = \\"127.0.0.1:0\\"") as broker:
            host, port = broker.listeners["tcp:default"].address
            await broker.publish("greeting", b"hello")

    ``auth_methods`` adds MQTT 5.0 enhanced authentication methods, for
    example ``ScramSha256`` from bastionmq.auth.scram. ``BASTIONMQ_*``
    environment variables apply only with ``env=True``. ``hooks``
    (bastionmq.hooks.Hooks) are the application's authentication and
    authorization decisions and observers; the decorators ``authenticate``,
    ``authorize``, ``on_message``, ``on_connect`` and ``on_disconnect`` add
    more (docs/embedding.md).
    """

    def __init__(self, config: ConfigSource | None = None,
                 auth_methods: Iterable[AuthMethod] = (),
                 config_file: str | os.PathLike | None = None, env: bool = False,
                 hooks: Hooks | None = None) -> None:
        #: Whether ``BASTIONMQ_*`` environment variables apply (the CLI's
        #: broker: yes; an embedded one: only when asked, so that a variable
        #: set in a shell does not move an application's broker).
        self.env = env
        self.config = resolve_config(config, env)
        #: The file ``reload_config`` reads again: ``config_file``, or
        #: ``config`` when it is a path.
        self.config_file = config_file
        if config_file is None and isinstance(config, (str, os.PathLike)) \
                and not _is_hocon_text(config):
            self.config_file = config
        #: Whether the broker owns the process's logging (the CLI's broker
        #: does; an embedding application keeps its own), so that a reload
        #: applies ``log``.
        self.manages_logging = False
        #: What this process makes of the configuration file when it reads it
        #: again (a worker of node.workers: its own node name, store, ...).
        self.adapt: Callable[[Config], Config] | None = None
        self.auth_methods = {method.name: method for method in auth_methods}
        #: The application's own methods, offered on every listener.
        self._embedded_methods = frozenset(self.auth_methods)
        self.core: BrokerCore | None = None
        #: Listener id ("tcp:default") -> Listener, once started.
        self.listeners: dict[str, Listener] = {}
        self._sys_topics: SysTopics | None = None
        self.authorization: AuthorizationChain | None = None
        self._authenticators: list = []
        #: The built-in user and rule database, when the config uses it.
        self.database: AuthDatabase | None = None
        #: The durable store, when ``durable_sessions.enable`` is set.
        self.store: SqliteStore | None = None
        #: Authentication outcomes of every chain, once started.
        self.authn_stats: AuthStats | None = None
        #: The operations listener (metrics, health), when ``http_api.enable`` is set.
        self.ops: OpsServer | None = None
        #: The connection to the other nodes, when ``cluster.enable`` is set,
        #: and the nats-server of ``cluster.nats.embedded``, when started here.
        self.bus: NatsBus | None = None
        #: Tells the other nodes of bans and rule changes made here.
        self.admin: AdminRelay | None = None
        #: The cluster's side of this node's wills (cluster.wills), with JetStream.
        self.cluster_wills: Wills | None = None
        self.embedded_nats: EmbeddedNats | None = None
        #: The operator's bans (kept in the built-in database).
        self.bans = OperatorBans()
        self._login_bans: LoginBans | None = None
        #: The application's hooks (bastionmq.hooks).
        self.hooks = hooks if hooks is not None else Hooks()
        #: The observer hooks as the core calls them, while there are any.
        self.observers: Observers | None = None
        #: In-process subscribers (Broker.subscribe) still subscribed.
        self._local: set[LocalSubscriber] = set()
        self._local_ids = itertools.count(1)

    async def start(self) -> None:
        """Load everything the config names, then open the listeners; a
        problem stops start-up (ConfigError with key paths) before any port
        opens, and whatever was opened is closed again."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        # Which directory holds the data, and why: the one line that answers
        # "where did my sessions, users and certificates go".
        log.info("%s", config.node.data.describe())
        make_dev_pki_on_first_start(config)
        if _uses_database(config):
            try:
                self.database = await AuthDatabase.open(config.node.auth_database,
                                                        rule_check=check_rule)
            except AuthDatabaseError as exc:
                raise ConfigError([("node.data_dir", str(exc))]) from None
        if self.database is not None and any(
                _has_scram(config, block) for _, _, block in config.enabled_listeners()):
            self.auth_methods.setdefault("SCRAM-SHA-256", ScramSha256(self.database.get_scram))
        if self.database is not None:
            for ban in await self.database.list_bans():
                self.bans.add(ban)
        self.authn_stats = AuthStats()
        authenticator, identity = self._authentication(config)
        listeners = [_listener_plan(config, kind, name, block)
                     for kind, name, block in config.enabled_listeners()]
        self.authorization = _authorization(config, acl_sources(self.hooks))
        self.core = core = BrokerCore(config.mqtt, authenticator, loop, self.auth_methods,
                                      identity, self.authorization)
        core.certificate_parser = certificate_facts
        self._observe()
        if config.cluster.enable:
            await self._join_cluster(core)  # before the restore: it subscribes
        positions: dict[str, int] = {}
        if config.durable_sessions.enable:
            positions = await self._open_store(core)
        if self.bus is not None and self.bus.stream is not None:
            # What the stream stored while this node was down reaches the
            # sessions just restored, before any client connects.
            try:
                await self.bus.stream.start(positions.get(POSITION))
            except (JetStreamError, ClusterUnavailable, asyncio.TimeoutError) as exc:
                raise ConfigError([("cluster.nats.servers", "reading the stream of QoS 1/2 "
                                    f"messages: {exc or 'no answer in time'}")]) from None
        if self.bus is not None and self.bus.replica is not None:
            # The sessions restored here that went on elsewhere meanwhile go.
            try:
                await self.bus.replica.start()
            except (JetStreamError, ClusterUnavailable, asyncio.TimeoutError) as exc:
                raise ConfigError([("cluster.nats.servers", "checking this node's sessions "
                                    f"against the cluster's: {exc or 'no answer in time'}")]
                                  ) from None
        if config.sys_topics.sys_interval > 0:
            self._sys_topics = SysTopics(core, config.sys_topics.sys_interval,
                                         f"bastionmq {__version__}")
            self._sys_topics.start()
        ops = OpsServer(self, config.http_api) if config.http_api.enable else None
        for cls, name, block, extra in listeners:
            listener = cls(
                name, block.bind.host, block.bind.port, core,
                max_connections=block.max_connections, backlog=block.tcp_options.backlog,
                nodelay=block.tcp_options.nodelay,
                high_watermark=block.tcp_options.high_watermark,
                proxy=(ProxySettings.of(block.proxy_protocol_timeout, block.proxy_protocol_trusted)
                       if block.proxy_protocol else None),
                reuse_port=config.node.workers > 1, **extra)
            await listener.start()
            self.listeners[listener.id] = listener
        if ops is not None:
            self.ops = ops
            await ops.start()

    def _authentication(self, config: Config) -> tuple[BannedFirst, PeerIdentity | None]:
        """The authenticator the core asks (the operator's bans, then each
        listener's chain) and the certificate identity rules, for ``config``."""
        embedded = self._embedded_methods
        ban = config.authn_ban
        bans = self._login_bans
        if not ban.enable:
            bans = None
        elif bans is None or (bans.max_failures, bans.window, bans.ban_time, bans.by) != (
                ban.max_failures, ban.window, ban.ban_time, tuple(ban.by)):
            bans = LoginBans(ban.max_failures, ban.window, ban.ban_time, ban.by)
        chains = {}
        rules = {}
        authenticators_in_use: list[Any] = []
        stats = self.authn_stats
        assert stats is not None  # made by start()
        # The application's hooks, asked first on every listener.
        first = [HookAuthenticator(hook) for hook in self.hooks.authenticate]
        for kind, name, block in config.enabled_listeners():
            authenticators = _authenticators(config, kind, name, block, self.database)
            authenticators_in_use.extend(authenticators or ())
            methods = embedded | ({"SCRAM-SHA-256"} if _has_scram(config, block) else set())
            chains[f"{kind}:{name}"] = AuthenticationChain(
                config.anonymous_allowed(block), authenticators,
                block.enable_authn, stats, bans, frozenset(methods),
                config.hide_unknown_users, first)
            websocket = getattr(block, "websocket", None)
            if kind in TLS_KINDS or block.proxy_protocol or (
                    websocket is not None and websocket.proxy_client_cert.enable):
                # A load balancer's PROXY protocol header may vouch for a
                # certificate on any listener kind, a reverse proxy's header
                # on a ws listener.
                rules[f"{kind}:{name}"] = IdentityRule(*config.peer_cert_identity_of(block))
        self._authenticators = authenticators_in_use
        self._login_bans = bans

        def refused() -> None:
            stats.count("operator_ban", False)
        return (BannedFirst(ListenerAuthenticators(chains), self.bans, refused),
                PeerIdentity(rules) if rules else None)

    async def stop(self) -> None:
        """Stop accepting, disconnect every client (5.0: DISCONNECT 0x8B), close sockets."""
        if self.ops is not None:
            await self.ops.stop()
            self.ops = None
        for listener in self.listeners.values():
            listener.stop_accepting()
        if self._sys_topics is not None:
            self._sys_topics.stop()
            self._sys_topics = None
        for subscriber in list(self._local):
            subscriber.close()  # their iterations end
        self._local.clear()
        core = self.core
        if core is not None:
            core.close_all(Reason.SERVER_SHUTTING_DOWN, "broker shutting down")
            # Give transports one turn of the loop to flush and report closing.
            for _ in range(3):
                if not core.connections:
                    break
                await asyncio.sleep(0)
            core.observer = None
        if self.bus is not None and self.bus.replica is not None:
            # The sessions' copies say they are offline: another node may
            # resume them while this one is stopped.
            await self.bus.replica.stop()
            self.bus.replica = None
        if self.cluster_wills is not None:
            await self.cluster_wills.stop()  # the clients closed above had their wills discarded
            self.cluster_wills = None
        if self.bus is not None:
            await self.bus.close()  # after what closing the clients published
            self.bus = self.admin = None
            if core is not None:
                core.cluster = core.outboxes.before = core.outboxes.gate = None
        if self.embedded_nats is not None:
            await self.embedded_nats.stop()
            self.embedded_nats = None
        if self.observers is not None:
            await self.observers.stop()
            self.observers = None
        for listener in self.listeners.values():
            await listener.close()
        self.core = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.database is not None:
            await self.database.close()
            self.database = None

    async def _join_cluster(self, core: BrokerCore) -> None:
        """Start the embedded nats-server if asked, connect to NATS and
        become one node of the cluster."""
        cluster = self.config.cluster
        nats = cluster.nats
        if nats.embedded:
            self.embedded_nats = await start_embedded_nats(self.config)
        tls = None
        if nats.tls.enable:
            try:
                tls = build_client_context(nats.tls)
            except TlsSetupError as exc:
                raise ConfigError([(exc.key_path("cluster.nats.tls"), str(exc))]) from None
        bus = NatsBus(core, nats.addresses, cluster.name,
                      connect_timeout=nats.connect_timeout, credentials=nats.credentials,
                      tls=tls, server_name=nats.tls.server_name_indication,
                      heartbeat=cluster.heartbeat)
        if cluster.qos1_path == "stream":
            bus.stream = MessageStream(bus, core, replicas=cluster.replicas,
                                       retention=cluster.message_retention,
                                       duplicate_window=cluster.duplicate_window)
        try:
            await bus.start()
        except ClusterUnavailable as exc:
            raise ConfigError([("cluster.nats.servers", str(exc))]) from None
        self.bus = core.cluster = bus
        core.outboxes.before = bus.before_acks
        core.outboxes.gate = bus.stream
        bus.sessions = SessionMover(bus, core, cluster.takeover_timeout)
        self.admin = AdminRelay(bus, self)
        try:
            if bus.stream is not None:
                await bus.stream.prepare()
            loaded = await load_retained(bus, core, cluster.replicas)
            wills = Wills(bus, core, cluster.name)
            await wills.start(cluster.replicas)
            replica = SessionReplica(bus, core, cluster.replicas)
            await replica.prepare()
            bus.replica = replica
        except JetStreamError as exc:
            if exc.code != 503:
                raise ConfigError([("cluster.replicas", f"JetStream refused the cluster's "
                                    f"streams: {exc}")]) from None
            log.warning("QoS 1 and 2 messages between nodes are at most once, retained "
                        "messages set before this node started are not loaded, and the "
                        "wills of its clients are lost if it dies: %s", exc)
            if bus.stream is not None:
                bus.stream.close()
                bus.stream = core.outboxes.gate = None
        except (ClusterUnavailable, asyncio.TimeoutError) as exc:
            raise ConfigError([("cluster.nats.servers", "setting up the cluster's streams: "
                                f"{exc or 'no answer in time'}")]) from None
        else:
            self.cluster_wills = wills
            log.info("loaded %d retained messages from the cluster", loaded)

    async def _open_store(self, core: BrokerCore) -> dict[str, int]:
        """Open the durable store and restore what it holds into ``core``;
        the positions it kept (Journal.position_reached)."""
        durable = self.config.durable_sessions
        try:
            self.store = await SqliteStore.open(
                durable.database, batch_size=durable.batch_size,
                commit_interval=durable.commit_interval, synchronous=durable.synchronous)
            snapshot = await self.store.load(core.loop.time() - time.time())
        except StoreError as exc:
            raise ConfigError([("durable_sessions.data_dir", str(exc))]) from None
        core.use_journal(self.store.start(core.loop, core.outboxes.release_acks))
        report = restore(core, snapshot)
        log.info("%s", describe_restore(report, durable.database, snapshot.messages))
        return snapshot.positions

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def reload_authorization(self) -> bool:
        """Load the authorization sources again (what SIGHUP does) and forget
        every cached decision; on an error the previous rules stay."""
        chain = self.authorization
        if chain is None or self.core is None:
            return False
        try:
            chain.sources = [*acl_sources(self.hooks), *_acl_sources(self.config)]
        except ConfigError as exc:
            log.error("not reloading the authorization sources: %s; the previous rules stay",
                      exc)
            return False
        self._authorization_changed()
        log.info("reloaded the authorization sources")
        return True

    async def reload_config(self, why: str = "requested") -> ReloadReport:
        """What SIGHUP and the management API's reload do: read the
        configuration file again and apply what can change while running
        (bastionmq.reload says which keys), then load TLS material, password
        files and authorization rules again from disk. An invalid file
        changes nothing; the report says why, or which keys wait for a
        restart."""
        if self.core is None:
            raise RuntimeError("the broker is not started")
        report = ReloadReport()
        if self.config_file is not None:
            try:
                new = load_config(self.config_file, env=None if self.env else {})
                if self.adapt is not None:
                    new = self.adapt(new)
                effective, report = plan_reload(self.config, new)
                self._apply(effective, why)
            except ConfigError as exc:
                report = ReloadReport(errors=[f"{path}: {message}" for path, message in exc.errors])
                log.error("not reloading %s (%s): it is invalid, nothing changed:\n%s",
                          self.config_file, why, exc)
                return report
            if report.restart_required:
                log.warning("reloaded %s (%s); these keys changed but keep their running "
                            "values until a restart: %s", self.config_file, why,
                            ", ".join(report.restart_required))
            log.info("reloaded %s (%s): %s", self.config_file, why,
                     ", ".join(report.applied) if report.applied else "no live key changed")
        self.reload(why)
        return report

    def _apply(self, config: Config, why: str) -> None:
        """Run with ``config`` (a planned reload's effective config). What
        can fail is made first: a ConfigError leaves everything as it was."""
        core = self.core
        assert core is not None  # reload_config checks
        old = self.config
        authorization = _authorization(config, acl_sources(self.hooks))
        tls_changed: list[tuple[TlsListener, Any]] = []
        for listener in self.listeners.values():
            if not isinstance(listener, TlsListener):
                continue
            options = getattr(config.listeners, listener.kind)[listener.name].ssl_options
            if options != listener.options:
                try:
                    load_material(options, config.crl_cache, config.psk_authentication)
                except TlsSetupError as exc:
                    raise ConfigError([(exc.key_path(ssl_options_path(listener.kind,
                                                                      listener.name)),
                                        str(exc))]) from None
                tls_changed.append((listener, options))
        # Last of what can fail, since it also sets the chains' state aside.
        authenticator, identity = self._authentication(config)
        if self.manages_logging and config.log != old.log:
            try:
                configure_logging(config.log)
            except OSError as exc:
                raise ConfigError([("log.file.path", str(exc))]) from None
        self.config = config
        core.authenticator = authenticator
        core.identity = identity
        core.apply_settings(config.mqtt)
        if authorization is not None and core.access is not None:
            self.authorization = authorization
            core.access.use(authorization)
            self._authorization_changed()
        for listener in self.listeners.values():
            listener.max_connections = getattr(
                config.listeners, listener.kind)[listener.name].max_connections
        for listener, options in tls_changed:
            listener.options = options  # reload() below loads and installs it

    def _authorization_changed(self) -> None:
        """Forget every cached decision: the rules, or who clients are, changed."""
        core = self.core
        assert core is not None
        for connection in core.connections:
            if connection.access_cache is not None:
                connection.access_cache.clear()
        core.access_changed()

    def kick(self, client_id: str, why: str, reason: int = Reason.ADMINISTRATIVE_ACTION,
             end_session: bool = True) -> bool:
        """Disconnect a client (5.0: DISCONNECT with ``reason``, by default
        0x98, administrative action, and ``why`` as its Reason String) and,
        with ``end_session``, end its session, as EMQX's kick does; False
        when there is none (with ``end_session``: no session; without: no
        connected client)."""
        core = self.core
        if core is None:
            raise RuntimeError("the broker is not started")
        reason = Reason(reason)  # ValueError for a code MQTT 5.0 does not define
        if reason != Reason.SUCCESS and reason < 0x80:
            raise ValueError(f"{reason.name} (0x{reason:02X}) is no reason a server "
                             "disconnects with (0x00, or 0x80 and above)")
        session = core.sessions.get(client_id)
        if session is None or (not end_session and session.connection is None):
            return False
        log.info("%s client %s: %s", "kicking" if end_session else "disconnecting",
                 shown(client_id), why or reason.name.lower().replace("_", " "))
        if session.connection is not None:
            session.connection.close(reason, why)
        if end_session:
            session = core.sessions.get(client_id)
            if session is not None:
                core.end_session(session)
        core.outboxes.flush()
        return True

    async def disconnect(self, client_id: str, reason: int = Reason.ADMINISTRATIVE_ACTION,
                         why: str = "") -> bool:
        """Disconnect a connected client (5.0: DISCONNECT with ``reason``
        and ``why`` as its Reason String); its session stays as its expiry
        says (``kick`` ends it). False when no client of that id is
        connected."""
        disconnected = self.kick(client_id, why, reason, end_session=False)
        await asyncio.sleep(0)  # the transport writes what close() left it
        return disconnected

    @property
    def clients(self) -> Mapping[str, ConnectedClient]:
        """The connected clients by client id (a read-only snapshot; the
        application's in-process subscribers are not among them)."""
        core = self.core
        if core is None:
            return MappingProxyType({})
        now = time.time()
        return MappingProxyType({
            connection.client_id: ConnectedClient.of(connection, now)
            for connection in core.connections if connection.client_info is not None})

    # ------------------------------------------------------- in-process subscribers

    def subscribe(self, topic_filter: str, qos: int = 0, *, queue_size: int = DEFAULT_LIMIT,
                  trusted: bool = True, username: str | None = None,
                  client_id: str | None = None) -> LocalSubscription:
        """Subscribe in-process; subscribed when this returns::

            async for message in broker.subscribe("sensors/#", qos=1):
                ...  # message.topic, .payload, .qos, .retain, .properties

        or ``async with broker.subscribe(...) as subscription`` and
        ``await subscription.get()``. It routes as a client would (retained
        messages, ``$share/group/filter``); ``queue_size`` bounds what waits
        for the application, which then holds publishers back and, when slow
        for ``mqtt.slow_subscriber_timeout``, loses its oldest messages, as
        a network client (broker/local.py). ``trusted`` (the default)
        subscribers are superusers; with ``trusted=False`` the authorization
        chain decides for ``username`` on listener "local", as for a
        client. Raises ValueError for a filter a client could not use and
        PermissionError when authorization denies it (an async authorize
        hook's denial: from the first ``get`` or the iteration)."""
        core = self.core
        if core is None:
            raise RuntimeError("the broker is not started")
        if client_id is None:
            client_id = f"bastionmq-local-{next(self._local_ids)}"
        subscriber = LocalSubscriber(core, client_id, username, trusted, queue_size)
        try:
            subscriber.subscribe(topic_filter, qos)
        except BaseException:
            subscriber.close()
            raise
        self._local.add(subscriber)
        subscriber.on_close = self._local.discard
        return LocalSubscription(subscriber)

    # ------------------------------------------------------- hooks

    def authenticate(self, hook: HookT) -> HookT:
        """Decorator: ``hook(client) -> "allow" | "deny" | "ignore"``, plain
        or async, asked (after the hooks before it) before the configured
        authenticators of every listener; ``client`` is the connecting
        client (ports.AuthRequest)."""
        self.hooks.authenticate.append(hook)
        self._chains_changed()
        return hook

    def authorize(self, hook: HookT) -> HookT:
        """Decorator: ``hook(client, action, topic) -> "allow" | "deny" |
        "ignore"``, plain or async, asked before the configured
        authorization sources; ``action`` is "publish" or "subscribe" (also
        asked for reading a topic a subscription matches). What an async
        hook decides waits for its answer (docs/embedding.md)."""
        check_authorize_hook(hook)
        self.hooks.authorize.append(hook)
        self._chains_changed()
        return hook

    def on_message(self, hook: HookT) -> HookT:
        """Decorator: ``hook(message)`` for each message routed
        (broker.local.LocalMessage, with the publisher's client id)."""
        self.hooks.on_message.append(hook)
        self._observe()
        return hook

    def on_connect(self, hook: HookT) -> HookT:
        """Decorator: ``hook(client)`` (hooks.ConnectedClient) for each CONNECT accepted."""
        self.hooks.on_connect.append(hook)
        self._observe()
        return hook

    def on_disconnect(self, hook: HookT) -> HookT:
        """Decorator: ``hook(client, reason)`` when a connected client has gone."""
        self.hooks.on_disconnect.append(hook)
        self._observe()
        return hook

    def hook_stats(self) -> Mapping[str, int]:
        """Async observer calls waiting and dropped, and observer exceptions."""
        return hook_stats(self.observers)

    def _observe(self) -> None:
        """Give the running core the observers the hooks have now."""
        core = self.core
        if core is None:
            return
        if not self.hooks.observes:
            return
        if self.observers is None:
            self.observers = Observers(self.hooks, time.time)
            self.observers.start(core.loop)
        else:
            self.observers.update(self.hooks)
        core.observer = self.observers

    def _chains_changed(self) -> None:
        """Hooks joined the chains of a running broker: build them again."""
        core = self.core
        if core is None:
            return  # start() builds them
        core.authenticator, core.identity = self._authentication(self.config)
        chain = _authorization(self.config, acl_sources(self.hooks))
        if chain is None:
            return
        self.authorization = chain
        if core.access is None:
            core.access = AccessControl(chain, core.loop)
            for connection in core.connections:
                connection.access_cache = core.access.new_cache()
        else:
            core.access.use(chain)
        self._authorization_changed()

    async def ban(self, ban: Ban) -> Ban:
        """Ban a client id, username or peer address (kept in the built-in
        database) and disconnect the connected clients it names."""
        if self.database is None or self.core is None:
            raise RuntimeError("bans need the broker started with its built-in database")
        ban = await self.database.add_ban(ban)
        log.info("banned %s %s%s (by %s)", ban.kind, shown(ban.value),
                 f": {ban.reason}" if ban.reason else "", ban.by or "?")
        self.apply_ban(ban)
        if self.admin is not None:
            self.admin.banned(ban)  # the client may be connected to another node
        return ban

    def apply_ban(self, ban: Ban) -> None:
        """Refuse from now on, and disconnect, the clients ``ban`` names
        (made here, or on another node of the cluster)."""
        self.bans.add(ban)
        if self.core is None:
            return
        for connection in list(self.core.connections):
            client = connection.client_info
            if client is not None and self.bans.ban_of(
                    client.client_id, client.username, client.peer.host) is ban:
                connection.close(Reason.ADMINISTRATIVE_ACTION, f"{ban.kind} banned")

    async def unban(self, kind: str, value: str) -> None:
        if self.database is None:
            raise RuntimeError("bans need the broker started with its built-in database")
        await self.database.delete_ban(kind, value)
        self.bans.remove(kind, value)
        log.info("lifted the ban of %s %s", kind, shown(value))
        if self.admin is not None:
            self.admin.unbanned(kind, value)

    def rules_changed(self) -> bool:
        """The built-in database's rules changed (the management API): load
        them again here and on every other node (reload_authorization)."""
        if self.admin is not None:
            self.admin.rules_changed()
        return self.reload_authorization()

    def reload(self, why: str = "SIGHUP") -> None:
        """TLS material, password files and authorization rules, again from
        disk; what does not load keeps its previous state."""
        self.reload_tls(why)
        for authenticator in self._authenticators:
            reload = getattr(authenticator, "reload", None)
            if reload is not None:
                try:
                    reload()
                except (OSError, ValueError) as exc:
                    log.error("not reloading %s: %s; the previous contents stay",
                              authenticator.name, exc)
        self.reload_authorization()

    def reload_tls(self, why: str = "requested") -> dict[str, bool]:
        """Load every TLS listener's files again (what SIGHUP does); returns
        each listener's success. A listener whose new files do not check out
        keeps serving with the old ones."""
        return {listener.id: listener.reload(why) for listener in self.listeners.values()
                if isinstance(listener, TlsListener)}

    async def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                      properties: Mapping[str, Any] | None = None) -> int:
        """Publish a message into the broker; returns how many subscriptions
        matched. With durable sessions, a QoS 1/2 or retained message is
        stored when this returns."""
        if self.core is None:
            raise RuntimeError("the broker is not started")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        matched = self.core.publish(topic, payload, qos, retain, properties)
        if self.store is not None and (qos or retain):
            await self.store.committed()  # what it promises is on disk
        return matched
