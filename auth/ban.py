"""Brute-force protection: a short ban after repeated failed logins.

Failures are counted per client id, per username and per peer address (each
can be left out). When one of them reaches ``max_failures`` within
``window`` seconds it is banned for ``ban_time``: its CONNECTs are refused
(CONNACK 0x8A, banned; 5 for MQTT 3.1.1) without asking any authenticator,
which is the point: a password guesser learns nothing more.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Sequence

from bastionmq.broker.ports import AuthRequest

log = logging.getLogger("bastionmq.auth")

KEYS = ("clientid", "username", "peerhost")


class LoginBans:
    def __init__(self, max_failures: int, window: float, ban_time: float,
                 by: Sequence[str] = KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.ban_time = ban_time
        self.by = tuple(by)
        self.clock = clock
        self._failures: dict[tuple[str, str], collections.deque[float]] = {}
        self._banned: dict[tuple[str, str], float] = {}

    def _keys(self, request: AuthRequest) -> list[tuple[str, str]]:
        values = {"clientid": request.client_id, "username": request.username,
                  "peerhost": request.peer.host}
        return [(kind, values[kind]) for kind in self.by if values[kind]]

    def banned(self, request: AuthRequest) -> tuple[str, str] | None:
        """The (kind, value) that bans this CONNECT, if any."""
        now = self.clock()
        for key in self._keys(request):
            until = self._banned.get(key)
            if until is not None:
                if until > now:
                    return key
                del self._banned[key]
        return None

    def failed(self, request: AuthRequest) -> None:
        now = self.clock()
        for key in self._keys(request):
            times = self._failures.setdefault(key, collections.deque())
            times.append(now)
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.max_failures:
                del self._failures[key]
                self._banned[key] = now + self.ban_time
                log.warning("banning %s %r for %gs after %d failed logins within %gs",
                            key[0], key[1], self.ban_time, self.max_failures, self.window)
        if len(self._failures) > 100_000:
            self._forget_old(now)

    def _forget_old(self, now: float) -> None:
        # Bound the memory a flood of distinct names or addresses can take.
        for key in [k for k, times in self._failures.items() if times[-1] <= now - self.window]:
            del self._failures[key]
