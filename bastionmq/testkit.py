"""An embedded broker and a throwaway PKI for tests, with or without pytest.

``RunningBroker`` runs a Broker in a thread of its own with its own event
loop, so that a threaded client (paho-mqtt) and an asyncio client in another
loop both simply connect to its address. ``Pki`` makes CA, server and client
certificates and a CRL with the code behind ``bastionmq certs``.

The pytest fixtures built on these are in bastionmq.testing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import ssl
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from bastionmq import pki
from bastionmq.app import Broker, resolve_config
from bastionmq.config import Bind

if TYPE_CHECKING:
    import os

    from bastionmq.config import Config

__all__ = [
    "BrokerFactory", "ClientCert", "DEFAULT_CONFIG", "Pki", "RunningBroker", "ServerCert",
    "TIMEOUT", "embedded_config", "new_pki",
]

T = TypeVar("T")

#: How long starting, stopping and each ``call`` may take before the test fails.
TIMEOUT = 10.0
#: ``mqtt_broker``'s configuration: one anonymous TCP listener.
DEFAULT_CONFIG = """
listeners.tcp.default { bind = "127.0.0.1:0" }
allow_anonymous = true
"""

_names = itertools.count(1)


# ------------------------------------------------------------------ the broker


class RunningBroker:
    """A Broker started in a background thread with its own event loop.

    ``call`` runs a coroutine in the broker's loop and ``run`` a plain
    function in its thread: the broker's state belongs to that thread.
    """

    def __init__(self, config: Config | str | os.PathLike[str] | None = None, *,
                 name: str | None = None, timeout: float = TIMEOUT,
                 **broker_options: Any) -> None:
        """``config``: a Config, a HOCON text or a file (None: DEFAULT_CONFIG);
        ``broker_options`` go to Broker (``auth_methods``)."""
        self.timeout = timeout
        self.name = name or f"bastionmq-broker-{next(_names)}"
        self.broker: Broker = Broker(DEFAULT_CONFIG if config is None else config,
                                     **broker_options)
        self.loop = _new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # A daemon thread: a test that hangs must not also keep the process alive.
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name} did not start within {timeout}s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.broker.start())
        except BaseException as exc:  # raised again in the test's thread
            self._error = exc
            self.loop.close()
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    # -------------------------------------------------------------- addresses

    @property
    def default_listener(self) -> str:
        """``tcp:default`` when there is one, else the first listener started."""
        listeners = self.broker.listeners
        if "tcp:default" in listeners:
            return "tcp:default"
        if not listeners:
            raise LookupError(f"{self.name} has no listener")
        return next(iter(listeners))

    def address_of(self, listener_id: str) -> tuple[str, int]:
        """(host, port) a client connects to, for a listener id like ``ssl:default``."""
        try:
            listener = self.broker.listeners[listener_id]
        except KeyError:
            raise LookupError(f"{self.name} has no listener {listener_id!r}; it has "
                              f"{', '.join(self.broker.listeners) or 'none'}") from None
        host, port = listener.address[:2]
        # A listener on every interface is reached on loopback.
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port

    def port_of(self, listener_id: str) -> int:
        return self.address_of(listener_id)[1]

    @property
    def address(self) -> tuple[str, int]:
        return self.address_of(self.default_listener)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def client_args(self, listener_id: str | None = None) -> dict[str, Any]:
        """``host`` and ``port`` of a listener (default: ``default_listener``),
        as paho-mqtt's ``connect(**args)`` takes them."""
        host, port = self.address_of(listener_id or self.default_listener)
        return {"host": host, "port": port}

    # -------------------------------------------------------------- the broker's loop

    @property
    def core(self) -> Any:
        return self.broker.core

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` in the broker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(self.timeout)

    async def acall(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """``call`` for an async test: its own loop keeps running meanwhile."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)

    def run(self, function: Callable[[], T]) -> T:
        """Run a plain function in the broker's thread (to read or change its state)."""
        async def in_loop() -> T:
            return function()
        return self.call(in_loop())

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, properties: Mapping[str, Any] | None = None) -> int:
        """Publish from the broker itself; returns how many subscriptions matched."""
        return self.call(self.broker.publish(topic, payload, qos, retain, properties))

    async def apublish(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                       retain: bool = False,
                       properties: Mapping[str, Any] | None = None) -> int:
        """``publish`` for an async test."""
        return await self.acall(self.broker.publish(topic, payload, qos, retain, properties))

    def reload_tls(self) -> dict[str, bool]:
        """Load every TLS listener's files again now (a new CRL, say) rather
        than at its next ``watch_interval`` check; listener id -> success."""
        return self.run(lambda: self.broker.reload_tls("requested by a test"))

    def stop(self) -> None:
        """Disconnect every client, close the listeners, end the thread."""
        if self.loop.is_running():
            self.call(self.broker.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self.timeout)

    def __repr__(self) -> str:
        listeners = ", ".join(f"{lid}={host}:{port}" for lid, (host, port) in
                              ((lid, self.address_of(lid)) for lid in self.broker.listeners))
        return f"<RunningBroker {self.name} {listeners or 'stopped'}>"


def _new_event_loop() -> asyncio.AbstractEventLoop:
    # uvloop, as the standalone broker uses, where it is installed.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def embedded_config(config: Config | str | os.PathLike[str] | None = None,
                    data_dir: str | os.PathLike[str] | None = None) -> Config:
    """A Config for a broker in a test, so that a test neither takes a fixed
    port nor writes into the project: ``config`` (None: DEFAULT_CONFIG) with
    every listener that leaves ``bind`` at its default on 127.0.0.1:0 and,
    for a HOCON text that sets no ``node.data_dir``, ``data_dir`` as that."""
    if config is None:
        config = DEFAULT_CONFIG
    if data_dir is not None and _is_hocon_text(config):
        # First, so that the text's own node.data_dir, if any, wins (HOCON:
        # the later value of a key replaces the earlier).
        config = f"node.data_dir = {json.dumps(str(data_dir))}\n{config}"
    resolved = resolve_config(config, env=False)
    ephemeral = Bind("127.0.0.1", 0)

    def bound(blocks: dict[str, Any]) -> dict[str, Any]:
        return {name: attrs.evolve(block, bind=ephemeral)
                if block.bind == attrs.fields(type(block)).bind.default else block
                for name, block in blocks.items()}

    listeners = resolved.listeners
    return attrs.evolve(resolved, listeners=attrs.evolve(
        listeners, tcp=bound(listeners.tcp), ssl=bound(listeners.ssl),
        ws=bound(listeners.ws), wss=bound(listeners.wss)))


def _is_hocon_text(config: object) -> bool:
    # Broker's rule for telling a configuration text from a file name.
    return isinstance(config, str) and any(c in config for c in "\n{=")


@attrs.define(slots=True)
class BrokerFactory:
    """``mqtt_broker_factory``: starts brokers and stops them all at teardown."""

    data_dir: Path
    started: list[RunningBroker] = attrs.field(factory=list)

    def __call__(self, config: Config | str | os.PathLike[str] | None = None, *,
                 name: str | None = None, **broker_options: Any) -> RunningBroker:
        """A running broker from ``config`` (see ``embedded_config``);
        ``broker_options`` go to Broker (``auth_methods``)."""
        index = len(self.started) + 1
        data_dir = self.data_dir / f"broker-{index}"
        data_dir.mkdir(parents=True, exist_ok=True)
        broker = RunningBroker(embedded_config(config, data_dir), name=name,
                               **broker_options)
        self.started.append(broker)
        return broker

    def stop_all(self) -> None:
        """Stop every broker, the last started first; should one fail to
        stop, the others are stopped all the same and its error raised then."""
        errors: list[Exception] = []
        while self.started:
            try:
                self.started.pop().stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# ------------------------------------------------------------------ certificates


@attrs.define(slots=True, frozen=True)
class ClientCert:
    """A client certificate and a client context that presents it."""

    cn: str
    cert: Path
    key: Path
    #: Trusts the test CA (and checks the server's name), presents ``cert``.
    context: ssl.SSLContext


@attrs.define(slots=True, frozen=True)
class ServerCert:
    hosts: tuple[str, ...]
    cert: Path
    key: Path


@attrs.define(slots=True)
class Pki:
    """A throwaway CA, made by the code behind ``bastionmq certs``."""

    directory: Path
    #: The certificate init_pki made, for localhost, 127.0.0.1 and ::1.
    default_server: ServerCert
    #: Numbers the files of further certificates.
    _issued: int = attrs.field(default=0, init=False)

    @property
    def ca(self) -> Path:
        return self.directory / pki.CA_CERT

    @property
    def crl(self) -> Path:
        """The CRL, present (empty) from the start; ``revoke`` re-signs it."""
        return self.directory / pki.CRL

    def server(self, hosts: Sequence[str] = ()) -> ServerCert:
        """The server certificate, for localhost, 127.0.0.1 and ::1; with
        ``hosts``, another one for those names only."""
        if not hosts:
            return self.default_server
        self._issued += 1
        files = pki.issue_server(self.directory, f"server-{self._issued}", hosts)
        return ServerCert(tuple(hosts), files.cert, files.key)

    def client(self, cn: str, **options: Any) -> ClientCert:
        """A client certificate with CN=``cn``; ``options`` go to
        bastionmq.pki.issue_client (days, not_after, san_dns, extra_subject...)."""
        self._issued += 1
        # Any CN, even one that is no file name, gets files of its own.
        stem = self.directory / f"client-{self._issued}-{re.sub(r'[^A-Za-z0-9._@-]', '_', cn)}"
        files = pki.issue_client(self.directory, cn, output=stem, **options)
        return ClientCert(cn, files.cert, files.key, self.context(files.cert, files.key))

    def context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA; with ``cert``/``key``, presents them."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(cert, key)
        return context

    def revoke(self, cert: ClientCert | ServerCert | Path, reason: str = "unspecified") -> Path:
        """Put ``cert`` on the CRL. A running broker sees it at its next
        ``watch_interval`` check, or at once after ``reload_tls()``."""
        return pki.revoke(self.directory, cert if isinstance(cert, Path) else cert.cert, reason)

    def ssl_listener(self, name: str = "default", *, verify: str = "verify_peer",
                     fail_if_no_peer_cert: bool = True, crl: bool = True,
                     server: ServerCert | None = None,
                     options: Mapping[str, Any] | None = None) -> str:
        """HOCON for ``listeners.ssl.<name>`` on 127.0.0.1:0 with this PKI's
        files: mutual TLS and the CRL checked, unless told otherwise.
        ``options`` adds to ssl_options (``{"depth": 2}``)."""
        server = server or self.server()
        mutual = verify == "verify_peer"
        settings: dict[str, Any] = {
            "cacertfile": str(self.ca), "certfile": str(server.cert), "keyfile": str(server.key),
            "verify": verify, "fail_if_no_peer_cert": fail_if_no_peer_cert and mutual,
            "enable_crl_check": crl and mutual,
            **({"crlfile": str(self.crl)} if crl and mutual else {}),
            **(options or {}),
        }
        # JSON values are HOCON values, quoted and escaped as it expects.
        body = "\n".join(f"    {key} = {json.dumps(value)}" for key, value in settings.items())
        return (f'listeners.ssl.{name} {{\n  bind = "127.0.0.1:0"\n'
                f"  ssl_options {{\n{body}\n  }}\n}}\n")




def new_pki(directory: Path) -> Pki:
    """A fresh CA in ``directory`` with a server certificate and an empty CRL."""
    files = pki.init_pki(directory)
    return Pki(directory, ServerCert(("localhost", "127.0.0.1", "::1"), files.cert, files.key))
