"""The operator's changes reach every node.

A ban, or a change of the authorization rules of the built-in database,
made through one node (its management API, ``bastionmq ctl``) must hold on
every node at once: the client it concerns may be connected anywhere, and
may connect again anywhere. The node that made the change tells the others
on ``bmq.admin`` (one NATS message, as a claim is): each applies a ban to
the bans it keeps in memory and closes the connections it names, drops a
lifted one, and loads the rules again from the built-in database (every
worker of a machine reads the same file; a node on another machine reads
its own).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import attrs

from bastionmq.auth.builtin_db import Ban

log = logging.getLogger("bastionmq.cluster")

ADMIN_SUBJECT = "bmq.admin"


class AdminRelay:
    """Tells the other nodes of this node's changes, and applies theirs."""

    def __init__(self, bus: Any, broker: Any) -> None:
        self.bus = bus
        self.broker = broker
        bus.serve(ADMIN_SUBJECT, self._heard)

    def banned(self, ban: Ban) -> None:
        self._tell({"change": "ban", "ban": attrs.asdict(ban)})

    def unbanned(self, kind: str, value: str) -> None:
        self._tell({"change": "unban", "kind": kind, "value": value})

    def rules_changed(self) -> None:
        self._tell({"change": "rules"})

    def _tell(self, change: dict[str, Any]) -> None:
        if not self.bus.publish(ADMIN_SUBJECT, json.dumps(change).encode()):
            log.warning("the other nodes were not told of a %s: no connection to NATS "
                        "(they take it at their next reload)", change["change"])

    def _heard(self, subject: str, payload: bytes, headers: Any, reply: Any) -> None:
        try:
            change = json.loads(payload)
            kind = change["change"]
            if kind == "ban":
                self.broker.apply_ban(Ban(**change["ban"]))
            elif kind == "unban":
                self.broker.bans.remove(str(change["kind"]), str(change["value"]))
            elif kind == "rules":
                self.broker.reload_authorization()
            else:
                raise ValueError(f"unknown change {kind!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("a change from another node that is not one: %s", exc)
            return
        self.bus.core.outboxes.flush()
