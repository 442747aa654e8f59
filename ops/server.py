"""The operations listener: an aiohttp server in the broker's own event loop.

``/metrics`` is the Prometheus text format (the broker's figures, and the
process's own); ``/healthz`` answers while the process runs, ``/readyz``
while the broker is started and every listener accepts; ``/api/v1/`` is the
management API (ops/api.py).

Access: the health checks and the OpenAPI document are open to whoever
reaches the listener, /metrics too while ``metrics_public``; everything
else needs an API key (``Authorization: Bearer KEY``) whose role allows it,
except on a loopback bind with ``allow_loopback_without_key``.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from bastionmq.config import ConfigError
from bastionmq.listeners.tls_context import TlsSetupError, build_context

from .api import PREFIX, ManagementApi, error_response
from .keys import ADMIN, REQUEST_KEY, VIEWER, key_hash
from .metrics import BrokerCollector
from .openapi import openapi_document
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
        #: The role each API route needs, by aiohttp route.
        self._roles: dict[Any, str] = {}
        public = {"/healthz", "/readyz", PREFIX + "/openapi.json"}
        if settings.metrics_public:
            public.add("/metrics")
        self._public = frozenset(public)
        self._keyless = settings.allow_loopback_without_key and settings.loopback
        if settings.allow_loopback_without_key and not settings.loopback:
            log.warning("http_api.allow_loopback_without_key is ignored: http_api.bind %s is "
                        "not a loopback address, so every request needs an API key",
                        settings.bind)

    async def start(self) -> None:
        app = web.Application(middlewares=[self._access])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get(PREFIX + "/openapi.json", self._openapi)
        for endpoint, handler in ManagementApi(self.broker).routes():
            resource = app.router.add_route(endpoint.method, PREFIX + endpoint.path, handler)
            self._roles[resource] = endpoint.role
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
        log.info("operations listener on %s://%s:%d (/metrics, /healthz, /readyz, %s/)",
                 self.scheme, *self.address, PREFIX)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    @web.middleware
    async def _access(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Who may do what: see the module's docstring."""
        if request.path in self._public:
            return await handler(request)
        role = self._roles.get(request.match_info.route, VIEWER)
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if not header and self._keyless:
            REQUEST_KEY.set("(loopback, no key)")
            return await handler(request)
        if scheme.lower() != "bearer" or not key.strip():
            return error_response(
                401, "NO_KEY", "this needs an API key: 'Authorization: Bearer KEY' "
                "(bastionmq ctl api-key create NAME)")
        database = self.broker.database
        found = None if database is None else await database.find_api_key(key_hash(key.strip()))
        if found is None:
            log.warning("operations listener: refused %s %s from %s: unknown API key",
                        request.method, request.path, request.remote)
            return error_response(401, "BAD_KEY", "unknown API key")
        if role == ADMIN and found.role != ADMIN:
            log.warning("operations listener: refused %s %s to key %s (role %s)",
                        request.method, request.path, found.name, found.role)
            return error_response(403, "FORBIDDEN",
                            f"key {found.name!r} has role {found.role}; this needs {role}")
        REQUEST_KEY.set(found.name)
        return await handler(request)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

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
