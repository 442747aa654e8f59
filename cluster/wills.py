"""The wills of a dead node's clients, published once by another node.

While a client with a will is connected (and while a will delay runs after
its connection ended), its node keeps the will in the BMQ_WILLS stream, one
subject per client under the node's name and its origin (this start of the
node): ``bmq.will.<node>.<origin>.<client id>``. When the will is published
or discarded the node writes an empty message there (the stream keeps the
last message of each subject), and an orderly stop purges the node's
subjects, as an orderly stop of one broker discards its wills.

A node is gone when its heartbeats stop for three intervals, or when it
comes back with another origin (restarted). Every node that sees it gone
tries to claim the reaping of it by a compare-and-set in the BMQ_REAPED
stream (a publish expecting the subject to be empty); the one that wins
publishes the gone node's wills, each authorized as its client (the record
holds the client's identity), honouring what was left of the will delay,
and then purges them. A node that starts sweeps the stream once for the
wills of nodes no one is there to reap (all stopped at once, say).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

from bastionmq.broker.codec import WILL, Will, decode_properties, encode_properties
from bastionmq.broker.ownership import client_from_record, client_record
from bastionmq.broker.ports import ClientInfo

from .bus import NatsBus
from .codec import key_to_topic, topic_to_key
from .jetstream import JetStreamError, api, ensure_stream, read_last_per_subject

log = logging.getLogger("bastionmq.cluster")

WILLS_STREAM = "BMQ_WILLS"
REAPED_STREAM = "BMQ_REAPED"
WILL_PREFIX = "bmq.will"
REAPED_PREFIX = "bmq.reaped"

#: err_code of a publish whose expected last subject sequence did not hold.
WRONG_LAST_SEQUENCE = 10071

#: How long the reaping of a node is remembered (a node is reaped once).
REAPED_KEPT_NS = 7 * 24 * 3600 * 10**9


def streams(replicas: int) -> list[dict[str, Any]]:
    common = {"retention": "limits", "max_msgs_per_subject": 1, "discard": "old",
              "storage": "file", "num_replicas": replicas}
    return [{"name": WILLS_STREAM, "subjects": [WILL_PREFIX + ".>"], **common},
            {"name": REAPED_STREAM, "subjects": [REAPED_PREFIX + ".>"],
             "max_age": REAPED_KEPT_NS, **common}]


def will_record(client: ClientInfo, will: Will, due: float | None, wall_offset: float) -> bytes:
    """What BMQ_WILLS keeps of a will: the will, when it is due (Unix time,
    None while its client is connected) and its client's facts."""
    return json.dumps({
        "username": client.username, "client": client_record(client),
        "topic": will.topic, "payload": base64.b64encode(will.payload).decode(),
        "qos": will.qos, "retain": will.retain,
        "properties": (base64.b64encode(encode_properties(will.properties)).decode()
                       if will.properties else None),
        "due": None if due is None else due + wall_offset,
    }).encode()


class Wills:
    """This node's side of the cluster's wills."""

    def __init__(self, bus: NatsBus, core: Any, name: str) -> None:
        self.bus = bus
        self.core = core
        self.loop: asyncio.AbstractEventLoop = core.loop
        self.node = topic_to_key(name)
        self.prefix = f"{WILL_PREFIX}.{self.node}.{bus.origin.hex()}"
        #: Nodes being reaped or reaped by this one, as (node key, origin).
        self.reaped: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.published = 0

    async def start(self, replicas: int) -> None:
        for config in streams(replicas):
            await ensure_stream(self.bus, config)
        self.bus.wills = self
        self._spawn(self._sweep(), "sweep")

    async def stop(self) -> None:
        """An orderly stop: this node's wills are discarded (the clients
        were closed without them), so they are purged."""
        self.bus.wills = None
        for task in self._tasks:
            task.cancel()
        try:
            await api(self.bus, f"STREAM.PURGE.{WILLS_STREAM}", {"filter": self.prefix + ".>"},
                      timeout=2.0)
        except Exception as exc:  # a stop goes on: a sweep reaps them later
            log.warning("could not purge this node's wills at stop: %s", exc)

    # ---------------------------------------------------------- keeping

    def saved(self, client: ClientInfo, will: Will, due: float | None) -> None:
        self.bus.publish(self._subject(client.client_id),
                         will_record(client, will, due, time.time() - self.loop.time()))

    def deleted(self, client_id: str) -> None:
        self.bus.publish(self._subject(client_id), b"")

    def _subject(self, client_id: str) -> str:
        return f"{self.prefix}.{topic_to_key(client_id)}"

    def reconnected(self) -> None:
        """The connection to NATS came back. If it was gone long enough, the
        others have taken this node for dead and published its wills; if
        not, they will take its former origin for gone as soon as it
        changes. Either way its wills move to a new origin: those under the
        former one are purged first, so that reaping it finds nothing."""
        self._spawn(self._move(), "moving to a new origin")

    async def _move(self) -> None:
        former = self.prefix
        try:
            await api(self.bus, f"STREAM.PURGE.{WILLS_STREAM}", {"filter": former + ".>"})
        except (JetStreamError, asyncio.TimeoutError) as exc:
            log.warning("could not purge this node's wills after a reconnect: %s", exc)
        self.bus.new_origin()
        self.prefix = f"{WILL_PREFIX}.{self.node}.{self.bus.origin.hex()}"
        for session in list(self.core.sessions.values()):
            connection = session.connection
            if connection is not None and connection.will is not None:
                self.saved(connection.client_info, connection.will, None)
            elif session.pending_will is not None and session.client is not None:
                self.saved(session.client, session.pending_will, session.will_due)

    # ---------------------------------------------------------- reaping

    def gone(self, name: str, origin: str) -> None:
        """Node ``name`` with ``origin`` is gone: reap it, unless another does."""
        self._gone(topic_to_key(name), origin)

    def _gone(self, node: str, origin: str) -> None:
        key = (node, origin)
        if key not in self.reaped and origin != self.bus.origin.hex():
            self.reaped.add(key)
            self._spawn(self._reap(*key), f"reaping {key_to_topic(node)}")

    def _spawn(self, coroutine: Any, what: str) -> None:
        task = self.loop.create_task(coroutine, name=f"bastionmq cluster wills: {what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, node: str, origin: str) -> bool:
        """Whether this node won the reaping of (node, origin)."""
        answer = json.loads(await self.bus.request(
            f"{REAPED_PREFIX}.{node}.{origin}", self.bus.name.encode(), timeout=5.0,
            headers={"Nats-Expected-Last-Subject-Sequence": "0"}))
        error = answer.get("error")
        if error and error.get("err_code") == WRONG_LAST_SEQUENCE:
            return False
        if error:
            raise JetStreamError(error.get("code", 0), error.get("err_code", 0),
                                 error.get("description", "error"))
        return True

    async def _reap(self, node: str, origin: str) -> None:
        try:
            if not await self._claim(node, origin):
                return  # another node reaps it
            records: list[tuple[str, bytes]] = []
            await read_last_per_subject(
                self.bus, WILLS_STREAM, f"{WILL_PREFIX}.{node}.{origin}.>",
                lambda subject, payload, _: records.append((subject, payload)))
            published = 0
            for subject, payload in records:
                if payload:
                    client_id = key_to_topic(subject.split(".", 4)[4])
                    self._publish_later(client_id, json.loads(payload))
                    published += 1
            log.info("node %s (%s) is gone: its clients' %d will(s) are published from here",
                     key_to_topic(node), origin, published)
            await api(self.bus, f"STREAM.PURGE.{WILLS_STREAM}",
                      {"filter": f"{WILL_PREFIX}.{node}.{origin}.>"})
        except (JetStreamError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            log.error("reaping node %s (%s) failed: %s", key_to_topic(node), origin, exc)
            self.reaped.discard((node, origin))  # let the next sight of it try again

    def _publish_later(self, client_id: str, record: dict[str, Any]) -> None:
        properties = record["properties"]
        will = Will(record["topic"], base64.b64decode(record["payload"]), record["qos"],
                    record["retain"],
                    decode_properties(base64.b64decode(properties), WILL) if properties else {})
        client, _ = client_from_record(client_id, record["username"], record["client"],
                                       self.core.certificate_parser)
        due = record["due"]
        if due is None:
            # Its client was connected when the node went: its connection
            # ended now, as far as anyone can tell.
            delay = float(will.properties.get("will_delay_interval", 0))
        else:
            delay = max(0.0, due - time.time())
        self.loop.call_later(delay, self._publish, will, client)

    def _publish(self, will: Will, client: ClientInfo) -> None:
        session = self.core.sessions.get(client.client_id)
        if session is not None and session.connection is not None and \
                will.properties.get("will_delay_interval"):
            return  # reconnected here within its will delay (3.1.3.2.2)
        self.core.publish_will(will, client)  # authorized as its client
        self.core.outboxes.flush()
        self.published += 1

    async def _sweep(self) -> None:
        """Once, three heartbeats after start (when the nodes alive have
        been heard): reap the nodes that left wills and are not alive."""
        await asyncio.sleep(3 * self.bus.heartbeat)
        found: set[tuple[str, str]] = set()

        def take(subject: str, payload: bytes, stored_at: int) -> None:
            parts = subject.split(".", 4)
            if len(parts) == 5:
                found.add((parts[2], parts[3]))

        try:
            await read_last_per_subject(self.bus, WILLS_STREAM, WILL_PREFIX + ".>", take,
                                        headers_only=True)
        except (JetStreamError, asyncio.TimeoutError) as exc:
            log.warning("could not look for the wills of nodes gone: %s", exc)
            return
        alive = {(topic_to_key(figures["node"]), figures.get("origin"))
                 for figures in self.bus.nodes()}
        for node, origin in found - alive:
            self._gone(node, origin)
