"""The nats-server helpers themselves (tests/nats_peer.py): a restart keeps
the port and the JetStream store, and no process outlives its context."""

from __future__ import annotations

import json
import os
import signal

import pytest
from nats_peer import NatsServer
from tls_helpers import plain_socket

from bastionmq.cluster import wire
from bastionmq.cluster.wire import Msg, NatsParser, Pong


def request(server: NatsServer, subject: str, payload: bytes) -> dict:
    """One request on a connection of its own, its JSON answer."""
    sock = plain_socket(server.port)
    parser = NatsParser()
    sock.sendall(wire.connect() + wire.sub("_INBOX.peer", 1) +
                 wire.pub(subject, payload, reply="_INBOX.peer") + wire.ping())
    events: list = []
    while not any(isinstance(event, Msg) for event in events):
        data = sock.recv(65536)
        assert data, events
        events += parser.feed(data)
    sock.close()
    (reply,) = [event for event in events if isinstance(event, Msg)]
    return json.loads(reply.payload)


def stream_messages(server: NatsServer, name: str) -> int:
    info = request(server, f"$JS.API.STREAM.INFO.{name}", b"")
    assert "error" not in info, info
    return info["state"]["messages"]


def test_restart_keeps_the_port_and_the_store(tmp_path):
    with NatsServer(tmp_path, "kept", jetstream=True) as server:
        created = request(server, "$JS.API.STREAM.CREATE.KEPT", json.dumps(
            {"name": "KEPT", "subjects": ["kept.>"], "storage": "file"}).encode())
        assert "error" not in created, created
        assert request(server, "kept.1", b"durable") == {"stream": "KEPT", "seq": 1}
        port, pid = server.port, server.pid
        server.kill()  # SIGKILL: nothing flushed on the way out
        assert not server.running
        server.restart()
        assert server.running and server.pid != pid and server.port == port
        assert server.url == f"nats://127.0.0.1:{port}"
        assert stream_messages(server, "KEPT") == 1
        server.kill(signal.SIGTERM)
        assert not server.running
        server.start()
        assert stream_messages(server, "KEPT") == 1


def test_no_process_outlives_its_context(tmp_path):
    with pytest.raises(RuntimeError):
        with NatsServer(tmp_path, "brief") as server:
            pid = server.pid
            assert pid is not None and server.running
            raise RuntimeError("the test failed")
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped


def test_a_plain_server_answers_pings(tmp_path):
    with NatsServer(tmp_path, "plain") as server:
        assert server.store_dir is None
        status, body = server.monitor("/varz")
        assert status == 200 and body["port"] == server.port and body["jetstream"] == {}
        sock = plain_socket(server.port)
        sock.sendall(wire.connect() + wire.ping())
        parser = NatsParser()
        events: list = []
        while not events or not isinstance(events[-1], Pong):
            data = sock.recv(65536)
            assert data, events
            events += parser.feed(data)
        assert events[-1] == Pong()
