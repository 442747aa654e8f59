"""The built-in database: users, SCRAM credentials and authorization rules.

EMQX keeps these in Mnesia (``backend = built_in_database`` for both
authentication and authorization); bastionmq keeps them in one SQLite file,
``node.data_dir``/auth.sqlite3, reached through aiosqlite so that no query
blocks the event loop. The file is in WAL mode with a busy timeout, so the
``bastionmq users`` and ``bastionmq acl`` commands can change it while the
broker reads it.

Users (authentication, ``mechanism = password_based``)
    Keyed by ``user_id_type`` (username or clientid, EMQX's setting of the
    same name) and ``user_id``, each with the (password_hash, salt) pair EMQX
    stores, ``is_superuser``, and the hashing algorithm with its parameters.
    The algorithm is kept per user, so changing ``password_hash_algorithm``
    later hashes new passwords differently but never locks out existing
    users. A password check tells an unknown user (the chain moves on) from a
    wrong password (the chain denies). bcrypt and pbkdf2 take milliseconds, so
    they are verified in a worker thread.

Import (EMQX's ``import_users``; ``.csv`` or ``.json`` by extension)
    CSV with a header line, or a JSON array of objects, with the fields
    ``user_id``, then either ``password_hash`` (with optional ``salt``,
    default empty: EMQX's ``hash`` type, hashes made with the algorithm the
    import is given) or ``password`` (EMQX's ``plain`` type: hashed on
    import), and optional ``is_superuser`` (default false)::

        user_id,password_hash,salt,is_superuser
        myuser3,b6c74354...ab75,de1024f462fb83910fd13151bd4bd235,true

    As EMQX's API does, an import replaces users that exist. Stricter than
    EMQX: an unknown column or key, a repeated user_id, or an is_superuser
    other than true or false is an error naming the line (CSV) or entry
    (JSON), and nothing is imported.

SCRAM credentials (``mechanism = scram``)
    Per username: salt, StoredKey, ServerKey, iterations, is_superuser; never
    a password. ``AuthDatabase.get_scram`` is a lookup ScramSha256 accepts.

Authorization rules (``authorization.sources``, ``type = built_in_database``;
acl/builtin_db.py compiles and checks them)
    Each rule belongs to a username, a client id, or all clients, and has a
    place in its owner's ordered list: permission (allow, deny), action
    (publish, subscribe, all), one topic filter, and optionally the QoS levels
    and the retain flag it applies to (EMQX 5.1.1 and later; retain concerns
    publishes only). As in EMQX, a client's rules are tried in the order: its
    client id's, its username's, then the rules for all; the first rule that
    matches decides. Topics may hold ``${username}``, ``${clientid}`` and
    ``${cert_common_name}`` placeholders, and ``${$}`` for a literal '$';
    ``eq t/#`` matches exactly the filter ``t/#`` and is never interpolated.
    A placeholder's value never acts as a wildcard: a rule whose value is
    missing, empty, holds '/', '+', '#' or a control character, or would start
    the filter with '$', does not match (EMQX 6's default; the file source
    does the same).

Management API keys (ops/keys.py makes them)
    Per name: a role (admin, viewer) and the SHA-256 of the key; the key
    itself is shown once when made and never stored.

Bans (the operator's, auth/banned.py applies them)
    By client id, username or peer address, with a reason, who set it, when,
    and until when (none: until lifted), so that they outlive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import sqlite3
import time
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import aiosqlite
import attrs
from scramp import ScramException

from bastionmq.broker.ports import ALLOW_ACCESS, DENY_ACCESS, PUBLISH_ACTION, SUBSCRIBE_ACTION

from .passwords import PasswordHash, hash_password, verify_password
from .scram import DEFAULT_ITERATIONS, ScramCredentials
from .user_import import ImportUser, UserFileError, parse_user_file

__all__ = [
    "API_ROLES", "AclRule", "AlreadyExists", "ApiKey", "AuthDatabase", "Ban", "AuthDatabaseError", "CheckOutcome",
    "ImportResult", "NotFound", "PasswordCheck", "UserRecord", "read_rules",
]

SCHEMA_VERSION = 2
USER_ID_TYPES = ("username", "clientid")
WHO_TYPES = ("clientid", "username", "all")  # also the order rules are tried in
PERMISSIONS = (ALLOW_ACCESS, DENY_ACCESS)
ACTIONS = (PUBLISH_ACTION, SUBSCRIBE_ACTION, "all")
ALL_QOS = (0, 1, 2)
#: What an API key may do: admin everything, viewer only read.
API_ROLES = ("admin", "viewer")
#: What an operator's ban names (EMQX's "as").
BAN_KINDS = ("clientid", "username", "peerhost")
#: How long a command waits for the broker (or another command) to finish writing.
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE users (
    user_id_type  TEXT NOT NULL CHECK (user_id_type IN ('username', 'clientid')),
    user_id       TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    salt          TEXT NOT NULL DEFAULT '',
    is_superuser  INTEGER NOT NULL DEFAULT 0 CHECK (is_superuser IN (0, 1)),
    -- PasswordHash as JSON: how password_hash was made, kept per user
    algorithm     TEXT NOT NULL,
    PRIMARY KEY (user_id_type, user_id)
) WITHOUT ROWID;
CREATE TABLE scram_users (
    username     TEXT PRIMARY KEY,
    salt         BLOB NOT NULL,
    stored_key   BLOB NOT NULL,
    server_key   BLOB NOT NULL,
    iterations   INTEGER NOT NULL CHECK (iterations > 0),
    is_superuser INTEGER NOT NULL DEFAULT 0 CHECK (is_superuser IN (0, 1))
) WITHOUT ROWID;
CREATE TABLE acl_rules (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    who_type   TEXT NOT NULL CHECK (who_type IN ('username', 'clientid', 'all')),
    who        TEXT NOT NULL,  -- '' for all
    position   INTEGER NOT NULL CHECK (position > 0),  -- 1, 2, ... within its who
    permission TEXT NOT NULL CHECK (permission IN ('allow', 'deny')),
    action     TEXT NOT NULL CHECK (action IN ('publish', 'subscribe', 'all')),
    topic      TEXT NOT NULL,
    qos        TEXT,     -- JSON list of levels; NULL: any
    retain     INTEGER CHECK (retain IN (0, 1))  -- NULL: any
);
CREATE INDEX acl_rules_by_who ON acl_rules (who_type, who, position);
"""

#: What each schema version adds to the one before; a database made by an
#: older bastionmq is brought up to date when it is opened.
_MIGRATIONS = {
    2: """
CREATE TABLE api_keys (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
    -- SHA-256 of the key: keys are 256 random bits, so a fast hash is safe,
    -- and the key itself is shown once and never stored
    key_hash   TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE banned (
    kind       TEXT NOT NULL CHECK (kind IN ('clientid', 'username', 'peerhost')),
    value      TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    by         TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    until      REAL,  -- Unix time; NULL: until removed
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;
""",
}

_RULE_COLUMNS = "id, who_type, who, position, permission, action, topic, qos, retain"
_RULE_ORDER = ("ORDER BY CASE who_type WHEN 'clientid' THEN 0 WHEN 'username' THEN 1 ELSE 2 END,"
               " who, position, id")
_USER_COLUMNS = "user_id, user_id_type, is_superuser, algorithm, password_hash, salt"
# Verifying these costs milliseconds: worth a worker thread. The digests cost
# less than handing them to one.
_SLOW_ALGORITHMS = ("bcrypt", "pbkdf2")


class AuthDatabaseError(Exception):
    """The database cannot be used, or a change to it was refused; the
    message is written for an operator."""


class AlreadyExists(AuthDatabaseError):
    """Adding what is there already."""


class NotFound(AuthDatabaseError):
    """Changing or deleting what is not there."""


@attrs.define(slots=True, frozen=True)
class UserRecord:
    user_id: str
    user_id_type: str
    is_superuser: bool
    #: How ``password_hash`` was made.
    algorithm: PasswordHash
    password_hash: str = attrs.field(repr=False)
    salt: str = attrs.field(repr=False)


class CheckOutcome(enum.Enum):
    OK = "ok"
    #: No such user: an authentication chain passes the client on.
    UNKNOWN_USER = "unknown_user"
    #: The user exists; the password is missing or wrong: the chain denies.
    BAD_PASSWORD = "bad_password"


@attrs.define(slots=True, frozen=True)
class PasswordCheck:
    outcome: CheckOutcome
    #: The user, whenever it exists.
    user: UserRecord | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is CheckOutcome.OK


@attrs.define(slots=True, frozen=True)
class ImportResult:
    total: int
    added: int
    #: Users that existed and were replaced.
    replaced: int
    #: Users that existed exactly as imported.
    unchanged: int


@attrs.define(slots=True, frozen=True)
class AclRule:
    id: int
    #: username, clientid or all.
    who_type: str
    #: The username or client id; None for all.
    who: str | None
    #: 1-based place in its owner's list.
    position: int
    permission: str
    action: str
    topic: str
    #: The QoS levels the rule applies to; None: any.
    qos: tuple[int, ...] | None
    #: The retain flag of publishes the rule applies to; None: any.
    retain: bool | None

    def describe(self) -> str:
        """The rule as an operator writes it to ``bastionmq acl add``."""
        who = "--all" if self.who_type == "all" else f"--{self.who_type} {self.who}"
        text = f"{who} {self.permission} {self.action} {self.topic}"
        if self.qos is not None:
            text += f" --qos {','.join(map(str, self.qos))}"
        if self.retain is not None:
            text += f" --retain {str(self.retain).lower()}"
        return text


@attrs.define(slots=True, frozen=True)
class ApiKey:
    """A key of the management API, as stored: its name and role, never the key."""

    name: str
    role: str
    created_at: float


@attrs.define(slots=True, frozen=True)
class Ban:
    """An operator's ban: CONNECTs with this client id, username or peer
    address are refused (CONNACK 0x8A) until ``until`` (Unix time; None:
    until removed)."""

    kind: str
    value: str
    reason: str = ""
    #: Who set it: the API key's name, or "ctl".
    by: str = ""
    created_at: float = 0.0
    until: float | None = None


# ------------------------------------------------------------------ the database


class AuthDatabase:
    """The built-in database, open. ``await AuthDatabase.open(path)``; close
    with ``await db.close()`` or use it as ``async with``."""

    def __init__(self, connection: aiosqlite.Connection, path: str,
                 rule_check: Callable[[AclRule], None] | None = None) -> None:
        self._db = connection
        self.path = path
        #: Refuses (ValueError) a rule authorization could not use; the
        #: rules' meaning is authorization's (acl.builtin_db.check_rule).
        self._rule_check = rule_check
        # One connection serves every coroutine: a transaction must not
        # interleave with another's statements.
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *,
                   rule_check: Callable[[AclRule], None] | None = None) -> AuthDatabase:
        """Open the database at ``path``, creating it (and its directory) when
        missing. A file that is not a bastionmq auth database raises
        AuthDatabaseError naming it. Adding rules needs ``rule_check``."""
        path = os.fspath(path)
        if os.path.isdir(path):
            # Checked here: aiosqlite leaves its worker thread behind when
            # connecting fails, which outlives the event loop.
            raise AuthDatabaseError(f"{path}: is a directory, not the auth database file")
        try:
            _create_private(path)
        except OSError as exc:
            raise AuthDatabaseError(
                f"{path}: cannot create the auth database: {exc.strerror or exc}") from None
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise AuthDatabaseError(f"{path}: cannot open the auth database: {exc}") from None
        try:
            await connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await connection.execute("PRAGMA journal_mode = WAL")
            await _prepare_schema(connection, path)
        except sqlite3.Error as exc:
            await connection.close()
            raise AuthDatabaseError(
                f"{path}: not a usable auth database ({exc}); move it aside and a new "
                "one is made") from None
        except BaseException:
            await connection.close()
            raise
        return cls(connection, path, rule_check)

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> AuthDatabase:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            # IMMEDIATE takes the write lock up front, so a read-then-write
            # cannot fail halfway against the broker or another command.
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def _fetchone(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Row | None:
        async with self._db.execute(sql, parameters) as cursor:
            return await cursor.fetchone()

    async def _fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> Iterable[Any]:
        async with self._db.execute(sql, parameters) as cursor:
            return await cursor.fetchall()

    # ---------------------------------------------------------------- users

    async def add_user(self, user_id: str, password: str | bytes, algorithm: PasswordHash,
                       user_id_type: str = "username", superuser: bool = False) -> UserRecord:
        """Add a user; AlreadyExists when it is there."""
        _check_user_id(user_id, user_id_type)
        password_hash, salt = await _hash(password, algorithm)
        record = UserRecord(user_id, user_id_type, superuser, algorithm, password_hash, salt)
        async with self._transaction() as db:
            if await self._user_row(user_id, user_id_type) is not None:
                raise AlreadyExists(f"{user_id_type} {user_id!r} exists already")
            await db.execute(_INSERT_USER, _user_values(record))
        return record

    async def set_password(self, user_id: str, password: str | bytes,
                           user_id_type: str = "username",
                           algorithm: PasswordHash | None = None) -> UserRecord:
        """Give a user a new password, hashed with ``algorithm`` or, when
        None, the algorithm of its current one; NotFound for an unknown user."""
        current = await self.get_user(user_id, user_id_type)
        if current is None:
            raise NotFound(f"no {user_id_type} {user_id!r}")
        algorithm = algorithm or current.algorithm
        password_hash, salt = await _hash(password, algorithm)
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE users SET password_hash = ?, salt = ?, algorithm = ?"
                " WHERE user_id_type = ? AND user_id = ?",
                (password_hash, salt, _algorithm_json(algorithm), user_id_type, user_id))
            if cursor.rowcount == 0:
                raise NotFound(f"no {user_id_type} {user_id!r}")
        return attrs.evolve(current, algorithm=algorithm, password_hash=password_hash, salt=salt)

    async def delete_user(self, user_id: str, user_id_type: str = "username") -> None:
        """Delete a user; NotFound for an unknown one."""
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM users WHERE user_id_type = ? AND user_id = ?",
                                      (user_id_type, user_id))
            if cursor.rowcount == 0:
                raise NotFound(f"no {user_id_type} {user_id!r}")

    async def get_user(self, user_id: str, user_id_type: str = "username") -> UserRecord | None:
        row = await self._user_row(user_id, user_id_type)
        return None if row is None else _user_from_row(row, self.path)

    async def list_users(self, user_id_type: str | None = None) -> list[UserRecord]:
        """Every user, or those of one user_id_type, by type then user_id."""
        if user_id_type is None:
            rows = await self._fetchall(
                f"SELECT {_USER_COLUMNS} FROM users ORDER BY user_id_type DESC, user_id")
        else:
            rows = await self._fetchall(
                f"SELECT {_USER_COLUMNS} FROM users WHERE user_id_type = ? ORDER BY user_id",
                (user_id_type,))
        return [_user_from_row(row, self.path) for row in rows]

    async def check_password(self, user_id: str, user_id_type: str,
                             password: str | bytes | None) -> PasswordCheck:
        """Whether ``password`` is the user's: OK, UNKNOWN_USER, or
        BAD_PASSWORD (also for a missing password of a known user)."""
        user = await self.get_user(user_id, user_id_type)
        if user is None:
            return PasswordCheck(CheckOutcome.UNKNOWN_USER)
        if password is None:
            return PasswordCheck(CheckOutcome.BAD_PASSWORD, user)
        arguments = (password, user.password_hash, user.salt, user.algorithm)
        if user.algorithm.name in _SLOW_ALGORITHMS:
            matches = await asyncio.to_thread(verify_password, *arguments)
        else:
            matches = verify_password(*arguments)
        return PasswordCheck(CheckOutcome.OK if matches else CheckOutcome.BAD_PASSWORD, user)

    async def import_users(self, path: str | os.PathLike[str], algorithm: PasswordHash,
                           user_id_type: str = "username",
                           password_type: str | None = None) -> ImportResult:
        """Import an EMQX user file (.csv or .json). ``algorithm`` is the one
        the file's hashes were made with, or that its plain passwords are
        hashed with. ``password_type`` is EMQX's ``hash`` or ``plain``; None
        takes each entry's password_hash, else its password. All or nothing:
        a file with any error raises AuthDatabaseError and imports nobody."""
        source = os.fspath(path)
        try:
            with open(source, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise AuthDatabaseError(f"cannot read {source}: {exc.strerror or exc}") from None
        try:
            entries = parse_user_file(source, data, password_type)
        except UserFileError as exc:
            raise AuthDatabaseError(str(exc)) from None
        for entry in entries:
            _check_user_id(entry.user_id, user_id_type)
        records = await asyncio.to_thread(_import_records, entries, algorithm, user_id_type)
        added = replaced = unchanged = 0
        async with self._transaction() as db:
            for record in records:
                row = await self._user_row(record.user_id, user_id_type)
                if row is None:
                    added += 1
                elif _user_from_row(row, self.path) == record:
                    unchanged += 1
                    continue
                else:
                    replaced += 1
                await db.execute(_UPSERT_USER, _user_values(record))
        return ImportResult(len(records), added, replaced, unchanged)

    async def _user_row(self, user_id: str, user_id_type: str) -> sqlite3.Row | None:
        return await self._fetchone(
            f"SELECT {_USER_COLUMNS} FROM users WHERE user_id_type = ? AND user_id = ?",
            (user_id_type, user_id))

    # ---------------------------------------------------------------- SCRAM

    async def add_scram_user(self, username: str, password: str,
                             iterations: int = DEFAULT_ITERATIONS,
                             superuser: bool = False) -> ScramCredentials:
        """Add SCRAM-SHA-256 credentials; AlreadyExists when the user has some."""
        _check_user_id(username, "username")
        credentials = await _scram_credentials(password, iterations, superuser)
        async with self._transaction() as db:
            if await self.get_scram(username) is not None:
                raise AlreadyExists(f"SCRAM user {username!r} exists already")
            await db.execute(
                "INSERT INTO scram_users (username, salt, stored_key, server_key, iterations,"
                " is_superuser) VALUES (?, ?, ?, ?, ?, ?)",
                (username, credentials.salt, credentials.stored_key, credentials.server_key,
                 credentials.iterations, int(superuser)))
        return credentials

    async def set_scram_password(self, username: str, password: str,
                                 iterations: int | None = None) -> ScramCredentials:
        """New SCRAM credentials for ``password``, with ``iterations`` or the
        current count; NotFound for an unknown user."""
        current = await self.get_scram(username)
        if current is None:
            raise NotFound(f"no SCRAM user {username!r}")
        credentials = await _scram_credentials(password, iterations or current.iterations,
                                               current.superuser)
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE scram_users SET salt = ?, stored_key = ?, server_key = ?, iterations = ?"
                " WHERE username = ?",
                (credentials.salt, credentials.stored_key, credentials.server_key,
                 credentials.iterations, username))
            if cursor.rowcount == 0:
                raise NotFound(f"no SCRAM user {username!r}")
        return credentials

    async def delete_scram_user(self, username: str) -> None:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM scram_users WHERE username = ?", (username,))
            if cursor.rowcount == 0:
                raise NotFound(f"no SCRAM user {username!r}")

    async def get_scram(self, username: str) -> ScramCredentials | None:
        """The user's SCRAM credentials, None for an unknown user: a lookup
        for ``ScramSha256(db.get_scram)``."""
        row = await self._fetchone(
            "SELECT salt, stored_key, server_key, iterations, is_superuser FROM scram_users"
            " WHERE username = ?", (username,))
        if row is None:
            return None
        salt, stored_key, server_key, iterations, superuser = row
        return ScramCredentials(bytes(salt), bytes(stored_key), bytes(server_key), iterations,
                                bool(superuser))

    async def list_scram_users(self) -> list[tuple[str, ScramCredentials]]:
        rows = await self._fetchall(
            "SELECT username, salt, stored_key, server_key, iterations, is_superuser"
            " FROM scram_users ORDER BY username")
        return [(username, ScramCredentials(bytes(salt), bytes(stored), bytes(server),
                                            iterations, bool(superuser)))
                for username, salt, stored, server, iterations, superuser in rows]

    # ---------------------------------------------------------------- ACL rules

    async def add_rule(self, who_type: str, who: str | None, permission: str, action: str,
                       topic: str, *, qos: Iterable[int] | None = None,
                       retain: bool | None = None, position: int | None = None) -> AclRule:
        """Add a rule for a username, a client id or (``who_type`` all, ``who``
        None) every client: last in its owner's list, or at ``position``
        (1-based), moving the rules from there on down one place."""
        levels = None if qos is None else tuple(sorted(set(qos)))
        rule = AclRule(0, who_type, who, position or 1, permission, action, topic, levels, retain)
        if self._rule_check is None:
            raise RuntimeError("rules are added to a database opened with a rule_check "
                               "(acl.builtin_db.check_rule)")
        self._rule_check(rule)  # raises ValueError for a rule that could never be checked
        if position is not None and (type(position) is not int or position < 1):
            raise ValueError(f"position {position!r} is not a whole number from 1")
        key = "" if who is None else who
        async with self._transaction() as db:
            row = await self._fetchone(
                "SELECT COALESCE(MAX(position), 0) FROM acl_rules WHERE who_type = ? AND who = ?",
                (who_type, key))
            assert row is not None  # an aggregate gives one row
            last = row[0]
            if position is None or position > last:
                position = last + 1
            else:
                await db.execute(
                    "UPDATE acl_rules SET position = position + 1"
                    " WHERE who_type = ? AND who = ? AND position >= ?",
                    (who_type, key, position))
            cursor = await db.execute(
                "INSERT INTO acl_rules (who_type, who, position, permission, action, topic, qos,"
                " retain) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (who_type, key, position, permission, action, topic,
                 None if levels is None else json.dumps(list(levels)),
                 None if retain is None else int(retain)))
            rule_id = cursor.lastrowid
            assert rule_id is not None  # set by the INSERT
        return attrs.evolve(rule, id=rule_id, position=position)

    async def delete_rule(self, rule_id: int) -> AclRule:
        """Delete a rule by its id, closing the gap in its owner's list;
        returns what it was. NotFound for an unknown id."""
        async with self._transaction() as db:
            row = await self._fetchone(f"SELECT {_RULE_COLUMNS} FROM acl_rules WHERE id = ?",
                                       (rule_id,))
            if row is None:
                raise NotFound(f"no rule with id {rule_id}")
            rule = _rule_from_row(row)
            await db.execute("DELETE FROM acl_rules WHERE id = ?", (rule_id,))
            await db.execute(
                "UPDATE acl_rules SET position = position - 1"
                " WHERE who_type = ? AND who = ? AND position > ?",
                (rule.who_type, row[2], rule.position))
        return rule

    async def list_rules(self, who_type: str | None = None, who: str | None = None
                         ) -> list[AclRule]:
        """Rules in the order they are tried: client ids', usernames', then
        all's; each owner's in its order. Optionally only one kind of owner,
        or one owner."""
        conditions, parameters = [], []
        if who_type is not None:
            conditions.append("who_type = ?")
            parameters.append(who_type)
        if who is not None:
            conditions.append("who = ?")
            parameters.append(who)
        where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        rows = await self._fetchall(
            f"SELECT {_RULE_COLUMNS} FROM acl_rules {where}{_RULE_ORDER}", parameters)
        return [_rule_from_row(row) for row in rows]

    async def all_rules(self) -> list[AclRule]:
        return await self.list_rules()

    # ------------------------------------------------------------- API keys

    async def add_api_key(self, name: str, role: str, key_hash: str) -> ApiKey:
        """Store a management API key by the hash of its secret; AlreadyExists
        for a name in use."""
        if role not in API_ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(API_ROLES)}")
        if not name or not name.isprintable():
            raise ValueError("an API key's name must be non-empty printable text")
        key = ApiKey(name, role, time.time())
        async with self._transaction() as db:
            if await self._fetchone("SELECT 1 FROM api_keys WHERE name = ?", (name,)):
                raise AlreadyExists(f"an API key named {name!r} exists")
            await db.execute("INSERT INTO api_keys (name, role, key_hash, created_at)"
                             " VALUES (?, ?, ?, ?)", (name, role, key_hash, key.created_at))
        return key

    async def delete_api_key(self, name: str) -> None:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM api_keys WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise NotFound(f"no API key named {name!r}")

    async def list_api_keys(self) -> list[ApiKey]:
        rows = await self._fetchall("SELECT name, role, created_at FROM api_keys ORDER BY name")
        return [ApiKey(*row) for row in rows]

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        row = await self._fetchone(
            "SELECT name, role, created_at FROM api_keys WHERE key_hash = ?", (key_hash,))
        return None if row is None else ApiKey(*row)

    # --------------------------------------------------------------- bans

    async def add_ban(self, ban: Ban) -> Ban:
        """Add or replace the ban of ``ban.kind``/``ban.value``."""
        if ban.kind not in BAN_KINDS:
            raise ValueError(f"a ban is by {', '.join(BAN_KINDS)}, not {ban.kind!r}")
        if not ban.value:
            raise ValueError(f"a ban needs the {ban.kind} it bans")
        ban = attrs.evolve(ban, created_at=ban.created_at or time.time())
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO banned (kind, value, reason, by, created_at, until)"
                " VALUES (?, ?, ?, ?, ?, ?)", attrs.astuple(ban))
        return ban

    async def delete_ban(self, kind: str, value: str) -> None:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM banned WHERE kind = ? AND value = ?",
                                      (kind, value))
            if cursor.rowcount == 0:
                raise NotFound(f"no ban of {kind} {value!r}")

    async def list_bans(self) -> list[Ban]:
        rows = await self._fetchall(
            "SELECT kind, value, reason, by, created_at, until FROM banned ORDER BY kind, value")
        return [Ban(*row) for row in rows]


_INSERT_USER = ("INSERT INTO users (user_id, user_id_type, is_superuser, algorithm, password_hash,"
                " salt) VALUES (?, ?, ?, ?, ?, ?)")
_UPSERT_USER = _INSERT_USER.replace("INSERT", "INSERT OR REPLACE", 1)


def _create_private(path: str) -> None:
    """Make the file (and its directory) readable by its owner only, before
    SQLite opens it: it holds password hashes. SQLite gives its -wal and -shm
    files the same permissions."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


async def _prepare_schema(connection: aiosqlite.Connection, path: str) -> None:
    await connection.execute("BEGIN IMMEDIATE")
    try:
        async with connection.execute(_TABLES_SQL) as cursor:
            tables = {name for (name,) in await cursor.fetchall()}
        if not tables:
            await _execute_script(connection, _SCHEMA)
            await connection.execute("INSERT INTO schema_version (version) VALUES (1)")
            version: int | None = 1
        else:
            version = None
            if "schema_version" in tables:
                async with connection.execute(_VERSION_SQL) as cursor:
                    row = await cursor.fetchone()
                    assert row is not None  # MAX gives one row (NULL for no rows)
                    (version,) = row
            _check_schema(path, tables, version)
        assert version is not None  # a new schema is 1; _check_schema refuses None
        for step in range(version + 1, SCHEMA_VERSION + 1):
            await _execute_script(connection, _MIGRATIONS[step])
            await connection.execute("INSERT INTO schema_version (version) VALUES (?)", (step,))
    except BaseException:
        await connection.execute("ROLLBACK")
        raise
    await connection.execute("COMMIT")


async def _execute_script(connection: aiosqlite.Connection, script: str) -> None:
    # One statement at a time: executescript would commit first.
    for statement in script.split(";\n"):
        if statement.strip():
            await connection.execute(statement)


_TABLES_SQL = "SELECT name FROM sqlite_master WHERE type = 'table'"
_VERSION_SQL = "SELECT MAX(version) FROM schema_version"


def _check_schema(path: str, tables: set[str], version: int | None) -> None:
    """Refuse a database this version cannot read: another program's, or a newer bastionmq's."""
    if "schema_version" not in tables:
        raise AuthDatabaseError(
            f"{path}: an SQLite database, but not a bastionmq auth database "
            f"(it has the tables {', '.join(sorted(tables))})")
    if version is None or version > SCHEMA_VERSION:
        raise AuthDatabaseError(
            f"{path}: made by a newer bastionmq (schema version {version}; this one "
            f"reads version {SCHEMA_VERSION})")


def _check_user_id(user_id: str, user_id_type: str) -> None:
    if user_id_type not in USER_ID_TYPES:
        raise ValueError(f"user_id_type {user_id_type!r} is not username or clientid")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"a {user_id_type} must be a non-empty string")


async def _hash(password: str | bytes, algorithm: PasswordHash) -> tuple[str, str]:
    if algorithm.name in _SLOW_ALGORITHMS:
        return await asyncio.to_thread(hash_password, password, algorithm)
    return hash_password(password, algorithm)


async def _scram_credentials(password: str, iterations: int,
                             superuser: bool) -> ScramCredentials:
    try:
        return await asyncio.to_thread(ScramCredentials.from_password, password, iterations,
                                       superuser)
    except ScramException as exc:  # fewer than 4096 iterations (RFC 7677)
        raise ValueError(f"cannot make SCRAM credentials: {exc}") from None


def _algorithm_json(algorithm: PasswordHash) -> str:
    return json.dumps(attrs.asdict(algorithm), sort_keys=True)


def _algorithm_from_json(text: str) -> PasswordHash:
    known = {field.name for field in attrs.fields(PasswordHash)}
    values = json.loads(text)
    return PasswordHash(**{key: value for key, value in values.items() if key in known})


def _user_values(record: UserRecord) -> tuple[Any, ...]:
    return (record.user_id, record.user_id_type, int(record.is_superuser),
            _algorithm_json(record.algorithm), record.password_hash, record.salt)


def _user_from_row(row: Sequence[Any], path: str) -> UserRecord:
    user_id, user_id_type, superuser, algorithm, password_hash, salt = row
    try:
        parsed = _algorithm_from_json(algorithm)
    except (ValueError, TypeError) as exc:
        raise AuthDatabaseError(
            f"{path}: {user_id_type} {user_id!r} has an unreadable algorithm: {exc}") from None
    return UserRecord(user_id, user_id_type, bool(superuser), parsed, password_hash, salt)


def _import_records(entries: Sequence[ImportUser], algorithm: PasswordHash,
                    user_id_type: str) -> list[UserRecord]:
    """The records of an import; hashes plain passwords (run in a thread)."""
    records = []
    for entry in entries:
        if entry.password is not None:
            password_hash, salt = hash_password(entry.password, algorithm)
        else:
            # An ImportUser has a password or a hash (parse_user_file makes sure).
            assert entry.password_hash is not None
            password_hash, salt = entry.password_hash, entry.salt
        records.append(UserRecord(entry.user_id, user_id_type, entry.is_superuser, algorithm,
                                  password_hash, salt))
    return records


# ------------------------------------------------------------------ ACL rules


def _rule_from_row(row: Sequence[Any]) -> AclRule:
    rule_id, who_type, who, position, permission, action, topic, qos, retain = row
    return AclRule(rule_id, who_type, None if who_type == "all" else who, position, permission,
                   action, topic, None if qos is None else tuple(json.loads(qos)),
                   None if retain is None else bool(retain))


def read_rules(path: str | os.PathLike[str]) -> list[AclRule]:
    """Every rule, read without the event loop (for loading an authorization
    source at start or on SIGHUP). A missing file has no rules."""
    source = os.fspath(path)
    if not os.path.exists(source):
        return []
    try:
        with contextlib.closing(sqlite3.connect(source, timeout=BUSY_TIMEOUT_MS / 1000)) as db:
            tables = {name for (name,) in db.execute(_TABLES_SQL)}
            if not tables:
                return []
            version = None
            if "schema_version" in tables:
                version = db.execute(_VERSION_SQL).fetchone()[0]
            _check_schema(source, tables, version)
            rows = db.execute(f"SELECT {_RULE_COLUMNS} FROM acl_rules {_RULE_ORDER}").fetchall()
    except sqlite3.Error as exc:
        raise AuthDatabaseError(f"{source}: not a usable auth database ({exc})") from None
    return [_rule_from_row(row) for row in rows]
