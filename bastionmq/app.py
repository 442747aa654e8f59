"""Builds a running broker from a Config: the core, its listeners, the auth chain."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Iterable, Mapping

import bastionmq
from bastionmq.auth.chain import AuthenticationChain, ListenerAuthenticators
from bastionmq.auth.identity import IdentityRule, PeerIdentity
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.ports import AuthMethod
from bastionmq.broker.properties import Reason
from bastionmq.broker.sys_topics import SysTopics
from bastionmq.config import Config, ConfigError, SslOptions, load_config
from bastionmq.listeners.base import Listener
from bastionmq.listeners.tls import TlsListener, TlsSetupError, load_material
from bastionmq.pki import DEFAULT_DIR, init_pki

log = logging.getLogger("bastionmq")

ConfigSource = Config | str | os.PathLike


def resolve_config(config: ConfigSource | None) -> Config:
    """A Config from a Config, a file path or a HOCON string."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, os.PathLike):
        return load_config(config)
    if "\n" in config or "{" in config or "=" in config:
        return load_config(text=config)
    return load_config(config)


def _listener_plan(config: Config, kind: str, name: str,
                   block: Any) -> tuple[type[Listener], str, Any, dict]:
    """What a listener needs besides its socket options; TLS material is
    loaded here, before any port opens, so a bad file stops start-up."""
    if kind == "tcp":
        return Listener, name, block, {}
    options = block.ssl_options
    try:
        material = load_material(options, config.crl_cache, config.psk_authentication)
    except TlsSetupError as exc:
        raise ConfigError([(exc.key_path(name), str(exc))]) from None
    return TlsListener, name, block, {"options": options, "crl_cache": config.crl_cache,
                                      "psk": config.psk_authentication, "material": material}


def _make_dev_pki_on_first_start(config: Config) -> None:
    """When a TLS listener uses the development PKI's default paths and none
    of its files exists yet, make that PKI, so the shipped config starts."""
    defaults = SslOptions()
    default_files = (defaults.cacertfile, defaults.certfile, defaults.keyfile)
    for _kind, _name, block in config.enabled_listeners():
        options = getattr(block, "ssl_options", None)
        if options is not None and (options.cacertfile, options.certfile, options.keyfile) == default_files:
            if not any(os.path.exists(path) for path in default_files):
                init_pki(DEFAULT_DIR)
                log.warning(
                    "made a development PKI in %s (CA, server certificate for localhost, "
                    "127.0.0.1 and ::1, empty CRL): fine for trying the broker, not for "
                    "production. Issue a client certificate with: bastionmq certs client NAME",
                    DEFAULT_DIR.resolve())
            return


class Broker:
    """A broker an application can embed::

        async with Broker("listeners.tcp.default.bind = \\"127.0.0.1:0\\"") as broker:
            host, port = broker.listeners["tcp:default"].address
            await broker.publish("greeting", b"hello")

    ``auth_methods`` adds MQTT 5.0 enhanced authentication methods, for
    example ``ScramSha256`` from bastionmq.auth.scram.
    """

    def __init__(self, config: ConfigSource | None = None,
                 auth_methods: Iterable[AuthMethod] = ()) -> None:
        self.config = resolve_config(config)
        self.auth_methods = {method.name: method for method in auth_methods}
        self.core: BrokerCore | None = None
        #: Listener id ("tcp:default") -> Listener, once started.
        self.listeners: dict[str, Listener] = {}
        self._sys_topics: SysTopics | None = None

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        _make_dev_pki_on_first_start(config)
        chains = {}
        rules = {}
        listeners: list[tuple[type[Listener], str, Any, dict[str, Any]]] = []
        for kind, name, block in config.enabled_listeners():
            chains[f"{kind}:{name}"] = AuthenticationChain(config.anonymous_allowed(block))
            listeners.append(_listener_plan(config, kind, name, block))
            if kind == "ssl":
                rules[f"{kind}:{name}"] = IdentityRule(*config.peer_cert_identity_of(block))
        self.core = core = BrokerCore(config.mqtt, ListenerAuthenticators(chains), loop,
                                      self.auth_methods,
                                      PeerIdentity(rules) if rules else None)
        if config.sys_topics.sys_interval > 0:
            self._sys_topics = SysTopics(core, config.sys_topics.sys_interval,
                                         f"bastionmq {bastionmq.__version__}")
            self._sys_topics.start()
        try:
            for cls, name, block, extra in listeners:
                listener = cls(
                    name, block.bind.host, block.bind.port, core,
                    max_connections=block.max_connections, backlog=block.tcp_options.backlog,
                    nodelay=block.tcp_options.nodelay,
                    high_watermark=block.tcp_options.high_watermark, **extra)
                await listener.start()
                self.listeners[listener.id] = listener
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting, disconnect every client (5.0: DISCONNECT 0x8B), close sockets."""
        for listener in self.listeners.values():
            listener.stop_accepting()
        if self._sys_topics is not None:
            self._sys_topics.stop()
            self._sys_topics = None
        core = self.core
        if core is not None:
            core.close_all(Reason.SERVER_SHUTTING_DOWN, "broker shutting down")
            # Give transports one turn of the loop to flush and report closing.
            for _ in range(3):
                if not core.connections:
                    break
                await asyncio.sleep(0)
        self.core = None

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def reload_tls(self, why: str = "requested") -> dict[str, bool]:
        """Load every TLS listener's files again (what SIGHUP does); returns
        each listener's success. A listener whose new files do not check out
        keeps serving with the old ones."""
        return {listener.id: listener.reload(why) for listener in self.listeners.values()
                if isinstance(listener, TlsListener)}

    async def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                      properties: Mapping[str, Any] | None = None) -> int:
        """Publish a message into the broker; returns how many subscriptions matched."""
        if self.core is None:
            raise RuntimeError("the broker is not started")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        return self.core.publish(topic, payload, qos, retain, properties)
