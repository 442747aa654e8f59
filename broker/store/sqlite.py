"""The durable store: SQLite in WAL mode, written through aiosqlite.

The core records its changes in a ``Journal``; this store commits the
journal's batches one after another (group commit): a batch is written when
``commit_interval`` has passed since its first change, or at once when it
holds ``batch_size`` changes, and while one batch commits the next fills.
The acknowledgements a batch holds are written to their clients only once it
has committed, so whatever a client has been told is stored is on disk.

A batch that fails to commit (a full disk, say) is tried again every second,
and its acknowledgements wait: the broker never says a message is safe when
it is not.

One broker at a time owns a store: a lock file beside the database keeps a
second one (or ``bastionmq data compact``) away.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import stat
import time
from typing import Any, Callable, Iterator

import aiosqlite

from ..codec import Subscription, Will, decode_properties
from ..message import Message
from ..packet_types import PUBLISH, WILL
from ..properties import NO_PROPERTIES
from ..stats import Buckets
from .journal import Batch, Journal, decode_ids
from .records import Snapshot, StoredSession, StoredWill

log = logging.getLogger("bastionmq.store")

#: The layout this code reads and writes; kept in the schema_version table.
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, properties BLOB, expires_at REAL);
CREATE TABLE retained (
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    properties BLOB, expires_at REAL) WITHOUT ROWID;
CREATE TABLE sessions (
    sid INTEGER PRIMARY KEY, client_id TEXT NOT NULL, expiry INTEGER NOT NULL,
    disconnected_at REAL, username TEXT, client TEXT);
CREATE TABLE wills (
    client_id TEXT PRIMARY KEY, username TEXT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, properties BLOB, due REAL,
    client TEXT) WITHOUT ROWID;
CREATE TABLE subscriptions (
    sid INTEGER NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL,
    no_local INTEGER NOT NULL, retain_as_published INTEGER NOT NULL,
    retain_handling INTEGER NOT NULL, identifier INTEGER,
    PRIMARY KEY (sid, filter)) WITHOUT ROWID;
CREATE TABLE queue (
    sid INTEGER NOT NULL, seq INTEGER NOT NULL, message_id INTEGER NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, subscription_ids TEXT, share TEXT,
    PRIMARY KEY (sid, seq)) WITHOUT ROWID;
CREATE TABLE inflight (
    sid INTEGER NOT NULL, packet_id INTEGER NOT NULL, message_id INTEGER NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, subscription_ids TEXT, share TEXT,
    released INTEGER NOT NULL, PRIMARY KEY (sid, packet_id)) WITHOUT ROWID;
CREATE TABLE awaiting_rel (
    sid INTEGER NOT NULL, packet_id INTEGER NOT NULL, stream_id TEXT,
    PRIMARY KEY (sid, packet_id)) WITHOUT ROWID;
CREATE TABLE positions (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""

#: Each layout's step from the one before: MIGRATIONS[n] takes version n to n + 1.
MIGRATIONS = {
    # The facts of the client a session or will belongs to (broker.ownership);
    # rows of version 1 have none, and are matched on their username alone.
    1: "ALTER TABLE sessions ADD COLUMN client TEXT; ALTER TABLE wills ADD COLUMN client TEXT;",
    # Where the node got to in its cluster's stream, and the id a QoS 2
    # message awaiting release was stored under there (cluster.stream).
    2: "CREATE TABLE positions (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID; "
       "ALTER TABLE awaiting_rel ADD COLUMN stream_id TEXT;",
}

#: Tables whose rows belong to a session, by the name of their key's second part.
SESSION_TABLES = {"subscriptions": "filter", "queue": "seq", "inflight": "packet_id",
                  "awaiting_rel": "packet_id"}

#: How the rows of one database can contradict each other: (what, query
#: counting such rows). None of these can come from the broker's own
#: transactions; they mean the file was damaged or edited.
INCONSISTENCIES = (
    ("queue entries pointing at a missing message",
     "SELECT count(*) FROM queue WHERE message_id NOT IN (SELECT id FROM messages)"),
    ("in-flight entries pointing at a missing message",
     "SELECT count(*) FROM inflight WHERE message_id NOT IN (SELECT id FROM messages)"),
    *((f"{table} rows of a missing session",
       f"SELECT count(*) FROM {table} WHERE sid NOT IN (SELECT sid FROM sessions)")
      for table in SESSION_TABLES),
)

#: Message bodies no queue or in-flight entry points at any more.
UNREFERENCED_MESSAGES = ("FROM messages WHERE id NOT IN (SELECT message_id FROM queue) "
                         "AND id NOT IN (SELECT message_id FROM inflight)")

SYNCHRONOUS = ("full", "normal")

#: Bucket bounds of the commit latency (seconds) and of the changes per
#: committed batch, for the metrics.
COMMIT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0)
COMMIT_BATCH_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
                        2000.0, 5000.0, 10000.0)

#: Seconds between attempts to commit a batch that failed.
RETRY_INTERVAL = 1.0
#: Seconds a write waits for another writer to let go of the database (only
#: someone editing the file by hand can be one) before it counts as failed.
BUSY_TIMEOUT = 1.0


class StoreError(Exception):
    """The store cannot be used; the message says why and what to do."""


class StoreLock:
    """An exclusive lock on ``<database>.lock``, held while the store is open."""

    def __init__(self, path: str) -> None:
        self.path = path + ".lock"
        self._fd: int | None = None

    def acquire(self, holder: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise StoreError(f"{self.path} is held by {other}: one broker (or `bastionmq "
                             "data compact`) at a time may use a store") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()})".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _refuse_unsafe(folder: str, path: str) -> None:
    """StoreError for a store another local user could redirect or replace:
    a folder anyone may write to, or one of its files a symbolic link (the
    broker would write wherever it points)."""
    mode = os.stat(folder).st_mode
    if mode & stat.S_IWOTH:
        raise StoreError(f"{folder} is writable by every user (mode {stat.S_IMODE(mode):o}): "
                         "give the store a folder only the broker's user may write to")
    for name in (path, path + ".lock", path + "-wal", path + "-shm", path + "-journal"):
        if os.path.islink(name):
            raise StoreError(f"{name} is a symbolic link: the store's files must be "
                             "regular files")


def _rows(table: dict) -> tuple[list[tuple], list[tuple]]:
    """(rows to write, keys to delete) of one of a batch's tables."""
    upserts = []
    deletes = []
    for key, row in table.items():
        if row is None:
            deletes.append(key if isinstance(key, tuple) else (key,))
        else:
            upserts.append(row)
    return upserts, deletes


def batch_statements(batch: Batch) -> Iterator[tuple[str, list[tuple]]]:
    """The statements that write ``batch``, each with its rows."""
    tables = (
        ("messages", batch.messages, 7, "id = ?"),
        ("retained", batch.retained, 5, "topic = ?"),
        ("subscriptions", batch.subscriptions, 7, "sid = ? AND filter = ?"),
        ("queue", batch.queue, 7, "sid = ? AND seq = ?"),
        ("inflight", batch.inflight, 8, "sid = ? AND packet_id = ?"),
        ("awaiting_rel", batch.awaiting, 3, "sid = ? AND packet_id = ?"),
        ("wills", batch.wills, 9, "client_id = ?"),
    )
    for name, table, width, where in tables:
        if not table:
            continue
        upserts, deletes = _rows(table)
        if upserts:
            yield (f"INSERT OR REPLACE INTO {name} VALUES ({', '.join('?' * width)})", upserts)
        if deletes:
            yield f"DELETE FROM {name} WHERE {where}", deletes
    if batch.positions:
        yield "INSERT OR REPLACE INTO positions VALUES (?, ?)", list(batch.positions.items())
    if batch.sessions:
        yield "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)", \
            list(batch.sessions.values())
    if batch.ended:
        # Last: these sweep every row of a session, folded or not.
        ended = [(sid,) for sid in batch.ended]
        for name in (*SESSION_TABLES, "sessions"):
            yield f"DELETE FROM {name} WHERE sid = ?", ended


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return "the file is not an SQLite database (or is damaged)"
    return text


async def _connect(path: str, synchronous: str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
    try:
        # list(): the rows are a list, but aiosqlite's types promise only an Iterable.
        mode = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))[0][0]
        if mode.lower() != "wal":
            raise StoreError(f"{path}: cannot use write-ahead logging (journal mode {mode})")
        await db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except BaseException:
        await db.close()
        raise
    return db


async def _schema_version(db: aiosqlite.Connection, path: str) -> int | None:
    """The file's schema version; None for a new, empty file."""
    tables = {row[0] for row in await db.execute_fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "schema_version" not in tables:
        raise StoreError(f"{path} is an SQLite database but not a bastionmq store "
                         f"(it has tables {', '.join(sorted(tables))})")
    rows = list(await db.execute_fetchall("SELECT version FROM schema_version"))  # see _connect
    if len(rows) != 1:
        raise StoreError(f"{path}: the schema_version table should hold one row, not {len(rows)}")
    return rows[0][0]


class SqliteStore:
    """An open store. ``open``, then ``load`` and ``start``; ``close`` at the end."""

    def __init__(self, path: str, db: aiosqlite.Connection, lock: StoreLock,
                 batch_size: int, commit_interval: float) -> None:
        self.path = path
        self._db = db
        self._lock = lock
        self.batch_size = batch_size
        self.commit_interval = commit_interval
        self.journal: Journal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: Callable[[list], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._committing: asyncio.Task | None = None
        self._next_ids = (1, 1, 1)
        self._closing = False
        #: Each commit's latency (from BEGIN to COMMIT done, as the loop
        #: waits for it) and its batch's changes; failed attempts are not counted.
        self.commit_seconds = Buckets(COMMIT_SECONDS_BUCKETS)
        self.commit_batch_size = Buckets(COMMIT_BATCH_BUCKETS)

    @classmethod
    async def open(cls, path: str, *, batch_size: int = 1000, commit_interval: float = 0.005,
                   synchronous: str = "full") -> SqliteStore:
        """Open (or make) the store at ``path``; StoreError when it cannot be
        used, damaged or of a newer layout included."""
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}")
        folder = os.path.dirname(path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot make the folder {folder}: {exc.strerror}") from None
        _refuse_unsafe(folder, path)
        lock = StoreLock(path)
        try:
            lock.acquire("a running broker")
        except OSError as exc:
            raise StoreError(f"cannot lock {lock.path}: {exc.strerror}") from None
        try:
            # Messages are the clients' data: readable by the broker's user
            # only (SQLite gives its -wal and -shm files the same mode).
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            db = await _connect(path, synchronous)
        except StoreError:
            lock.release()
            raise
        except (sqlite3.Error, OSError) as exc:
            lock.release()
            raise StoreError(f"cannot open {path}: {_describe(exc)}") from None
        store = cls(path, db, lock, batch_size, commit_interval)
        try:
            await store._prepare()
        except BaseException as exc:
            await db.close()
            lock.release()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot use {path}: {_describe(exc)}") from None
            raise
        return store

    async def _prepare(self) -> None:
        db = self._db
        version = await _schema_version(db, self.path)
        if version is None:
            await db.executescript(
                f"BEGIN; {SCHEMA} INSERT INTO schema_version VALUES ({SCHEMA_VERSION}); COMMIT;")
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer bastionmq (schema "
                             f"{version}; this one reads {SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            steps = "".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
            await db.executescript(f"BEGIN; {steps} UPDATE schema_version SET version = "
                                   f"{SCHEMA_VERSION}; COMMIT;")
            log.info("%s: layout brought from schema %d to %d", self.path, version, SCHEMA_VERSION)
        verdict = [row[0] for row in await db.execute_fetchall("PRAGMA quick_check")]
        if verdict != ["ok"]:
            raise StoreError(f"{self.path} is damaged: {'; '.join(verdict[:5])}. "
                             "`bastionmq data check` tells more")
        problems = [f"{count} {what}" for what, query in INCONSISTENCIES
                    for count in [list(await db.execute_fetchall(query))[0][0]] if count]
        if problems:
            raise StoreError(f"{self.path} is inconsistent: {'; '.join(problems)}. "
                             "`bastionmq data compact` removes such rows")

    # ------------------------------------------------------- loading

    async def load(self, to_loop: float) -> Snapshot:
        """Everything stored; ``to_loop`` turns wall-clock times into the
        loop's (loop time minus wall time, now)."""
        db = self._db
        await db.execute(f"DELETE {UNREFERENCED_MESSAGES}")
        messages: dict[int, Message] = {}
        for mid, topic, payload, qos, retain, props, expires_at in await db.execute_fetchall(
                "SELECT * FROM messages"):
            message = messages[mid] = _message(topic, payload, qos, retain, props, expires_at,
                                               to_loop)
            message.store_id = mid
        sessions: dict[int, StoredSession] = {}
        for sid, client_id, expiry, disconnected_at, username, client in \
                await db.execute_fetchall("SELECT * FROM sessions ORDER BY sid"):
            sessions[sid] = StoredSession(sid, client_id, expiry, disconnected_at, username,
                                          client)
        wills = [StoredWill(client_id, username,
                            Will(topic, payload, qos, bool(retain),
                                 decode_properties(props, WILL) if props else {}), due, client)
                 for client_id, username, topic, payload, qos, retain, props, due, client
                 in await db.execute_fetchall("SELECT * FROM wills")]
        for sid, topic_filter, qos, no_local, rap, handling, identifier in \
                await db.execute_fetchall("SELECT * FROM subscriptions"):
            sessions[sid].subscriptions.append((
                Subscription(topic_filter, qos, bool(no_local), bool(rap), handling), identifier))
        for sid, seq, mid, qos, retain, ids, share in await db.execute_fetchall(
                "SELECT * FROM queue ORDER BY sid, seq"):
            message = messages[mid]
            message.store_refs += 1
            sessions[sid].queue.append((seq, message, qos, bool(retain), decode_ids(ids), share))
        for sid, packet_id, mid, qos, retain, ids, share, released in await db.execute_fetchall(
                "SELECT * FROM inflight ORDER BY sid, packet_id"):
            message = messages[mid]
            message.store_refs += 1
            sessions[sid].inflight.append((packet_id, message, qos, bool(retain),
                                           decode_ids(ids), share, bool(released)))
        for sid, packet_id, stream_id in await db.execute_fetchall(
                "SELECT sid, packet_id, stream_id FROM awaiting_rel"):
            sessions[sid].awaiting_rel.append((packet_id, stream_id))
        retained = [_message(topic, payload, qos, True, props, expires_at, to_loop)
                    for topic, payload, qos, props, expires_at in await db.execute_fetchall(
                        "SELECT * FROM retained")]
        positions: dict[str, int] = {name: value for name, value in await db.execute_fetchall(
            "SELECT name, value FROM positions")}
        (next_seq,), = await db.execute_fetchall("SELECT coalesce(max(seq), 0) + 1 FROM queue")
        self._next_ids = (max(messages, default=0) + 1, next_seq, max(sessions, default=0) + 1)
        return Snapshot(list(sessions.values()), retained, wills, len(messages), positions)

    # ------------------------------------------------------- committing

    def start(self, loop: asyncio.AbstractEventLoop,
              release: Callable[[list[tuple[Any, bytes]]], None]) -> Journal:
        """The journal the core records into; ``release`` writes a committed
        batch's held acknowledgements."""
        self._loop = loop
        self._release = release
        next_message, next_seq, next_sid = self._next_ids
        self.journal = Journal(loop.time, self.batch_size, self._on_first, self._on_full,
                               next_message, next_seq, next_sid)
        return self.journal

    def _on_first(self) -> None:
        if self._committing is None and self._timer is None:
            assert self._loop is not None  # set by start(), which makes the journal calling this
            self._timer = self._loop.call_later(self.commit_interval, self._commit_now)

    def _on_full(self) -> None:
        if self._committing is None:
            self._commit_now()

    def _commit_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self.journal is not None and self._loop is not None  # set by start()
        batch = self.journal.take()
        if batch:
            self.journal.committing = True
            self._committing = self._loop.create_task(self._commit(batch))

    async def _commit(self, batch: Batch) -> None:
        while True:
            # Not the loop's clock: uvloop's advances in milliseconds, once per turn.
            started = time.perf_counter()
            try:
                await self._write(batch)
                self.commit_seconds.observe(time.perf_counter() - started)
                self.commit_batch_size.observe(batch.size)
                break
            except (sqlite3.Error, OSError) as exc:
                if self._closing:
                    # Stopping must not hang on a disk that will not take it;
                    # nothing of it was acknowledged.
                    log.error("could not commit %d changes to %s while stopping: %s; they are "
                              "not stored, and the %d acknowledgements they held were not sent",
                              batch.size, self.path, _describe(exc), len(batch.acks))
                    self._settled(batch, StoreError(f"could not commit to {self.path}"))
                    return
                log.error("could not commit %d changes to %s: %s; their %d acknowledgements "
                          "wait, trying again in %ss", batch.size, self.path, _describe(exc),
                          len(batch.acks), RETRY_INTERVAL)
                await asyncio.sleep(RETRY_INTERVAL)
        if batch.acks:
            assert self._release is not None  # set by start(), before any batch
            self._release(batch.acks)
        self._settled(batch, None)
        # What arrived during this commit has waited long enough.
        assert self.journal is not None  # set by start(), before any batch
        if self.journal.batch:
            self._commit_now()

    def _settled(self, batch: Batch, error: StoreError | None) -> None:
        self._committing = None
        assert self.journal is not None  # set by start(), before any batch
        self.journal.committing = False
        for waiter in batch.waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    async def _write(self, batch: Batch) -> None:
        db = self._db
        await db.execute("BEGIN")
        try:
            for statement, rows in batch_statements(batch):
                await db.executemany(statement, rows)
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise

    async def flush(self) -> None:
        """Commit everything recorded so far."""
        while True:
            if self._committing is not None:
                await asyncio.shield(self._committing)
            elif self.journal is not None and self.journal.batch:
                self._commit_now()
            else:
                return

    async def committed(self) -> None:
        """Return once every change recorded so far has committed."""
        journal = self.journal
        assert journal is not None and self._loop is not None  # for a started store only
        if journal.batch.size or self._committing is not None:
            waiter = self._loop.create_future()
            journal.batch.waiters.append(waiter)
            if self._committing is None and self._timer is None:
                self._commit_now()
            await waiter

    async def close(self) -> None:
        """Commit what is left, then close the database and its lock."""
        self._closing = True
        try:
            await self.flush()
            # Leaves the database in one file, the log empty.
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("could not fold the write-ahead log of %s into it: %s (the next "
                        "start does)", self.path, _describe(exc))
        finally:
            await self._db.close()
            self._lock.release()


def _message(topic: str, payload: bytes, qos: int, retain: int, props: bytes | None,
             expires_at: float | None, to_loop: float) -> Message:
    message = Message(topic, payload, qos, bool(retain),
                      decode_properties(props, PUBLISH) if props else NO_PROPERTIES)
    if expires_at is not None:
        message.expires_at = expires_at + to_loop
    return message
