"""Brute-force protection: a short ban after repeated failed logins.

Failures are counted per listener, per client id, per username (the user an
authentication method such as SCRAM established, where there is one) and per
peer address (each can be left out). When one of them reaches ``max_failures`` within
``window`` seconds it is banned for ``ban_time``: its CONNECTs are refused
(CONNACK 0x8A, banned; 5 for MQTT 3.1.1) without asking any authenticator,
which is the point: a password guesser learns nothing more.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Sequence

from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import AuthRequest

log = logging.getLogger("bastionmq.auth")

KEYS = ("clientid", "username", "peerhost")


class LoginBans:
    """Failures and bans, per listener: a username that fails on one listener
    is not banned on another. Both tables are kept in the order of their last
    change, so that what has aged out is dropped from the front: a failure
    costs O(1) however many names and addresses are being tried."""

    def __init__(self, max_failures: int, window: float, ban_time: float,
                 by: Sequence[str] = KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.ban_time = ban_time
        self.by = tuple(by)
        self.clock = clock
        #: (listener, kind, value) -> times of its failures within the window.
        self._failures: dict[tuple[str, str, str], collections.deque[float]] = {}
        #: (listener, kind, value) -> when its ban ends; in the order of their end.
        self._banned: dict[tuple[str, str, str], float] = {}

    def _keys(self, request: AuthRequest, identity: str | None = None,
              known: bool = True) -> list[tuple[str, str, str]]:
        """The keys a request is counted and banned by. ``identity``: the user
        an authentication method established (a SCRAM user), instead of the
        username sent. A failure of an unknown user is not counted against
        the client id it came with (that would let anyone ban a device by
        failing with its client id)."""
        values = {"clientid": request.client_id if known else None,
                  "username": identity if identity is not None else request.username,
                  "peerhost": request.peer.host}
        listener = request.peer.listener
        return [(listener, kind, value) for kind in self.by if (value := values[kind])]

    def banned(self, request: AuthRequest, identity: str | None = None) -> tuple[str, str] | None:
        """The (kind, value) that bans this CONNECT, if any."""
        self._prune(self.clock())
        for key in self._keys(request, identity):
            if key in self._banned:
                return key[1], key[2]
        return None

    def failed(self, request: AuthRequest, identity: str | None = None,
               known: bool = True) -> None:
        now = self.clock()
        self._prune(now)
        failures = self._failures
        for key in self._keys(request, identity, known):
            times = failures.pop(key, None)
            if times is None:
                times = collections.deque()
            times.append(now)
            while times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.max_failures:
                self._banned.pop(key, None)
                self._banned[key] = now + self.ban_time
                log.warning("banning %s %s on %s for %gs after %d failed logins within %gs",
                            key[1], shown(key[2]), key[0], self.ban_time, self.max_failures,
                            self.window)
            else:
                failures[key] = times  # to the end: the most recent failure

    def _prune(self, now: float) -> None:
        """Drop failures older than the window and bans that have ended: the
        oldest are at the front of each table."""
        failures = self._failures
        while failures:
            key = next(iter(failures))
            if failures[key][-1] > now - self.window:
                break
            del failures[key]
        banned = self._banned
        while banned:
            key = next(iter(banned))
            if banned[key] > now:
                break
            del banned[key]
