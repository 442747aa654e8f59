"""The few JetStream API calls the nodes make, as requests on the bus.

The JetStream API is JSON over request and reply ($JS.API.*); the nodes'
one connection to NATS (cluster.bus) carries it, so the API shares the
connection's servers, credentials and TLS, and needs no second client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from .bus import NatsBus, NoResponders

#: err_code of "stream name already in use with a different configuration".
STREAM_NAME_IN_USE = 10058


class JetStreamError(Exception):
    """An error answer of the JetStream API (or no JetStream at all: code 503)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


async def api(bus: NatsBus, verb: str, body: dict[str, Any] | None = None,
              timeout: float = 5.0) -> dict[str, Any]:
    """The answer of ``$JS.API.<verb>``; JetStreamError for an error answer."""
    try:
        raw = await bus.request("$JS.API." + verb,
                                b"" if body is None else json.dumps(body).encode(), timeout)
    except NoResponders:
        raise JetStreamError(503, 0, "JetStream is not enabled at the NATS server") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise JetStreamError(500, 0, f"an answer that is not JSON: {raw[:200]!r}") from None
    error = answer.get("error") if isinstance(answer, dict) else None
    if error:
        raise JetStreamError(error.get("code", 0), error.get("err_code", 0),
                             error.get("description", "error"))
    return answer


async def patient_api(bus: NatsBus, verb: str, body: dict[str, Any] | None = None,
                      patience: float = 30.0) -> dict[str, Any]:
    """``api``, asked again while JetStream answers that it is not available
    for the moment (a NATS cluster electing a leader after losing a server:
    code 503 with an err_code) or does not answer, for ``patience`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        left = deadline - loop.time()
        try:
            # A request made while JetStream elects a leader gets no answer at
            # all: asked again every 2 s, the first after the election answers.
            return await api(bus, verb, body, timeout=max(0.1, min(2.0, left)))
        except JetStreamError as exc:
            if exc.code != 503 or not exc.err_code or left <= 0:
                raise
        except asyncio.TimeoutError:
            if left <= 0:
                raise
        await asyncio.sleep(0.25)


async def ensure_stream(bus: NatsBus, config: dict[str, Any]) -> dict[str, Any]:
    """Create the stream ``config`` describes, or bring an existing one to it."""
    name = config["name"]
    try:
        return await patient_api(bus, f"STREAM.CREATE.{name}", config)
    except JetStreamError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    return await patient_api(bus, f"STREAM.UPDATE.{name}", config)


def delivery_position(reply: str | None) -> tuple[int, int, int] | None:
    """(stream sequence, stored at in Unix ns, messages still pending) from
    the reply subject of a consumer's delivery: $JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>.<consumer seq>.<time>.<pending>, or the longer
    form with a domain and an account hash in front (and a token after)."""
    if reply is None or not reply.startswith("$JS.ACK."):
        return None
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[5]), int(tokens[7]), int(tokens[8])
        if len(tokens) >= 11:
            return int(tokens[7]), int(tokens[9]), int(tokens[10])
    except ValueError:
        return None
    return None


async def read_last_per_subject(bus: NatsBus, stream: str, filter_subject: str,
                                take: Callable[[str, bytes, int], None], *,
                                headers_only: bool = False, timeout: float = 60.0) -> int:
    """Give ``take(subject, payload, stored at in Unix ns)`` the last message
    of each subject of ``stream`` under ``filter_subject``, through an
    ephemeral consumer, and return how many there were. ``headers_only``:
    without their payloads (the subjects are what is wanted)."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    count = 0

    def delivered(subject: str, payload: bytes, headers: bytes | None, reply: str | None) -> None:
        nonlocal count
        position = delivery_position(reply)
        if position is None:
            return  # a status message (idle heartbeat, flow control): none asked for
        _, stored_at, pending = position
        count += 1
        take(subject, payload, stored_at)
        if pending == 0 and not finished.done():
            finished.set_result(None)

    inbox, sid = bus.deliver_to(delivered)
    try:
        info = await patient_api(bus, f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": {
            "deliver_subject": inbox, "deliver_policy": "last_per_subject",
            "ack_policy": "none", "filter_subject": filter_subject, "headers_only": headers_only,
            "mem_storage": True, "num_replicas": 1, "inactive_threshold": 5_000_000_000}})
        if info.get("num_pending", 0) > 0 or info.get("delivered", {}).get("stream_seq"):
            await asyncio.wait_for(finished, timeout)
        name = info.get("name")
        if name:
            try:
                await api(bus, f"CONSUMER.DELETE.{stream}.{name}")
            except (JetStreamError, asyncio.TimeoutError):
                pass  # it goes by itself when inactive
    finally:
        bus.stop_delivery(sid)
    return count


async def read_range(bus: NatsBus, stream: str, filter_subject: str, start: int, last: int,
                     take: Callable[[str, bytes, bytes | None, int, int], None], *,
                     stall: float = 10.0) -> None:
    """Give ``take(subject, payload, headers, sequence, stored at in Unix
    ns)`` each message of ``stream`` under ``filter_subject`` from sequence
    ``start`` to ``last``, through ephemeral consumers; TimeoutError when
    none comes for ``stall`` seconds before the end."""
    # A consumer may say nothing is pending before ``last`` (nats-server
    # 2.9 counts so for a moment under load): read again from where it
    # stopped, until ``last`` or a read that brings nothing (messages aged
    # out or deleted).
    while start <= last:
        reached = await _read_once(bus, stream, filter_subject, start, last, take, stall)
        if reached < start:
            return
        start = reached + 1


async def _read_once(bus: NatsBus, stream: str, filter_subject: str, start: int, last: int,
                     take: Callable[[str, bytes, bytes | None, int, int], None],
                     stall: float) -> int:
    """One consumer's pass of ``read_range``: the last sequence it gave."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    progress = [loop.time()]
    reached = [0]

    def delivered(subject: str, payload: bytes, headers: bytes | None, reply: str | None) -> None:
        position = delivery_position(reply)
        if position is None or finished.done():
            return  # a status message: none asked for
        sequence, stored_at, pending = position
        progress[0] = loop.time()
        if sequence <= last:
            reached[0] = sequence
            take(subject, payload, headers, sequence, stored_at)
        if pending == 0 or sequence >= last:
            finished.set_result(None)

    inbox, sid = bus.deliver_to(delivered)
    name = None
    try:
        info = await patient_api(bus, f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": {
            "deliver_subject": inbox, "deliver_policy": "by_start_sequence",
            "opt_start_seq": start, "ack_policy": "none", "filter_subject": filter_subject,
            "mem_storage": True, "num_replicas": 1, "inactive_threshold": 5_000_000_000}})
        name = info.get("name")
        if info.get("num_pending", 0) == 0 and not finished.done():
            return reached[0]
        while not finished.done():
            try:
                await asyncio.wait_for(asyncio.shield(finished), stall)
            except asyncio.TimeoutError:
                if loop.time() - progress[0] >= stall:
                    raise
        return reached[0]
    finally:
        bus.stop_delivery(sid)
        if name:
            try:
                await api(bus, f"CONSUMER.DELETE.{stream}.{name}")
            except (JetStreamError, asyncio.TimeoutError):
                pass  # it goes by itself when inactive
