"""Builds a running broker from a Config: the core, its listeners, the auth chain."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Iterable, Mapping

import bastionmq
from bastionmq.auth.chain import AuthenticationChain, ListenerAuthenticators
from bastionmq.broker.core import BrokerCore
from bastionmq.broker.ports import AuthMethod
from bastionmq.broker.properties import Reason
from bastionmq.broker.sys_topics import SysTopics
from bastionmq.config import Config, load_config
from bastionmq.listeners.base import Listener

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
        chains = {}
        listeners = []
        for name, tcp in config.listeners.tcp.items():
            if not tcp.enable:
                continue
            chains[f"tcp:{name}"] = AuthenticationChain(config.anonymous_allowed(tcp))
            listeners.append((name, tcp))
        self.core = core = BrokerCore(config.mqtt, ListenerAuthenticators(chains), loop,
                                      self.auth_methods)
        if config.sys_topics.sys_interval > 0:
            self._sys_topics = SysTopics(core, config.sys_topics.sys_interval,
                                         f"bastionmq {bastionmq.__version__}")
            self._sys_topics.start()
        try:
            for name, tcp in listeners:
                listener = Listener(
                    name, tcp.bind.host, tcp.bind.port, core,
                    max_connections=tcp.max_connections, backlog=tcp.tcp_options.backlog,
                    nodelay=tcp.tcp_options.nodelay, high_watermark=tcp.tcp_options.high_watermark)
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

    async def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                      properties: Mapping[str, Any] | None = None) -> int:
        """Publish a message into the broker; returns how many subscriptions matched."""
        if self.core is None:
            raise RuntimeError("the broker is not started")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        return self.core.publish(topic, payload, qos, retain, properties)
