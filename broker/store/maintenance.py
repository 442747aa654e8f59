"""What an operator does to a store: check it, compact it.

Plain sqlite3 here: these run from the command line, not inside the broker's
loop. ``check`` only reads, so it may run beside a broker using the store;
``compact`` rewrites the file, so it takes the store's lock and refuses while
a broker holds it.
"""

from __future__ import annotations

import os
import sqlite3
import time

import attrs

from .sqlite import (
    INCONSISTENCIES, SCHEMA_VERSION, SESSION_TABLES, UNREFERENCED_MESSAGES, StoreError, StoreLock,
)

#: Rows per table, in the order a report lists them.
TABLES = ("sessions", "subscriptions", "queue", "inflight", "awaiting_rel", "messages",
          "retained", "wills")


@attrs.define(slots=True)
class CheckReport:
    path: str
    schema_version: int
    #: Bytes of the database file and of its write-ahead log.
    size: int
    wal_size: int
    rows: dict[str, int]
    #: Sessions whose expiry ran out while no broker was running (the next
    #: start removes them and publishes their held-back wills).
    expired_sessions: int
    #: What is wrong: damage SQLite found, rows that contradict each other.
    problems: list[str] = attrs.field(factory=list)
    #: Message bodies nothing points at (harmless; compact removes them).
    unreferenced_messages: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _open(path: str, read_only: bool) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise StoreError(f"there is no store at {path}")
    mode = "ro" if read_only else "rw"
    try:
        db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None)
        version = db.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable bastionmq store: {exc}") from None
    if version is None or version[0] > SCHEMA_VERSION:
        db.close()
        raise StoreError(f"{path} has schema version {version and version[0]}; this "
                         f"bastionmq reads {SCHEMA_VERSION}")
    return db


def check(path: str) -> CheckReport:
    """Read the whole store and say what is in it and what is wrong."""
    db = _open(path, read_only=True)
    try:
        report = CheckReport(
            path, db.execute("SELECT version FROM schema_version").fetchone()[0],
            _size(path), _size(path + "-wal"),
            {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
             for table in TABLES},
            db.execute("SELECT count(*) FROM sessions WHERE disconnected_at IS NOT NULL "
                       "AND expiry != 4294967295 AND disconnected_at + expiry <= ?",
                       (time.time(),)).fetchone()[0])
        verdict = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if verdict != ["ok"]:
            report.problems.extend(f"SQLite: {line}" for line in verdict)
        for what, query in INCONSISTENCIES:
            count = db.execute(query).fetchone()[0]
            if count:
                report.problems.append(f"{count} {what}")
        report.unreferenced_messages = db.execute(
            f"SELECT count(*) {UNREFERENCED_MESSAGES}").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        report = CheckReport(path, 0, _size(path), _size(path + "-wal"), {}, 0,
                             [f"SQLite: {exc}"])
    finally:
        db.close()
    return report


@attrs.define(slots=True)
class CompactReport:
    size_before: int
    size_after: int
    #: Rows removed because they pointed at nothing (see INCONSISTENCIES).
    dangling_removed: int
    unreferenced_removed: int


def compact(path: str) -> CompactReport:
    """Drop rows that point at nothing and unreferenced message bodies, then
    rewrite the file to its smallest size. Refuses while a broker runs."""
    lock = StoreLock(path)
    if not os.path.exists(path):
        raise StoreError(f"there is no store at {path}")
    lock.acquire("bastionmq data compact")
    try:
        before = _size(path) + _size(path + "-wal")
        db = _open(path, read_only=False)
        try:
            dangling = 0
            db.execute("BEGIN")
            for table in SESSION_TABLES:
                dangling += db.execute(f"DELETE FROM {table} WHERE sid NOT IN "
                                       "(SELECT sid FROM sessions)").rowcount
            for table in ("queue", "inflight"):
                dangling += db.execute(f"DELETE FROM {table} WHERE message_id NOT IN "
                                       "(SELECT id FROM messages)").rowcount
            unreferenced = db.execute(f"DELETE {UNREFERENCED_MESSAGES}").rowcount
            db.execute("COMMIT")
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot compact {path}: {exc}") from None
        finally:
            db.close()
        return CompactReport(before, _size(path) + _size(path + "-wal"), dangling, unreferenced)
    finally:
        lock.release()
