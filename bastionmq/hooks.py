"""An embedding application's hooks: its own authentication and
authorization decisions, and observers of messages and clients.

``authenticate`` and ``authorize`` hooks join the configured chains (auth/chain.py,
acl/chain.py) as their first members: each answers ``"allow"``, ``"deny"``
or ``"ignore"`` (also None; True and False for allow and deny), and on
ignore the next member decides, then the chain's own fallback
(``allow_anonymous``, ``authorization.no_match``), as in EMQX's chains. A hook
that raises denies (fail closed) and the exception is logged. Either may be
async: what depends on its answer waits for it (for authorization,
broker/access.py says what waits).

Observers (``on_message``, ``on_connect``, ``on_disconnect``) are told and
cannot hold anything up: a plain function runs inline (keep it short), an
exception in it is logged and the broker goes on; an ``async`` one is queued
(bounded: what does not fit is dropped and counted) to one task that awaits
them in order. With no observer the core pays one attribute check per
message (BrokerCore.observer).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Iterable, Mapping

import attrs

from bastionmq.broker.local import LOCAL_LISTENER, LocalMessage
from bastionmq.broker.ports import (
    ALLOW, ALLOW_ACCESS, DENY_ACCESS, AccessRequest, AuthRequest, AuthResult, Client,
    PeerCertificate,
)
from bastionmq.broker.properties import Reason

log = logging.getLogger("bastionmq.hooks")

#: What an authenticate or authorize hook answers.
ALLOW_ANSWER = "allow"
DENY_ANSWER = "deny"
IGNORE_ANSWER = "ignore"

#: An async observer's calls waiting for its task, at most, by default.
DEFAULT_QUEUE_SIZE = 10_000

#: Seconds an async authorize hook may take to answer; then it denies.
AUTHORIZE_TIMEOUT = 10.0

#: Seconds between two log lines about one hook's exceptions, at the least.
ERROR_LOG_INTERVAL = 10.0

#: A connecting client as an authenticate hook sees it (client_id,
#: username, password, peer: PeerInfo, protocol_level, properties).
AuthenticatingClient = AuthRequest

Hook = Callable[..., Any]


def _hooks(value: Hook | Iterable[Hook] | None) -> list[Hook]:
    if value is None:
        return []
    if callable(value):
        return [value]
    return list(value)


def is_async(hook: Hook) -> bool:
    """Whether calling ``hook`` makes a coroutine (an ``async def``, or an
    object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(
        getattr(hook, "__call__", None))


def _name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


@attrs.define(slots=True)
class Hooks:
    """The hooks of one Broker; each field takes a callable or a list of
    them, asked (or told) in order. ``queue_size`` bounds the calls of async
    observers waiting to run."""

    authenticate: list[Hook] = attrs.field(factory=list, converter=_hooks)
    authorize: list[Hook] = attrs.field(factory=list, converter=_hooks)
    on_message: list[Hook] = attrs.field(factory=list, converter=_hooks)
    on_connect: list[Hook] = attrs.field(factory=list, converter=_hooks)
    on_disconnect: list[Hook] = attrs.field(factory=list, converter=_hooks)
    queue_size: int = DEFAULT_QUEUE_SIZE

    def __attrs_post_init__(self) -> None:
        for hook in self.authorize:
            check_authorize_hook(hook)

    @property
    def observes(self) -> bool:
        return bool(self.on_message or self.on_connect or self.on_disconnect)


def check_authorize_hook(hook: Hook) -> None:
    if not callable(hook):
        raise TypeError(f"an authorize hook must be callable, not {hook!r}")


# ---------------------------------------------------------------- the chains


class _ErrorLog:
    """Logs a hook's exceptions, the first with its traceback, then at most
    once per ERROR_LOG_INTERVAL with the count of those in between, so a
    failing hook on the hot path cannot flood the log."""

    __slots__ = ("what", "next_at", "unlogged", "count")

    def __init__(self, what: str) -> None:
        self.what = what
        self.next_at = 0.0
        self.unlogged = 0
        self.count = 0

    def failed(self, now: float) -> None:
        self.count += 1
        if now < self.next_at:
            self.unlogged += 1
            return
        self.next_at = now + ERROR_LOG_INTERVAL
        unlogged, self.unlogged = self.unlogged, 0
        log.error("%s raised an exception%s; the broker goes on", self.what,
                  f" (and {unlogged} times since the last such line)" if unlogged else "",
                  exc_info=True)


def _now() -> float:
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return 0.0


#: Answer of an authenticate hook that denies, or fails.
HOOK_DENIED = AuthResult(Reason.NOT_AUTHORIZED)
HOOK_FAILED = AuthResult(Reason.SERVER_UNAVAILABLE)


def _decision(answer: Any, what: str) -> bool | None:
    """A hook's answer: True allow, False deny, None ignore (the next
    source decides)."""
    if answer is None or answer == IGNORE_ANSWER:
        return None
    if answer is True or answer == ALLOW_ANSWER:
        return True
    if answer is False or answer == DENY_ANSWER:
        return False
    raise ValueError(f"{what} answered {answer!r}, not 'allow', 'deny' or 'ignore'")


def _auth_answer(answer: Any, what: str) -> AuthResult | None:
    if isinstance(answer, AuthResult):
        return answer
    decision = _decision(answer, what)
    return None if decision is None else ALLOW if decision else HOOK_DENIED


class HookAuthenticator:
    """An authenticate hook as a member of the authentication chain
    (auth.chain.ChainAuthenticator)."""

    source = "hook"

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        self.name = f"authenticate hook {_name(hook)}"
        self.errors = _ErrorLog(self.name)

    def authenticate(self, request: AuthRequest) -> AuthResult | None | Awaitable[AuthResult | None]:
        try:
            answer = self.hook(request)
            if inspect.isawaitable(answer):
                return self._later(answer)
            return _auth_answer(answer, self.name)
        except Exception:
            self.errors.failed(_now())
            return HOOK_FAILED

    async def _later(self, pending: Awaitable[Any]) -> AuthResult | None:
        try:
            return _auth_answer(await pending, self.name)
        except Exception:
            self.errors.failed(_now())
            return HOOK_FAILED


class HookAclSource:
    """An authorize hook as a source of the authorization chain
    (ports.AclSource): asked with (client, action, topic). An async hook's
    answer is waited for (broker/access.py says what waits meanwhile), for
    AUTHORIZE_TIMEOUT at most: then, as when it raises, it denies."""

    def __init__(self, hook: Hook) -> None:
        check_authorize_hook(hook)
        self.hook = hook
        self.name = f"authorize hook {_name(hook)}"
        self.errors = _ErrorLog(self.name)

    def check(self, request: AccessRequest) -> str | None | Awaitable[str | None]:
        try:
            answer = self.hook(request.client, request.action, request.topic)
            if answer is not None and type(answer) is not str and inspect.isawaitable(answer):
                return self._later(answer)
            return self._access(answer)
        except Exception:
            self.errors.failed(_now())
            return DENY_ACCESS  # fail closed: a client does only what its rules allow

    def _access(self, answer: Any) -> str | None:
        decision = _decision(answer, self.name)
        return None if decision is None else ALLOW_ACCESS if decision else DENY_ACCESS

    async def _later(self, pending: Awaitable[Any]) -> str | None:
        try:
            return self._access(await asyncio.wait_for(pending, AUTHORIZE_TIMEOUT))
        except Exception:  # TimeoutError too
            self.errors.failed(_now())
            return DENY_ACCESS


def acl_sources(hooks: Hooks) -> list[tuple[str, HookAclSource]]:
    """The authorize hooks as (description, source) entries of an
    AuthorizationChain; "hook" is what their decisions count as."""
    return [("hook", HookAclSource(hook)) for hook in hooks.authorize]


# ---------------------------------------------------------------- clients


@attrs.define(slots=True, frozen=True, kw_only=True)
class ConnectedClient:
    """A connected client, as ``Broker.clients`` and the connect and
    disconnect observers show it (a snapshot)."""

    client_id: str
    username: str | None
    #: (host, port) of the remote end.
    peer_address: tuple[str, int] | None
    #: "tcp:default", "ssl:default"...
    listener: str
    #: 3 (3.1), 4 (3.1.1) or 5 (5.0).
    protocol_version: int
    #: Unix time at which its CONNECT succeeded.
    connected_at: float
    tls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    sni: str | None = None
    psk_identity: str | None = None
    #: The client certificate the listener verified (subject, common_name,
    #: issuer, serial, sha256, not_before, not_after, san_*), or None.
    certificate: PeerCertificate | None = None
    superuser: bool = False

    @classmethod
    def of(cls, connection: Client, now: float) -> ConnectedClient:
        peer = connection.peer
        info = connection.client_info
        connected_at = getattr(connection, "connected_at", None)
        return cls(client_id=connection.client_id,
                   username=info.username if info is not None else None,
                   peer_address=peer.address, listener=peer.listener,
                   protocol_version=connection.version,
                   connected_at=connected_at if connected_at is not None else now,
                   tls=peer.tls, tls_version=peer.tls_version, cipher=peer.cipher,
                   sni=peer.sni, psk_identity=peer.psk_identity, certificate=peer.certificate,
                   superuser=info.superuser if info is not None else False)


# ---------------------------------------------------------------- observers


class Observers:
    """The core's Observer (broker.ports) for the observer hooks."""

    def __init__(self, hooks: Hooks, wall_clock: Callable[[], float]) -> None:
        self.wall_clock = wall_clock
        self.update(hooks)
        self._errors: dict[Hook, _ErrorLog] = {}
        #: (async observer, its arguments) waiting for the task.
        self.queue: deque[tuple[Hook, tuple]] = deque()
        #: Calls of async observers dropped because the queue was full.
        self.dropped = 0
        #: Exceptions the observers raised, in all.
        self.errors = 0
        self._wakeup: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    def update(self, hooks: Hooks) -> None:
        """Tell the observers ``hooks`` has from now on."""
        self.queue_size = hooks.queue_size
        self._split("message", hooks.on_message)
        self._split("connect", hooks.on_connect)
        self._split("disconnect", hooks.on_disconnect)

    def _split(self, event: str, hooks: list[Hook]) -> None:
        setattr(self, f"sync_{event}", tuple(h for h in hooks if not is_async(h)))
        setattr(self, f"async_{event}", tuple(h for h in hooks if is_async(h)))

    # What the core calls ----------------------------------------------------

    def message(self, message: Any, sender: Any) -> None:
        if message.topic.startswith("$SYS/"):
            return  # the broker's own figures, not the application's traffic
        props = message.properties
        seen = LocalMessage(message.topic, message.payload, message.qos, message.retain,
                            dict(props) if props else {},
                            sender.client_id if sender is not None else None)
        self._tell(self.sync_message, self.async_message, (seen,))  # type: ignore[attr-defined]

    def connected(self, connection: Client) -> None:
        self._tell(self.sync_connect, self.async_connect,  # type: ignore[attr-defined]
                   (ConnectedClient.of(connection, self.wall_clock()),))

    def disconnected(self, connection: Client) -> None:
        if connection.peer.listener == LOCAL_LISTENER:
            return  # an in-process subscriber unsubscribing
        reason = getattr(connection, "close_reason", "") or "disconnected"
        self._tell(self.sync_disconnect, self.async_disconnect,  # type: ignore[attr-defined]
                   (ConnectedClient.of(connection, self.wall_clock()), reason))

    def _tell(self, inline: tuple[Hook, ...], queued: tuple[Hook, ...], args: tuple) -> None:
        for hook in inline:
            try:
                result = hook(*args)
            except Exception:
                self._failed(hook)
                continue
            # A plain function that returned an awaitable. None, what an
            # observer returns, is tested first: isawaitable costs 0.5 µs.
            if result is not None and inspect.isawaitable(result):
                self._queue(_awaited, (result,))
        for hook in queued:
            self._queue(hook, args)

    def _queue(self, hook: Hook, args: tuple) -> None:
        queue = self.queue
        if len(queue) >= self.queue_size:
            self.dropped += 1
            if inspect.iscoroutine(args[0]) and hook is _awaited:
                args[0].close()
            return
        queue.append((hook, args))
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    def _failed(self, hook: Hook) -> None:
        self.errors += 1
        errors = self._errors.get(hook)
        if errors is None:
            errors = self._errors[hook] = _ErrorLog(f"observer {_name(hook)}")
        errors.failed(_now())

    # The task that runs async observers --------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # Also with plain observers only: one may return an awaitable.
        if self._task is None:
            self._task = loop.create_task(self._run(loop), name="bastionmq observers")

    async def stop(self) -> None:
        """Run what is queued, briefly, then end the task."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        for hook, args in self.queue:
            if hook is _awaited:
                args[0].close()
        self.queue.clear()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        queue = self.queue
        while True:
            while not queue:
                self._wakeup = loop.create_future()
                await self._wakeup
            hook, args = queue.popleft()
            try:
                await hook(*args)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failed(hook)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def hook_stats(observers: Observers | None) -> Mapping[str, int]:
    """What operators may want to see of the observers."""
    if observers is None:
        return {"queued": 0, "dropped": 0, "errors": 0}
    return {"queued": len(observers.queue), "dropped": observers.dropped,
            "errors": observers.errors}
