"""The settings of the operations listener (``http_api``)."""

from __future__ import annotations

import ipaddress

import attrs

from bastionmq.listeners.settings import Bind, SslOptions


@attrs.define(slots=True, frozen=True, kw_only=True)
class HttpApiConfig:
    """The operations listener: Prometheus metrics, health checks and the
    management API over HTTP(S)."""

    enable: bool = False
    #: Loopback by default: what it shows is for the operator of this machine.
    bind: Bind = Bind("127.0.0.1", 18083)
    #: HTTPS, with the ssl_options of the MQTT TLS listeners (verify_peer and
    #: fail_if_no_peer_cert ask the operator's tools for a client
    #: certificate); unset serves plain HTTP.
    ssl_options: SslOptions | None = None
    #: Requests without an API key are served as an admin's, but only while
    #: ``bind`` is a loopback address: anyone who can reach it is on this machine.
    allow_loopback_without_key: bool = False
    #: /metrics needs no key, as Prometheus scrapes exporters; false asks for one.
    metrics_public: bool = True

    @property
    def loopback(self) -> bool:
        """Whether ``bind`` accepts connections from this machine only."""
        host = self.bind.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
