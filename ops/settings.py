"""The settings of the operations listener (``http_api``)."""

from __future__ import annotations

import attrs

from bastionmq.listeners.settings import Bind, SslOptions


@attrs.define(slots=True, frozen=True, kw_only=True)
class HttpApiConfig:
    """The operations listener: Prometheus metrics and health checks over HTTP."""

    enable: bool = False
    #: Loopback by default: what it shows is for the operator of this machine.
    bind: Bind = Bind("127.0.0.1", 18083)
    #: HTTPS, with the ssl_options of the MQTT TLS listeners (verify_peer and
    #: fail_if_no_peer_cert ask the operator's tools for a client
    #: certificate); unset serves plain HTTP.
    ssl_options: SslOptions | None = None
