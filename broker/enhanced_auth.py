"""Enhanced authentication (MQTT 5.0, 4.12): the AUTH exchange of one
connection, at CONNECT and whenever the client re-authenticates.

A method (ports.AuthMethod) begins a conversation per exchange; each step it
takes may be computed at once or awaited (a database, another service).
While a step is awaited the client must wait for its answer; an AUTH that
comes out of turn is a protocol error.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Protocol

import attrs

from .codec import Auth, Connect
from .logtext import shown
from .outbox import Outbox
from .ports import AuthConversation, AuthMethod, AuthRequest, AuthResult, AuthStep, PeerInfo
from .properties import Reason, reason_name

if TYPE_CHECKING:
    from .core import BrokerCore

log = logging.getLogger("bastionmq.connection")


class AuthenticatingClient(Protocol):
    """What an exchange needs of its connection (broker.connection.Connection)."""

    core: BrokerCore
    outbox: Outbox
    client_id: str
    username: str | None
    peer: PeerInfo
    access_cache: dict | None

    @property
    def version(self) -> int: ...

    def describe(self) -> str: ...

    def violation(self, reason: int, why: str) -> None: ...

    def close(self, reason: int = ..., message: str = "", send_disconnect: bool = True,
              publish_will: bool = True, linger: bool = True) -> None: ...

    def finish_connect(self, result: AuthResult, packet: Connect, assigned: bool,
                       auth_props: dict[str, Any] | None = None) -> None: ...


@attrs.define(slots=True)
class _Exchange:
    """One exchange under way."""

    conversation: AuthConversation
    #: The CONNECT being authenticated; None while re-authenticating.
    connect: Connect | None
    request: AuthRequest
    #: Whether the broker assigned the client id (CONNACK then says so).
    assigned: bool = False
    #: A step is being computed: the client must wait for its answer.
    busy: bool = False


class EnhancedAuth:
    """The enhanced authentication of a client that connected with an
    Authentication Method."""

    __slots__ = ("client", "method", "_exchange")

    def __init__(self, client: AuthenticatingClient, method: str) -> None:
        self.client = client
        #: The method's name, as the client gave it.
        self.method = method
        self._exchange: _Exchange | None = None

    @property
    def under_way(self) -> bool:
        """Whether an exchange has begun and not finished."""
        return self._exchange is not None

    def begin(self, method: AuthMethod, connect: Connect, request: AuthRequest,
              assigned: bool) -> None:
        """Authenticate ``connect`` with ``method``; CONNACK follows the last step."""
        self._exchange = _Exchange(method.begin(request), connect, request, assigned)
        self._step(connect.properties.get("authentication_data"))

    def on_auth(self, packet: Auth) -> None:
        client = self.client
        method = packet.properties.get("authentication_method")
        if method != self.method:  # [MQTT-4.12.1-1]
            return client.violation(
                Reason.PROTOCOL_ERROR,
                f"AUTH with method {str(method)[:100]!r}, not {self.method!r}")
        exchange = self._exchange
        reason = packet.reason_code
        data = packet.properties.get("authentication_data")
        if reason == Reason.CONTINUE_AUTHENTICATION and exchange is not None and not exchange.busy:
            return self._step(data)
        # Without an exchange under way the client is connected: the
        # connection hands an AUTH over before CONNECT only during one.
        if reason == Reason.RE_AUTHENTICATE and exchange is None:
            request = AuthRequest(client_id=client.client_id, username=client.username,
                                  password=None, peer=client.peer,
                                  protocol_level=client.version, properties=packet.properties)
            conversation = client.core.auth_methods[method].begin(request)
            self._exchange = _Exchange(conversation, None, request)
            return self._step(data)
        client.violation(Reason.PROTOCOL_ERROR, f"AUTH {reason_name(reason)} out of turn")

    def _step(self, data: bytes | None) -> None:
        exchange = self._exchange
        assert exchange is not None  # begun by begin() or a re-authenticating on_auth
        try:
            step = exchange.conversation.step(data)
        except Exception:
            log.exception("authentication method %r failed for %s", self.method,
                          self.client.describe())
            step = AuthStep(result=AuthResult(Reason.UNSPECIFIED_ERROR))
        if inspect.isawaitable(step):
            exchange.busy = True
            self.client.core.spawn(self._step_async(step))
        else:
            self._answer(step)

    async def _step_async(self, pending: Awaitable[AuthStep]) -> None:
        client = self.client
        try:
            step = await pending
        except Exception:
            log.exception("authentication method %r failed for %s", self.method,
                          client.describe())
            step = AuthStep(result=AuthResult(Reason.UNSPECIFIED_ERROR))
        if client.outbox.closed:
            return
        # Still the exchange that awaited: an AUTH while it was busy closed the connection.
        assert self._exchange is not None
        self._exchange.busy = False
        self._answer(step)
        client.core.outboxes.flush()

    def _answer(self, step: AuthStep) -> None:
        client = self.client
        props: dict[str, Any] = {"authentication_method": self.method}
        if step.data is not None:
            props["authentication_data"] = step.data
        if step.result is None:
            client.outbox.send(Auth(Reason.CONTINUE_AUTHENTICATION, props))
            return
        exchange, self._exchange = self._exchange, None
        assert exchange is not None  # the one _step took this step of
        result = step.result
        finished = getattr(client.core.authenticator, "method_finished", None)
        if finished is not None:
            # Failures count towards bans, at CONNECT and re-authentication alike.
            result = finished(exchange.request, result)
        if exchange.connect is not None:
            client.finish_connect(result, exchange.connect, exchange.assigned, props)
        elif result.allowed and result.identity not in (None, client.username):
            # Re-authentication proves who the client already is, not someone else.
            log.info("closing %s: re-authenticated as %s", client.describe(),
                     shown(result.identity))
            client.close(Reason.NOT_AUTHORIZED, "re-authenticated as another user")
        elif result.allowed:
            log.debug("%s re-authenticated", client.describe())
            if client.access_cache is not None:
                client.access_cache.clear()
            client.core.access_changed()
            client.outbox.send(Auth(Reason.SUCCESS, props))
        else:
            log.info("closing %s: re-authentication failed (%s)", client.describe(),
                     reason_name(result.reason_code))
            client.close(result.reason_code, "re-authentication failed")
