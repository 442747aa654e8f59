"""The operations listener: an aiohttp server in the broker's own event loop.

``/metrics`` is the Prometheus text format (the broker's figures, and the
process's own); ``/healthz`` answers while the process runs, ``/readyz``
while the broker is started and every listener accepts.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from bastionmq.config import ConfigError
from bastionmq.listeners.tls_context import TlsSetupError, build_context

from .metrics import BrokerCollector
from .settings import HttpApiConfig

log = logging.getLogger("bastionmq.ops")


class OpsServer:
    """Serves ``broker``'s metrics and health on ``settings.bind``."""

    def __init__(self, broker: Any, settings: HttpApiConfig) -> None:
        self.broker = broker
        self.settings = settings
        # A registry of its own: embedding applications keep the global one.
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(BrokerCollector(broker))
        ProcessCollector(registry=self.registry)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        #: (host, port) bound, once started, and http or https.
        self.address: tuple[str, int] | None = None
        # Made here, before any port opens: a bad ssl_options stops start-up.
        self._context = None
        options = settings.ssl_options
        if options is not None:
            try:
                self._context = build_context(options)
            except TlsSetupError as exc:
                raise ConfigError([(exc.key_path("http_api.ssl_options"), str(exc))]) from None
        self.scheme = "https" if self._context is not None else "http"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        bind = self.settings.bind
        self._site = web.TCPSite(runner, bind.host, bind.port, ssl_context=self._context)
        try:
            await self._site.start()
        except OSError as exc:
            await self.stop()
            raise OSError(exc.errno, f"http_api.bind {bind}: {exc.strerror or exc}") from None
        sockets = runner.addresses
        self.address = tuple(sockets[0][:2]) if sockets else (bind.host, bind.port)
        log.info("operations listener on %s://%s:%d (/metrics, /healthz, /readyz)",
                 self.scheme, *self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        broker = self.broker
        waiting = [] if broker.core is not None else ["the broker is not started"]
        waiting += [f"listener {listener_id} is not accepting"
                    for listener_id, listener in sorted(broker.listeners.items())
                    if not listener.accepting]
        if waiting:
            return web.json_response({"status": "not ready", "waiting": waiting}, status=503)
        return web.json_response({"status": "ready"})
