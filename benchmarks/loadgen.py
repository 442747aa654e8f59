"""MQTT 3.1.1 load generator: the measuring half of benchmarks/.

Runs one scenario against a broker that is already listening and prints one
JSON object on stdout. `compare.py` drives it; it can also be run by hand:

    taskset -c 1 python benchmarks/loadgen.py qos0-1to1 --port 1883 --broker-pid PID

The generator has one core and must cost far less per message than the
broker, or it measures itself. Per-message work is done in C (slicing,
joining), Python runs once per chunk read or written, and reads are batched:
- every packet is encoded before the measurement starts;
- a QoS 0 publisher writes ~64 KiB of identical PUBLISH packets per write and
  waits (pause_writing/resume_writing) while its transport is over the
  high-water mark: TCP backpressure, i.e. the broker, sets the pace;
- all PUBLISH packets of a scenario have the same encoded size S, so a
  subscriber counts bytes // S; it only checks, with one extended slice per
  chunk, that a PUBLISH first byte sits every S bytes;
- QoS 0 subscribers set SO_RCVLOWAT, so a broker that writes each packet with
  its own send() still wakes the generator once per many packets;
- a QoS 1 subscriber finds the packet ids at a fixed offset in its S-byte
  packets and builds the PUBACKs of a chunk with extended-slice assignments,
  one write per chunk; a QoS 1 publisher keeps its packets (ids 1..RING_IDS)
  back to back, so sending the k packets that k PUBACKs freed is one slice.
The result holds the generator's and the broker's CPU use over the measured
window (process time, 1.0 = one core, and how busy their cores were), so a
generator at the end of its tether shows.

The TLS scenarios use the event loop's own TLS (uvloop's, over OpenSSL): the
generator verifies the broker's certificate against --cafile and, for the
handshake scenarios, presents --certfile/--keyfile. It never offers a TLS
session back, so every handshake is a full one.

ws-qos0 is qos0-1to1 over WebSocket (RFC 6455): each connection sends the
HTTP upgrade (--ws-path, subprotocol "mqtt") and checks the 101 answer, then
every MQTT packet goes in a masked binary frame. A publisher's frames are
built before the measurement (one mask key per connection, one PUBLISH per
frame, the batch is that frame repeated); a subscriber walks the frame
headers of each chunk (2 to 10 bytes, kept across reads when a read ends
inside one) and counts the MQTT bytes between them, as above: Python runs
once per frame received, not once per byte.

qos1-durable is qos1's publishers with their subscribers offline: each
subscriber makes a persistent session (3.1.1, clean session 0, a fixed
client id), subscribes at QoS 1 and disconnects before the measurement, so
the broker queues every message in the session; the figure is PUBACKs per
second. Afterwards the subscribers come back and count what was queued.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import gc
import hashlib
import itertools
import json
import os
import resource
import socket
import ssl
import struct
import sys
import time

import uvloop

SCENARIOS = (
    "qos0-1to1", "qos1", "qos1-overload", "qos1-overload-fanout", "qos1-overload-fanin", "qos1-latency",
    "qos1-durable", "fanout", "shared", "idle", "tls-handshake-ec", "tls-handshake-rsa",
    "tls-qos0", "ws-qos0",
)  # fmt: skip
CONNACK_OK = b"\x20\x02\x00\x00"  # session present 0, return code 0
CONNACK_RESUMED = b"\x20\x02\x01\x00"  # session present 1, return code 0
DISCONNECT = b"\xe0\x00"
RING_IDS = 4096  # packet ids 1..4096 cycled by a QoS 1 publisher
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProtocolError(Exception):
    pass


# --- MQTT 3.1.1 encoding: only the packets the generator sends ------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect(client_id: str, keepalive: int = 0, clean: bool = True) -> bytes:
    # protocol level 4, flags: clean session (or none: a persistent session)
    flags = b"\x02" if clean else b"\x00"
    body = _str("MQTT") + b"\x04" + flags + struct.pack("!H", keepalive) + _str(client_id)
    return _packet(0x10, body)


def subscribe(topic: str, qos: int) -> bytes:
    return _packet(0x82, b"\x00\x01" + _str(topic) + bytes([qos]))


def suback(qos: int) -> bytes:
    return b"\x90\x03\x00\x01" + bytes([qos])


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    pid = struct.pack("!H", packet_id) if qos else b""
    return _packet(0x30 | qos << 1, _str(topic) + pid + payload)


# --- WebSocket (RFC 6455), client side: the upgrade and masked frames ------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(payload: bytes, mask: bytes) -> bytes:
    """One final binary frame from a client: masked with the 4-byte `mask`."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


def ws_upgrade(host: str, port: int, path: str, key: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    ).encode()


# --- CPU and memory of a process tree, from /proc ---------------------------


def proc_tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        p, i = pids[i], i + 1
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def idle_seconds(cpus) -> float:
    """Time the given CPUs have spent idle since boot (/proc/stat; with
    NO_HZ the kernel times idle periods exactly). A CPU that is not idle may
    be doing interrupt work, which /proc/PID/stat charges to no process."""
    total = 0.0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
                total += int(vals[3]) + int(vals[4])  # idle, iowait
    return total / CLK_TCK


def rss_kib(pid: int) -> int:
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


# --- connections -----------------------------------------------------------


class Client(asyncio.Protocol):
    """Sends `hello` (CONNECT, maybe SUBSCRIBE pipelined behind it), checks
    that the broker answers exactly `reply` (CONNACK, maybe SUBACK), then hands
    every later byte to stream()."""

    def __init__(self, hello: bytes, reply: bytes):
        self.hello = hello
        self.reply = reply
        self.head = b""
        self.handshaking = True
        self.ready = asyncio.get_running_loop().create_future()
        self.transport = None
        self.lost = False
        self.bad = 0  # chunks whose packet framing did not match
        self.lowat = 1
        self.running = True

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.hello)

    def data_received(self, data):
        if self.handshaking:
            self.head += data
            n = len(self.reply)
            if len(self.head) < n:
                return
            head, data = self.head[:n], self.head[n:]
            self.handshaking = False
            if head != self.reply:
                self.ready.set_exception(ProtocolError(f"expected {self.reply!r}, got {head!r}"))
                self.transport.close()
                return
            self.ready.set_result(None)
            if not data:
                return
        self.stream(data)

    def stream(self, data):
        self.bad += 1

    def connection_lost(self, exc):
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection closed during handshake: {exc}"))

    def batch_reads(self, lowat: int):
        """Readable only once `lowat` bytes are queued (SO_RCVLOWAT), so a
        broker that writes one packet per send() still costs the generator
        one read per `lowat` bytes, not one per packet. 1 turns it off."""
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        self.lowat = lowat

    def close(self, hard: bool = False):
        if self.transport.is_closing():
            return
        if hard:  # RST: no TIME_WAIT left behind
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self.transport.write(DISCONNECT)
        self.transport.close()

    def reset(self):
        """Close at once with RST: no TIME_WAIT, and over TLS no close_notify
        sent or waited for (close() waits for the peer's)."""
        if self.transport is None:
            return
        try:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):  # already closed
            pass
        self.transport.abort()


class CountingSubscriber(Client):
    """QoS 0 subscriber: every PUBLISH it gets is `size` bytes long, so the
    count is bytes // size."""

    def __init__(self, hello, reply, size: int, first: int, track_seq: bool = False):
        super().__init__(hello, reply)
        self.size = size
        self.first = first  # first byte of each PUBLISH
        self.phase = 0  # offset of the next packet start in the next chunk
        self.nbytes = 0
        self.track_seq = track_seq  # payloads end with an 8-byte sequence number
        self.seq = 0  # highest sequence number seen

    def stream(self, data):
        marks = data[self.phase :: self.size]
        if marks.count(self.first) != len(marks):
            self.bad += 1
        if self.track_seq and len(data) - self.phase >= self.size:
            # the last packet that starts and ends in this chunk
            end = self.phase + (len(data) - self.phase) // self.size * self.size
            self.seq = int.from_bytes(data[end - 8 : end], "big")
        self.nbytes += len(data)
        self.phase = (self.phase - len(data)) % self.size


class AckingSubscriber(Client):
    """QoS 1 subscriber: answers every PUBLISH (all `size` bytes long, packet
    id at `id_offset`) with a PUBACK, one write per received chunk."""

    def __init__(self, hello, reply, size: int, id_offset: int):
        super().__init__(hello, reply)
        self.size = size
        self.id_offset = id_offset
        self.rest = b""
        self.count = 0

    def stream(self, data):
        if self.rest:
            data = self.rest + data
        size = self.size
        n = len(data) // size
        end = n * size
        if n:
            if data[0:end:size].count(0x32) != n:
                self.bad += 1
            self.inspect(data, end)
            o = self.id_offset
            acks = bytearray(b"\x40\x02\x00\x00" * n)
            acks[2::4] = data[o:end:size]
            acks[3::4] = data[o + 1 : end : size]
            self.transport.write(acks)
            self.count += n
        self.rest = data[end:]

    def inspect(self, data, end):
        """Look at the whole packets data[:end] before they are acknowledged."""


class FloodPublisher(Client):
    """QoS 0 publisher: writes `per_batch` copies of `packet` per write as
    long as the transport is under its high-water mark, then waits for
    resume_writing. With `stamp`, the last 8 payload bytes of each packet
    carry its sequence number (1, 2, ...)."""

    def __init__(self, hello, reply, packet: bytes, per_batch: int, stamp: bool = False):
        super().__init__(hello, reply)
        self.size = len(packet)
        self.batch = packet * per_batch
        self.per_batch = per_batch
        self.stamp = stamp
        self.sent = 0
        self.paused = False
        self.resumed = None

    def connection_made(self, transport):
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * len(self.batch))
        transport.set_write_buffer_limits(high=len(self.batch))

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.resume_writing()

    def stamped(self) -> bytes:
        batch = bytearray(self.batch)
        for i in range(1, self.per_batch + 1):
            end = i * self.size
            batch[end - 8 : end] = (self.sent + i).to_bytes(8, "big")
        return bytes(batch)

    async def run(self, progress=None, ahead=0):
        """Publish until `running` is cleared. With `progress` (the highest
        sequence number subscribers have seen), also stay at most `ahead`
        messages in front of it (for at most 1 s at a time)."""
        loop = asyncio.get_running_loop()
        while self.running and not self.lost:
            if progress is not None:
                deadline = loop.time() + 1.0
                while self.sent - progress() >= ahead and self.running and loop.time() < deadline:
                    await asyncio.sleep(0.001)
            self.transport.write(self.stamped() if self.stamp else self.batch)
            self.sent += self.per_batch
            if self.paused:
                self.resumed = loop.create_future()
                await self.resumed
            else:
                await asyncio.sleep(0)


class WindowPublisher(Client):
    """QoS 1 publisher keeping `window` PUBLISH unacknowledged. `ring` holds
    the packets for ids 1..RING_IDS back to back (each `size` bytes); PUBACKs
    come back in order (MQTT-4.6.0-2), so each one frees the next id."""

    def __init__(self, hello, reply, ring: bytes, size: int, window: int):
        super().__init__(hello, reply)
        self.ring = ring
        self.size = size
        self.window = window
        self.next = 0  # ring index of the next packet to send
        self.sent = 0
        self.acked = 0
        self.abytes = 0
        self.phase = 0

    def begin(self, ack_batch: int):
        # woken once `ack_batch` PUBACKs are in, not for every PUBACK; the
        # broker acknowledges every PUBLISH it gets and `window` > ack_batch
        # are always outstanding, so the wake-up always comes
        self.batch_reads(4 * ack_batch)
        self.send(self.window)

    def send(self, n):
        size, i = self.size, self.next
        j = i + n
        if j <= RING_IDS:
            self.transport.write(self.ring[i * size : j * size])
        else:
            j -= RING_IDS
            self.transport.write(self.ring[i * size :] + self.ring[: j * size])
        self.next = j
        self.sent += n

    def stream(self, data):  # PUBACKs only: 4 bytes each
        marks = data[self.phase :: 4]
        if marks.count(0x40) != len(marks):
            self.bad += 1
        self.phase = (self.phase - len(data)) % 4
        self.abytes += len(data)
        acked = self.abytes >> 2
        n = acked - self.acked
        self.acked = acked
        if n and self.running:
            self.send(n)


class NumberingPublisher(WindowPublisher):
    """WindowPublisher whose payloads begin with its index (4 bytes) and the
    message's sequence number (8 bytes, from 1): a subscriber can tell which
    acknowledged message it never got."""

    def __init__(self, hello, reply, ring: bytes, size: int, window: int, seq_offset: int):
        super().__init__(hello, reply, ring, size, window)
        self.seq_offset = seq_offset  # of the sequence number in each packet

    def send(self, n):
        size, i = self.size, self.next
        j = i + n
        if j <= RING_IDS:
            chunk = bytearray(self.ring[i * size : j * size])
        else:
            j -= RING_IDS
            chunk = bytearray(self.ring[i * size :] + self.ring[: j * size])
        at = self.seq_offset
        for seq in range(self.sent + 1, self.sent + n + 1):
            chunk[at : at + 8] = seq.to_bytes(8, "big")
            at += size
        self.transport.write(chunk)
        self.next = j
        self.sent += n


class NumberedSubscriber(AckingSubscriber):
    """AckingSubscriber that reads each PUBLISH's (publisher, sequence)
    number: per publisher it counts what arrived and how often a number was
    not the one after the last (a gap, a duplicate or a reordering)."""

    def __init__(self, hello, reply, size: int, id_offset: int):
        super().__init__(hello, reply, size, id_offset)
        self.got = collections.Counter()  # publisher -> messages received
        self.last = {}  # publisher -> last sequence number
        self.disorder = 0

    def inspect(self, data, end):
        at = self.id_offset + 2  # the payload, after the packet id
        got, last = self.got, self.last
        for start in range(0, end, self.size):
            pub = int.from_bytes(data[start + at : start + at + 4], "big")
            seq = int.from_bytes(data[start + at + 4 : start + at + 12], "big")
            got[pub] += 1
            if seq != last.get(pub, 0) + 1:
                self.disorder += 1
            last[pub] = seq


class LatencySubscriber(AckingSubscriber):
    """AckingSubscriber that reads each PUBLISH's send time (the first 8
    payload bytes, perf_counter_ns) and keeps, while `recording`, how long
    ago that was when the chunk arrived."""

    def __init__(self, hello, reply, size: int, id_offset: int):
        super().__init__(hello, reply, size, id_offset)
        self.recording = False
        self.samples = []  # nanoseconds

    def data_received(self, data):
        self.arrived = time.perf_counter_ns()
        super().data_received(data)

    def inspect(self, data, end):
        if self.recording:
            at = self.id_offset + 2
            now = self.arrived
            self.samples += [now - int.from_bytes(data[i + at : i + at + 8], "big") for i in range(0, end, self.size)]


class PacedPublisher(Client):
    """QoS 1 publisher that sends one message when told to (send_one), its
    send time in the first 8 payload bytes, and counts PUBACKs."""

    def __init__(self, hello, reply, topic: str, payload_len: int):
        super().__init__(hello, reply)
        template = publish(topic, bytes(payload_len), 1, 1)
        self.id_at = len(template) - payload_len - 2
        self.template = bytearray(template)
        self.sent = 0
        self.acked = 0

    def send_one(self):
        pkt = self.template
        self.sent += 1
        pkt[self.id_at : self.id_at + 2] = (self.sent % 65535 + 1).to_bytes(2, "big")
        pkt[self.id_at + 2 : self.id_at + 10] = time.perf_counter_ns().to_bytes(8, "big")
        self.transport.write(bytes(pkt))

    def stream(self, data):  # PUBACKs only: 4 bytes each
        self.acked += len(data) // 4


class WsClient:
    """Mixin before a Client class: MQTT over WebSocket. The Client's `hello`
    goes out, masked with `mask`, once the broker has answered the HTTP
    upgrade with 101, the right Sec-WebSocket-Accept and subprotocol "mqtt";
    from then on each chunk read is split at the frame headers, and the
    frames' payload, a byte stream, goes to the Client's handshake check and
    then to pieces()."""

    def __init__(self, *a, ws_target, mask: bytes, **kw):
        super().__init__(*a, **kw)
        host, port, path = ws_target
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).lower()
        self.mask = mask
        self.mqtt_hello = ws_frame(self.hello, mask)
        self.hello = ws_upgrade(host, port, path, key)  # what Client.connection_made sends
        self.upgrading = True
        self.http = b""
        self.left = 0  # payload bytes of the current frame still to come
        self.control = False  # the current frame is a control frame (payload skipped)
        self.partial = b""  # an incomplete frame header at the end of the last chunk
        self.frames = 0  # frame headers read

    def data_received(self, data):
        if self.upgrading:
            self.http += data
            end = self.http.find(b"\r\n\r\n")
            if end < 0:
                if len(self.http) > 8192:
                    self.refuse(f"no end of HTTP headers in {len(self.http)} bytes")
                return
            head, data = self.http[:end].lower(), self.http[end + 4 :]
            lines = head.split(b"\r\n")
            fields = dict(ln.split(b":", 1) for ln in lines[1:] if b":" in ln)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if lines[0].split()[1:2] != [b"101"]:
                return self.refuse(f"upgrade refused: {lines[0]!r}")
            if fields.get(b"sec-websocket-accept") != self.accept:
                return self.refuse(f"wrong Sec-WebSocket-Accept {fields.get(b'sec-websocket-accept')!r}")
            if fields.get(b"sec-websocket-protocol") != b"mqtt":
                return self.refuse(f"subprotocol {fields.get(b'sec-websocket-protocol')!r}, not mqtt")
            self.upgrading = False
            self.http = b""
            self.transport.write(self.mqtt_hello)
            if not data:
                return
        data, pieces = self.unframe(data)
        if self.handshaking:
            for a, b in pieces:
                super().data_received(data[a:b])  # the MQTT handshake, then stream()
        else:
            self.pieces(data, pieces)

    def refuse(self, why: str):
        self.upgrading = False
        if not self.ready.done():
            self.ready.set_exception(ProtocolError(why))
        self.transport.close()

    def unframe(self, data):
        """(data, [(start, end), ...]): where the payload of data frames lies
        in `data` (which has the incomplete header of the last chunk, if any,
        in front). Server frames are unmasked; a masked one, or one that is
        neither binary, continuation nor control, counts as a framing error."""
        if self.partial:
            data = self.partial + data
            self.partial = b""
        pieces = []
        n = len(data)
        i = min(self.left, n)
        if i and not self.control:
            pieces.append((0, i))
        left = self.left - i
        while i < n:
            if n - i < 2:
                self.partial = data[i:]
                break
            b0, b1 = data[i], data[i + 1]
            length, h = b1 & 0x7F, 2
            if length >= 126:
                h = 4 if length == 126 else 10
                if n - i < h:
                    self.partial = data[i:]
                    break
                length = int.from_bytes(data[i + 2 : i + h], "big")
            if b1 & 0x80:
                self.bad += 1
                h += 4
                if n - i < h:
                    self.partial = data[i:]
                    break
            opcode = b0 & 0x0F
            self.control = opcode >= 8
            if opcode not in (0, 2, 8, 9, 10):
                self.bad += 1
            self.frames += 1
            start = i + h
            i = min(start + length, n)
            if i > start and not self.control:
                pieces.append((start, i))
            left = start + length - i
        self.left = left
        return data, pieces

    def pieces(self, data, pieces):
        for a, b in pieces:
            self.stream(data[a:b])

    def close(self, hard: bool = False):
        if self.transport.is_closing():
            return
        if hard:
            self.reset()
            return
        self.transport.write(ws_frame(DISCONNECT, self.mask))
        self.transport.close()


class WsCountingSubscriber(WsClient, CountingSubscriber):
    """CountingSubscriber over WebSocket: the frames' payload is counted in
    place, one extended slice per frame."""

    def pieces(self, data, pieces):
        size, first, phase, bad, nbytes = self.size, self.first, self.phase, 0, 0
        for a, b in pieces:
            marks = data[a + phase : b : size]
            if marks.count(first) != len(marks):
                bad += 1
            nbytes += b - a
            phase = (phase - (b - a)) % size
        self.phase = phase
        self.bad += bad
        self.nbytes += nbytes


class WsFloodPublisher(WsClient, FloodPublisher):
    """FloodPublisher over WebSocket: `packet` is already a masked frame."""


# --- scenario plumbing -----------------------------------------------------


async def open_all(args, factories, concurrency=100, tls=None, port=None):
    """Connect every protocol factory, at most `concurrency` handshakes at a
    time; return the protocols once all handshakes are done. `tls`: an
    SSLContext, to connect over TLS; `port`: another than --port."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)

    async def one(factory):
        async with sem:
            _, proto = await loop.create_connection(factory, args.host, port or args.port, ssl=tls)
            await asyncio.wait_for(proto.ready, 30)
            return proto

    return await asyncio.gather(*(one(f) for f in factories))


def snapshot(args, delivered):
    t = os.times()
    snap = {
        "t": time.monotonic(),
        "delivered": delivered(),
        "gen_cpu": t.user + t.system,
        "gen_idle": idle_seconds(os.sched_getaffinity(0)),
    }
    if args.broker_pid:
        snap["broker_cpu"] = sum(cpu_seconds(pid) for pid in [args.broker_pid, *args.also_pid])
        snap["broker_idle"] = idle_seconds(os.sched_getaffinity(args.broker_pid))
    return snap


async def window(args, delivered):
    """Warm up, then measure `delivered()` over the window."""
    await asyncio.sleep(args.warmup)
    a = snapshot(args, delivered)
    await asyncio.sleep(args.duration)
    b = snapshot(args, delivered)
    dt = b["t"] - a["t"]

    def busy(key, pid):
        return round(1 - (b[key] - a[key]) / (dt * len(os.sched_getaffinity(pid))), 3)

    res = {
        "window_s": round(dt, 3),
        "delivered_window": b["delivered"] - a["delivered"],
        "figure": round((b["delivered"] - a["delivered"]) / dt),
        # CPU time of the process (1.0 = one core) and busy share of its cores
        "gen_cpu": round((b["gen_cpu"] - a["gen_cpu"]) / dt, 3),
        "gen_core_busy": busy("gen_idle", 0),
    }
    if args.broker_pid:
        res["broker_cpu"] = round((b["broker_cpu"] - a["broker_cpu"]) / dt, 3)
        res["broker_core_busy"] = busy("broker_idle", args.broker_pid)
    return res


async def drain(args, delivered, expected, quiet=1.0, limit=30.0):
    """After the publishers stop: wait until `expected` messages arrived, or
    until for `quiet` seconds nothing arrived and the broker was mostly idle
    (it may still be working through its input). False if `limit` ran out."""
    start = last_change = time.monotonic()
    last = delivered()
    cpu = cpu_seconds(args.broker_pid) if args.broker_pid else 0.0
    while last < expected:
        await asyncio.sleep(0.05)
        now, n = time.monotonic(), delivered()
        if n != last:
            last, last_change = n, now
            cpu = cpu_seconds(args.broker_pid) if args.broker_pid else 0.0
        elif now - last_change >= quiet:
            used = cpu_seconds(args.broker_pid) - cpu if args.broker_pid else 0.0
            if used < 0.2 * (now - last_change):
                return True
            last_change = now
            cpu += used
        if now - start >= limit:
            return False
    return True


def totals(sent, delivered, drained, conns):
    lost = sent - delivered
    return {
        "sent_total": sent,
        "delivered_total": delivered,
        "lost": lost if drained else None,
        "loss_pct": round(100 * lost / sent, 3) if drained and sent else None,
        "drained": drained,
        "disconnects": sum(c.lost for c in conns),
        "framing_errors": sum(c.bad for c in conns),
    }


def client_id(role: str, i: int = 0) -> str:
    return f"bm{os.getpid()}-{role}{i}"


def tls_context(args, client_cert: bool) -> ssl.SSLContext:
    """The generator's TLS client context: verifies the broker's certificate
    (and host name) against --cafile; with `client_cert`, presents
    --certfile/--keyfile. No session is ever passed back to a handshake, so
    none is resumed."""
    if not args.cafile:
        raise SystemExit(f"{args.scenario} needs --cafile (the CA of the broker's certificate)")
    context = ssl.create_default_context(cafile=args.cafile)
    if client_cert:
        if not (args.certfile and args.keyfile):
            raise SystemExit(f"{args.scenario} needs --certfile and --keyfile (a client certificate)")
        context.load_cert_chain(args.certfile, args.keyfile)
    return context


def tls_info(transport) -> dict:
    sslobj = transport.get_extra_info("ssl_object")
    cipher = sslobj.cipher()
    return {"tls_version": sslobj.version(), "cipher": cipher[0] if cipher else None}


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:120]


# --- scenarios -------------------------------------------------------------


async def qos0_1to1(args, tls=None, ws=False):
    """With `ws`, over WebSocket: each PUBLISH in its own masked frame (the
    mask key drawn once per publisher, so the batch is one frame repeated)."""
    payload = b"x" * args.payload
    subs, pubs = [], []
    target = (args.host, args.port, args.ws_path)
    for i in range(args.pairs):
        topic = f"bench/q0/{os.getpid()}/{i}"
        pkt = publish(topic, payload)
        sub_hello, sub_reply = connect(client_id("s", i)) + subscribe(topic, 0), CONNACK_OK + suback(0)
        pub_hello = connect(client_id("p", i))
        if ws:
            mask = os.urandom(4)
            frame = ws_frame(pkt, mask)
            k = max(1, args.batch // len(frame))
            subs.append(
                lambda h=sub_hello, r=sub_reply, s=len(pkt): WsCountingSubscriber(
                    h, r, s, 0x30, ws_target=target, mask=os.urandom(4)
                )
            )
            pubs.append(
                lambda h=pub_hello, f=frame, k=k, m=mask: WsFloodPublisher(
                    h, CONNACK_OK, f, k, ws_target=target, mask=m
                )
            )
            continue
        k = max(1, args.batch // len(pkt))
        subs.append(lambda h=sub_hello, r=sub_reply, s=len(pkt): CountingSubscriber(h, r, s, 0x30))
        pubs.append(lambda h=pub_hello, p=pkt, k=k: FloodPublisher(h, CONNACK_OK, p, k))
    subs = await open_all(args, subs, tls=tls, port=args.sub_port)
    pubs = await open_all(args, pubs, tls=tls)
    info = tls_info(subs[0].transport) if tls else {}
    res = await flood(args, subs, pubs)
    res.update(pairs=args.pairs, **info)
    if ws:
        # frames the subscribers got per PUBLISH: 1 from a broker that frames
        # each packet, far less from one that frames each write
        res["ws_frames_per_publish"] = round(sum(s.frames for s in subs) / max(1, res["delivered_total"]), 3)
        res["ws_publish_frame_bytes"] = len(frame)
    return res


async def ws_qos0(args):
    """qos0-1to1 over WebSocket."""
    return await qos0_1to1(args, ws=True)


async def tls_qos0(args):
    """qos0-1to1 over TLS, without a client certificate."""
    return await qos0_1to1(args, tls=tls_context(args, client_cert=False))


async def tls_handshake(args):
    """New TLS connections per second: `connectors` loops, each doing a full
    TLS handshake with a client certificate, CONNECT, CONNACK, DISCONNECT,
    then closing with RST, and again. The figure counts cycles that got their
    CONNACK; any other end is a failure, counted by reason."""
    if args.connectors < 1:
        raise SystemExit("--connectors must be >= 1")
    tls = tls_context(args, client_cert=True)
    loop = asyncio.get_running_loop()
    serial = itertools.count()
    failures = collections.Counter()
    done = {"completed": 0, "resumed": 0}
    latency = []  # seconds from connect() to CONNACK, per completed cycle
    info = {}
    running = True

    async def cycle():
        proto = None
        start = time.monotonic()  # loop.time() is uvloop's, in whole ms
        try:
            async with asyncio.timeout(args.timeout):
                _, proto = await loop.create_connection(
                    lambda: Client(connect(client_id("h", next(serial))), CONNACK_OK), args.host, args.port, ssl=tls
                )
                await proto.ready
        except Exception as e:  # noqa: BLE001 - every way a cycle can fail is counted
            failures[failure_reason(e)] += 1
            if proto is not None:
                proto.reset()
            return
        done["completed"] += 1
        latency.append(time.monotonic() - start)
        if proto.transport.get_extra_info("ssl_object").session_reused:
            done["resumed"] += 1
        if not info:
            info.update(tls_info(proto.transport))
        proto.transport.write(DISCONNECT)
        proto.reset()

    async def connector():
        while running:
            await cycle()

    tasks = [asyncio.create_task(connector()) for _ in range(args.connectors)]
    res = await window(args, lambda: done["completed"])
    running = False
    await asyncio.gather(*tasks)
    res["completed_window"] = res.pop("delivered_window")
    res.update(
        unit="conns/s",
        connectors=args.connectors,
        completed_total=done["completed"],
        failures=sum(failures.values()),
        failure_reasons=dict(failures.most_common()),
        resumed=done["resumed"],
        **info,
    )
    if latency:
        latency.sort()
        res["cycle_ms_median"] = round(1000 * latency[len(latency) // 2], 2)
        res["cycle_ms_p99"] = round(1000 * latency[len(latency) * 99 // 100], 2)
    return res


async def flood(args, subs, pubs):
    """Measure QoS 0 FloodPublishers against CountingSubscribers whose
    PUBLISH packets all have subs[0]'s size, where each message sent is due
    to arrive once among `subs`; then stop the publishers, drain, close."""
    size = subs[0].size
    for s in subs:
        s.batch_reads(args.lowat or 16384)

    def delivered():
        return sum(s.nbytes for s in subs) // size

    tasks = [asyncio.create_task(p.run()) for p in pubs]
    res = await window(args, delivered)
    for p in pubs:
        p.running = False
    await asyncio.gather(*tasks)
    sent = sum(p.sent for p in pubs)
    for s in subs:
        s.batch_reads(1)
    drained = await drain(args, delivered, sent)
    res.update(totals(sent, delivered(), drained, subs + pubs), unit="msgs/s")
    for c in subs + pubs:
        c.close()
    return res


def qos1_ring(topic: str, payload: bytes) -> tuple[bytes, int, int]:
    """A QoS 1 publisher's packets for ids 1..RING_IDS back to back, their
    size, and where the packet id sits in each."""
    ring = b"".join(publish(topic, payload, 1, pid) for pid in range(1, RING_IDS + 1))
    size = len(ring) // RING_IDS
    return ring, size, size - len(payload) - 2


async def windowed(args, subs, pubs, delivered):
    """Run WindowPublishers against AckingSubscribers over the window, then
    stop the publishers; returns the window's result and how many
    subscribers read batching was turned off for (see unstall)."""
    for s in subs:
        s.batch_reads(s.size * args.sub_batch)
    for p in pubs:
        p.begin(max(1, args.window // 8))
    watchdog = asyncio.create_task(unstall(subs))
    res = await window(args, delivered)
    watchdog.cancel()
    batching_off = sum(s.lowat == 1 for s in subs)
    for c in subs + pubs:
        c.running = False
        c.batch_reads(1)
    return res, batching_off


async def qos1(args):
    payload = b"x" * args.payload
    if not 0 < args.window < RING_IDS:
        raise SystemExit(f"--window must be in 1..{RING_IDS - 1}")
    subs, pubs = [], []
    for i in range(args.pairs):
        topic = f"bench/q1/{os.getpid()}/{i}"
        ring, size, id_offset = qos1_ring(topic, payload)
        subs.append(
            lambda t=topic, i=i, s=size, o=id_offset: AckingSubscriber(
                connect(client_id("s", i)) + subscribe(t, 1), CONNACK_OK + suback(1), s, o
            )
        )
        pubs.append(
            lambda i=i, r=ring, s=size: WindowPublisher(
                connect(client_id("p", i)), CONNACK_OK, r, s, args.window
            )
        )
    subs = await open_all(args, subs, port=args.sub_port)
    pubs = await open_all(args, pubs)

    def delivered():
        return sum(s.count for s in subs)

    res, batching_off = await windowed(args, subs, pubs, delivered)
    sent = sum(p.sent for p in pubs)
    drained = await drain(args, delivered, sent)
    await drain(args, lambda: sum(p.acked for p in pubs), sent)
    res.update(totals(sent, delivered(), drained, subs + pubs), unit="msgs/s", pairs=args.pairs)
    res["unacked"] = sent - sum(p.acked for p in pubs)
    res["read_batching_off"] = batching_off
    for c in subs + pubs:
        c.close()
    return res


async def qos1_subscribers(args, cls, filters, size: int, id_offset: int) -> list:
    """One `cls` (an AckingSubscriber) per filter, each subscribed at QoS 1."""
    return await open_all(
        args,
        [
            lambda i=i, f=f: cls(connect(client_id("s", i)) + subscribe(f, 1), CONNACK_OK + suback(1), size, id_offset)
            for i, f in enumerate(filters)
        ],
    )


OVERLOAD_SHAPES = {
    # scenario: (publishers, subscribers, wildcard); None = --pairs
    "qos1-overload": (None, None, False),
    "qos1-overload-fanout": (1, 100, False),
    "qos1-overload-fanin": (100, 1, True),
}


async def qos1_overload(args):
    """QoS 1 publishers limited only by their window of unacknowledged
    PUBLISH, every message numbered, to QoS 1 subscribers that acknowledge
    everything they get: does every acknowledged message arrive? Shapes:
    qos1-overload, --pairs publishers each to its own subscriber;
    qos1-overload-fanout, one publisher to 100 subscribers of its topic;
    qos1-overload-fanin, 100 publishers (a topic each) to one subscriber of
    their wildcard. Figure: deliveries per second; afterwards the publishers
    stop, and every message a publisher had acknowledged must have reached
    every subscriber of its topic (lost = those that did not)."""
    if args.payload < 12:
        raise SystemExit(f"{args.scenario} needs --payload >= 12 (the message's number)")
    if not 0 < args.window < RING_IDS:
        raise SystemExit(f"--window must be in 1..{RING_IDS - 1}")
    npub, nsub, wildcard = OVERLOAD_SHAPES[args.scenario]
    npub = npub or args.pairs
    nsub = nsub or args.pairs
    base = f"bench/ov/{os.getpid()}"
    width = len(str(npub - 1))
    topics = [f"{base}/{i:0{width}d}" for i in range(npub)]
    rings = [qos1_ring(t, i.to_bytes(4, "big") + bytes(args.payload - 4)) for i, t in enumerate(topics)]
    _, size, id_offset = rings[0]
    if wildcard:
        filters = [f"{base}/+"] * nsub
    elif npub == nsub:
        filters = topics
    else:
        filters = [topics[0]] * nsub
    subs = await qos1_subscribers(args, NumberedSubscriber, filters, size, id_offset)
    pubs = await open_all(
        args,
        [
            lambda i=i, r=r: NumberingPublisher(
                connect(client_id("p", i)), CONNACK_OK, r, size, args.window, id_offset + 6
            )
            for i, (r, _, _) in enumerate(rings)
        ],
    )
    # which publishers' messages each subscriber is due
    due = [[i for i, t in enumerate(topics) if f == t or f.endswith("/+")] for f in filters]

    def delivered():
        return sum(s.count for s in subs)

    res, batching_off = await windowed(args, subs, pubs, delivered)
    sent = sum(p.sent for p in pubs)
    await drain(args, lambda: sum(p.acked for p in pubs), sent)
    acked = [p.acked for p in pubs]
    expected = sum(acked[i] for d in due for i in d)
    drained = await drain(args, delivered, expected)
    # acknowledged to publisher i and never seen by a subscriber due it
    lost = sum(max(0, acked[i] - s.got[i]) for s, d in zip(subs, due) for i in d)
    res.update(
        unit="deliveries/s",
        publishers=npub,
        subscribers=nsub,
        window=args.window,
        sent_total=sent,
        acked_total=sum(acked),
        unacked=sent - sum(acked),
        expected_deliveries=expected,
        delivered_total=delivered(),
        lost=lost if drained else None,
        loss_pct=round(100 * lost / expected, 3) if drained and expected else None,
        drained=drained,
        disorder=sum(s.disorder for s in subs),
        disconnects=sum(c.lost for c in subs + pubs),
        framing_errors=sum(c.bad for c in subs + pubs),
        read_batching_off=batching_off,
    )
    for c in subs + pubs:
        c.close()
    return res


async def qos1_latency(args):
    """End-to-end latency of QoS 1 at a steady rate well below saturation:
    --latency-pairs publisher/subscriber pairs, --rate messages per second
    in all, evenly spaced (one every 1/rate seconds, the pairs in turn).
    Each subscriber acknowledges at once; a message's
    latency is from just before its publisher's write to the arrival of the
    chunk holding it. Figure: p99 in microseconds (p50, p90, p99.9 and the
    maximum beside it)."""
    if args.payload < 8:
        raise SystemExit("qos1-latency needs --payload >= 8 (the send time)")
    pairs = args.latency_pairs
    topics = [f"bench/lat/{os.getpid()}/{i:03d}" for i in range(pairs)]
    size = len(publish(topics[0], bytes(args.payload), 1, 1))
    id_offset = size - args.payload - 2
    subs = await qos1_subscribers(args, LatencySubscriber, topics, size, id_offset)
    pubs = await open_all(
        args,
        [lambda i=i, t=t: PacedPublisher(connect(client_id("p", i)), CONNACK_OK, t, args.payload) for i, t in enumerate(topics)],
    )
    interval = 1 / args.rate

    async def pace():
        # The event loop spins (sleep(0) polls without blocking), so that a
        # message goes out on time and an arrival is seen at once: timers
        # are only good to a millisecond. The generator has its own core.
        due = time.perf_counter()
        turn = 0
        while pubs[0].running:
            now = time.perf_counter()
            if now >= due:
                pubs[turn].send_one()
                turn = (turn + 1) % pairs
                due = max(due + interval, now - 0.01)  # no catching up in a burst
            await asyncio.sleep(0)

    def delivered():
        return sum(s.count for s in subs)

    # The generator's own collections would show up as latency: none while
    # measuring (it allocates little besides the samples).
    gc.disable()
    task = asyncio.create_task(pace())
    await asyncio.sleep(args.warmup)
    for s in subs:
        s.recording = True
    args.warmup = 0
    res = await window(args, delivered)
    for s in subs:
        s.recording = False
    for p in pubs:
        p.running = False
    await task
    gc.enable()
    sent = sum(p.sent for p in pubs)
    drained = await drain(args, delivered, sent)
    samples = sorted(x for s in subs for x in s.samples)

    def pct(q):
        return round(samples[min(len(samples) - 1, int(len(samples) * q))] / 1000, 1) if samples else None

    res.update(totals(sent, delivered(), drained, subs + pubs))
    res.update(
        unit="us p99",
        figure=pct(0.99),
        p50_us=pct(0.50),
        p90_us=pct(0.90),
        p999_us=pct(0.999),
        max_us=round(samples[-1] / 1000, 1) if samples else None,
        samples=len(samples),
        rate=args.rate,
        pairs=pairs,
        unacked=sent - sum(p.acked for p in pubs),
    )
    for c in subs + pubs:
        c.close()
    return res


async def qos1_durable(args):
    """QoS 1 to persistent sessions whose clients are offline. Before the
    measurement each of `pairs` subscribers connects with clean session 0
    and a fixed client id, subscribes to its topic at QoS 1 and disconnects;
    then a publisher per topic publishes as in qos1 (a window of
    unacknowledged PUBLISH), and every message is queued in the offline
    session. Figure: PUBACKs the publishers received per second. After the
    window, once the PUBACKs are in, the subscribers come back (clean
    session 0; the CONNACK must say session present) and take what their
    sessions queued: acknowledged messages missing then count as lost."""
    payload = b"x" * args.payload
    if not 0 < args.window < RING_IDS:
        raise SystemExit(f"--window must be in 1..{RING_IDS - 1}")
    topics = [f"bench/qd/{os.getpid()}/{i}" for i in range(args.pairs)]
    rings = [qos1_ring(t, payload) for t in topics]
    _, size, id_offset = rings[0]
    # the sessions: made, subscribed, left offline
    setup = await open_all(
        args,
        [
            lambda i=i, t=t: Client(
                connect(client_id("d", i), clean=False) + subscribe(t, 1), CONNACK_OK + suback(1)
            )
            for i, t in enumerate(topics)
        ],
        port=args.sub_port,
    )
    for s in setup:
        s.close()  # DISCONNECT, then close
    async with asyncio.timeout(10):
        while not all(s.lost for s in setup):
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # for the broker to have taken the sessions offline
    pubs = await open_all(
        args,
        [
            lambda i=i, r=r: WindowPublisher(connect(client_id("p", i)), CONNACK_OK, r, size, args.window)
            for i, (r, _, _) in enumerate(rings)
        ],
    )

    def acked():
        return sum(p.acked for p in pubs)

    for p in pubs:
        p.begin(max(1, args.window // 8))
    res = await window(args, acked)
    res["acked_window"] = res.pop("delivered_window")
    for p in pubs:
        p.running = False
        p.batch_reads(1)
    sent = sum(p.sent for p in pubs)
    acks_drained = await drain(args, acked, sent)
    n = acked()
    res.update(
        unit="msgs/s",
        pairs=args.pairs,
        sent_total=sent,
        acked_total=n,
        unacked=sent - n,
        acks_drained=acks_drained,
        disconnects=sum(p.lost for p in pubs),
        framing_errors=sum(p.bad for p in pubs),
    )
    for p in pubs:
        p.close()
    if args.fetch_limit <= 0:
        return res
    # the subscribers come back for their queued messages
    t0 = time.monotonic()
    try:
        back = await open_all(
            args,
            [
                lambda i=i: AckingSubscriber(
                    connect(client_id("d", i), clean=False), CONNACK_RESUMED, size, id_offset
                )
                for i in range(args.pairs)
            ],
            port=args.sub_port,
        )
    except (ProtocolError, OSError, TimeoutError) as e:
        res["fetch_error"] = f"{type(e).__name__}: {e}"[:200]
        return res

    def fetched():
        return sum(s.count for s in back)

    drained = await drain(args, fetched, n, limit=args.fetch_limit)
    got = fetched()
    res.update(
        queued_delivered=got,
        fetch_s=round(time.monotonic() - t0, 3),
        drained=drained,
        lost=n - got if drained else None,
        loss_pct=round(100 * (n - got) / n, 3) if drained and n else None,
        disconnects=res["disconnects"] + sum(s.lost for s in back),
        framing_errors=res["framing_errors"] + sum(s.bad for s in back),
    )
    for s in back:
        s.close()
    return res


async def unstall(subs, tick=0.1):
    """A QoS 1 subscriber reads only once `sub_batch` PUBLISH are queued. A
    broker that keeps fewer than that in flight to one subscriber would stall
    it: a subscriber with no progress over a tick reads every byte from then
    on (reported as read_batching_off)."""
    last = [s.count for s in subs]
    while True:
        await asyncio.sleep(tick)
        for i, s in enumerate(subs):
            if s.count == last[i] and s.lowat > 1:
                s.batch_reads(1)
            last[i] = s.count


async def fanout(args):
    if args.payload < 8:
        raise SystemExit("fanout needs --payload >= 8 (sequence number)")
    payload = b"x" * args.payload
    topic = f"bench/fan/{os.getpid()}"
    pkt = publish(topic, payload)
    size = len(pkt)
    # One PUBLISH costs the broker one write per subscriber: TCP buffers alone
    # would queue seconds of its work. So the publisher also stays at most
    # `ahead` messages in front of the highest sequence number that a sample
    # of subscribers (reading every byte at once) has seen.
    every = max(1, args.subscribers // 16)
    subs = await open_all(
        args,
        [
            lambda i=i: CountingSubscriber(
                connect(client_id("s", i)) + subscribe(topic, 0),
                CONNACK_OK + suback(0),
                size,
                0x30,
                track_seq=i % every == 0,
            )
            for i in range(args.subscribers)
        ],
        port=args.sub_port,
    )
    k = max(1, args.ahead // 8)
    (pub,) = await open_all(args, [lambda: FloodPublisher(connect(client_id("p")), CONNACK_OK, pkt, k, stamp=True)])
    sample = [s for s in subs if s.track_seq]
    for s in subs:
        if not s.track_seq:
            s.batch_reads(args.lowat or 1024)

    def delivered():
        return sum(s.nbytes for s in subs) // size

    task = asyncio.create_task(pub.run(lambda: max(s.seq for s in sample), args.ahead))
    res = await window(args, delivered)
    pub.running = False
    await task
    sent = pub.sent * len(subs)
    for s in subs:
        s.batch_reads(1)
    drained = await drain(args, delivered, sent)
    res.update(totals(sent, delivered(), drained, subs + [pub]), unit="deliveries/s", subscribers=len(subs))
    res["published_per_s"] = round(res["figure"] / len(subs))
    for c in subs + [pub]:
        c.close(hard=True)
    return res


async def shared(args):
    if args.publishers < 1 or args.group < 1:
        raise SystemExit("shared needs --publishers >= 1 and --group >= 1")
    payload = b"x" * args.payload
    base = f"bench/sh/{os.getpid()}"
    # Every member gets every publisher's messages, and a subscriber counts
    # bytes // size: so the topics are zero-padded to one length, which
    # gives all PUBLISH packets the same size.
    width = len(str(args.publishers - 1))
    pkts = [publish(f"{base}/{i:0{width}d}", payload) for i in range(args.publishers)]
    size = len(pkts[0])
    k = max(1, args.batch // size)
    join = subscribe(f"$share/bench/{base}/+", 0)
    subs = await open_all(
        args,
        [
            lambda i=i: CountingSubscriber(connect(client_id("s", i)) + join, CONNACK_OK + suback(0), size, 0x30)
            for i in range(args.group)
        ],
    )
    pubs = await open_all(
        args,
        [lambda i=i, p=p: FloodPublisher(connect(client_id("p", i)), CONNACK_OK, p, k) for i, p in enumerate(pkts)],
    )
    res = await flood(args, subs, pubs)
    res.update(publishers=len(pubs), group=len(subs))
    # how evenly the broker spread the messages (whole run, not the window)
    res["delivered_per_member"] = [s.nbytes // size for s in subs]
    return res


async def idle(args):
    if not args.broker_pid:
        raise SystemExit("idle needs --broker-pid (memory is read from /proc/PID/status)")
    if args.connections + 100 > resource.getrlimit(resource.RLIMIT_NOFILE)[0]:
        raise SystemExit(f"open-file limit too low for {args.connections} connections (ulimit -n)")
    rss0 = rss_kib(args.broker_pid)
    t0 = time.monotonic()
    conns = await open_all(
        args,
        [lambda i=i: Client(connect(client_id("i", i), keepalive=args.keepalive), CONNACK_OK)
         for i in range(args.connections)],
    )
    t1 = time.monotonic()
    await asyncio.sleep(args.settle)
    rss1 = rss_kib(args.broker_pid)
    res = {
        "unit": "KiB/conn",
        "figure": round((rss1 - rss0) / len(conns), 2),
        "connections": len(conns),
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "connect_s": round(t1 - t0, 3),
        "disconnects": sum(c.lost for c in conns),
    }
    for c in conns:
        c.close(hard=True)
    return res


RUNNERS = {
    "qos0-1to1": qos0_1to1,
    "qos1": qos1,
    "qos1-overload": qos1_overload,
    "qos1-latency": qos1_latency,
    "qos1-overload-fanout": qos1_overload,
    "qos1-overload-fanin": qos1_overload,
    "qos1-durable": qos1_durable,
    "fanout": fanout,
    "shared": shared,
    "idle": idle,
    "tls-handshake-ec": tls_handshake,
    "tls-handshake-rsa": tls_handshake,
    "tls-qos0": tls_qos0,
    "ws-qos0": ws_qos0,
}


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--broker-pid", type=int, help="broker process, for its CPU and memory")
    p.add_argument("--also-pid", type=int, action="append", default=[],
                   help="another process whose CPU counts as the broker's: the other nodes of a cluster, nats-server (repeatable)")
    p.add_argument("--sub-port", type=int, help="port the subscribers connect to (another node of a cluster; qos0-1to1, fanout); default --port")
    p.add_argument("--duration", type=float, default=5.0, help="measured window, seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the window")
    p.add_argument("--payload", type=int, default=32, help="payload bytes")
    p.add_argument("--pairs", type=int, default=8, help="publisher/subscriber pairs (qos0-1to1, qos1, qos1-durable, tls-qos0, ws-qos0)")
    p.add_argument("--window", type=int, default=128, help="unacknowledged PUBLISH per publisher (qos1, qos1-overload*, qos1-durable)")
    p.add_argument("--rate", type=float, default=5000, help="messages per second in all (qos1-latency)")
    p.add_argument("--latency-pairs", type=int, default=10, help="publisher/subscriber pairs (qos1-latency)")
    p.add_argument("--sub-batch", type=int, default=4, help="PUBLISH queued before a QoS 1 subscriber reads")
    p.add_argument(
        "--fetch-limit", type=float, default=60.0,
        help="seconds allowed, after the window, for the subscribers to come back and take their queued "
        "messages (qos1-durable); 0 skips that check",
    )
    p.add_argument("--subscribers", type=int, default=1000, help="subscribers (fanout)")
    p.add_argument("--publishers", type=int, default=8, help="publishers, one topic each (shared)")
    p.add_argument("--group", type=int, default=4, help="members of the shared subscription (shared)")
    p.add_argument("--connections", type=int, default=10000, help="connections (idle)")
    p.add_argument("--keepalive", type=int, default=0, help="keep alive of each connection, seconds (idle; 0: none, as before; devices use 30-120)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before reading memory (idle)")
    p.add_argument("--lowat", type=int, help="SO_RCVLOWAT of QoS 0 subscribers, bytes (16384; fanout 1024)")
    p.add_argument("--ahead", type=int, default=64, help="messages published but not yet seen (fanout)")
    p.add_argument("--batch", type=int, default=65536, help="bytes per publisher write (qos0-1to1, shared, tls-qos0, ws-qos0)")
    p.add_argument("--ws-path", default="/mqtt", help="HTTP path of the WebSocket upgrade (ws-qos0)")
    p.add_argument("--cafile", help="CA of the broker's certificate, PEM (tls-*)")
    p.add_argument("--certfile", help="client certificate, PEM (tls-handshake-*)")
    p.add_argument("--keyfile", help="key of --certfile, PEM (tls-handshake-*)")
    p.add_argument("--connectors", type=int, default=64, help="concurrent connect loops (tls-handshake-*)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds allowed for one connection's TLS handshake and CONNACK (tls-handshake-*)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    res = uvloop.run(RUNNERS[args.scenario](args))
    res = {"scenario": args.scenario, **res}
    json.dump(res, sys.stdout)
    print()


if __name__ == "__main__":
    main()
