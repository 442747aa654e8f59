"""The built-in database: users, SCRAM credentials and ACL rules in a real SQLite file."""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from scramp import ScramClient

from bastionmq.acl.builtin_db import BuiltinAclSource, check_rule
from bastionmq.auth.builtin_db import (
    AlreadyExists, AuthDatabase, AuthDatabaseError, CheckOutcome, NotFound, read_rules,
)
from bastionmq.auth.passwords import PasswordHash, hash_password
from bastionmq.auth.scram import ScramSha256
from bastionmq.auth.user_import import UserFileError, parse_user_file
from bastionmq.broker.ports import (
    AccessRequest, AuthRequest, CertificateFacts, ClientInfo, PeerCertificate, PeerInfo,
)

# EMQX's documented import examples (Use HTTP API to Manage User Data).
EMQX_CSV = """\
user_id,password_hash,salt,is_superuser
myuser3,b6c743545a7817ae8c8f624371d5f5f0373234bb0ff36b8ffbf19bce0e06ab75,de1024f462fb83910fd13151bd4bd235,true
myuser4,ee68c985a69208b6eda8c6c9b4c7c2d2b15ee2352cdd64a903171710a99182e8,ad773b5be9dd0613fe6c2f4d8c403139,false
"""
EMQX_JSON = """\
[
  {
      "user_id":"myuser1",
      "password_hash":"c5e46903df45e5dc096dc74657610dbee8deaacae656df88a1788f1847390242",
      "salt": "e378187547bf2d6f0545a3f441aa4d8a",
      "is_superuser": true
  },
  {
      "user_id":"myuser2",
      "password_hash":"f4d17f300b11e522fd33f497c11b126ef1ea5149c74d2220f9a16dc876d4567b",
      "salt": "6d3f9bd5b54d94b98adbcfe10b6d181f",
      "is_superuser": false
  }
]
"""
SHA256 = PasswordHash("sha256", salt_position="prefix")
FAST_BCRYPT = PasswordHash("bcrypt", salt_rounds=5)

ALGORITHMS = [
    PasswordHash("plain", salt_position="disable"),
    PasswordHash("md5", salt_position="suffix"),
    PasswordHash("sha", salt_position="prefix"),
    SHA256,
    PasswordHash("sha256", salt_position="disable"),
    PasswordHash("sha512", salt_position="suffix"),
    FAST_BCRYPT,
    PasswordHash("pbkdf2", mac_fun="sha512", iterations=50, dk_length=32),
    PasswordHash("pbkdf2", mac_fun="sha", iterations=10),
]


def run_async(test):
    """Run an ``async def`` test in a fresh event loop."""
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(test(*args, **kwargs))
    return wrapper


def open_db(tmp_path: Path) -> Any:
    return AuthDatabase.open(tmp_path / "data" / "auth.sqlite3", rule_check=check_rule)


# ------------------------------------------------------------------ users


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: f"{a.name}-{a.salt_position}")
@run_async
async def test_each_algorithm_checks_the_password_it_hashed(tmp_path, algorithm):
    async with await open_db(tmp_path) as db:
        added = await db.add_user("alice", "s3cret", algorithm)
        assert added.algorithm == algorithm
        good = await db.check_password("alice", "username", "s3cret")
        assert good.ok and good.outcome is CheckOutcome.OK and good.user.user_id == "alice"
        bad = await db.check_password("alice", "username", "s3cret!")
        assert bad.outcome is CheckOutcome.BAD_PASSWORD and not bad.ok
    # The algorithm is kept with the user: a new process checks it without being told.
    async with await open_db(tmp_path) as db:
        assert (await db.get_user("alice")).algorithm == algorithm
        assert (await db.check_password("alice", "username", "s3cret")).ok


@run_async
async def test_unknown_user_wrong_password_and_missing_password_differ(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_user("alice", "pw", SHA256, superuser=True)
        unknown = await db.check_password("bob", "username", "pw")
        assert unknown.outcome is CheckOutcome.UNKNOWN_USER and unknown.user is None
        wrong = await db.check_password("alice", "username", "nope")
        assert wrong.outcome is CheckOutcome.BAD_PASSWORD and wrong.user.is_superuser
        missing = await db.check_password("alice", "username", None)
        assert missing.outcome is CheckOutcome.BAD_PASSWORD
        ok = await db.check_password("alice", "username", b"pw")  # MQTT passwords are bytes
        assert ok.ok and ok.user.is_superuser


@run_async
async def test_usernames_and_client_ids_are_separate(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_user("dev-1", "as-user", SHA256)
        await db.add_user("dev-1", "as-client", SHA256, user_id_type="clientid")
        assert (await db.check_password("dev-1", "username", "as-user")).ok
        assert (await db.check_password("dev-1", "clientid", "as-client")).ok
        assert not (await db.check_password("dev-1", "clientid", "as-user")).ok
        assert [(u.user_id_type, u.user_id) for u in await db.list_users()] == [
            ("username", "dev-1"), ("clientid", "dev-1")]
        assert [u.user_id_type for u in await db.list_users("clientid")] == ["clientid"]


@run_async
async def test_adding_twice_changing_and_deleting(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_user("alice", "one", SHA256)
        with pytest.raises(AlreadyExists, match="alice"):
            await db.add_user("alice", "two", SHA256)
        # A new password keeps the user's algorithm unless told otherwise.
        changed = await db.set_password("alice", "two")
        assert changed.algorithm == SHA256
        assert not (await db.check_password("alice", "username", "one")).ok
        assert (await db.check_password("alice", "username", "two")).ok
        changed = await db.set_password("alice", "three", algorithm=FAST_BCRYPT)
        assert changed.algorithm == FAST_BCRYPT
        assert (await db.check_password("alice", "username", "three")).ok
        await db.delete_user("alice")
        assert await db.get_user("alice") is None
        with pytest.raises(NotFound):
            await db.delete_user("alice")
        with pytest.raises(NotFound):
            await db.set_password("alice", "four")
        with pytest.raises(ValueError):
            await db.add_user("", "pw", SHA256)
        with pytest.raises(ValueError):
            await db.add_user("x", "pw", SHA256, user_id_type="email")


@run_async
async def test_the_record_is_what_emqx_stores(tmp_path):
    async with await open_db(tmp_path) as db:
        record = await db.add_user("alice", "pw", SHA256)
    assert len(record.salt) == 32
    assert record.password_hash == hashlib.sha256((record.salt + "pw").encode()).hexdigest()
    assert "password_hash" not in repr(record) and record.salt not in repr(record)


# ------------------------------------------------------------------ import


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@run_async
async def test_import_emqx_csv_example(tmp_path):
    source = write(tmp_path, "myusers.csv", EMQX_CSV)
    async with await open_db(tmp_path) as db:
        result = await db.import_users(source, SHA256)
        assert (result.total, result.added, result.replaced, result.unchanged) == (2, 2, 0, 0)
        myuser3 = await db.get_user("myuser3")
        assert myuser3.is_superuser and myuser3.salt == "de1024f462fb83910fd13151bd4bd235"
        assert myuser3.password_hash.startswith("b6c743545a78")
        assert not (await db.get_user("myuser4")).is_superuser
        # Known user, wrong password: denied, not passed on.
        check = await db.check_password("myuser3", "username", "guess")
        assert check.outcome is CheckOutcome.BAD_PASSWORD
        # Importing the same file again changes nothing; a changed user is replaced.
        again = await db.import_users(source, SHA256)
        assert (again.added, again.replaced, again.unchanged) == (0, 0, 2)
        write(tmp_path, "myusers.csv", EMQX_CSV.replace(",true", ",false"))
        changed = await db.import_users(source, SHA256)
        assert (changed.added, changed.replaced, changed.unchanged) == (0, 1, 1)


@run_async
async def test_import_emqx_json_example_as_client_ids(tmp_path):
    source = write(tmp_path, "users.json", EMQX_JSON)
    async with await open_db(tmp_path) as db:
        result = await db.import_users(source, SHA256, user_id_type="clientid")
        assert result.added == 2
        assert (await db.get_user("myuser1", "clientid")).is_superuser
        assert await db.get_user("myuser1", "username") is None


@pytest.mark.parametrize("algorithm", [SHA256, FAST_BCRYPT], ids=lambda a: a.name)
@run_async
async def test_imported_hashes_and_plain_passwords_verify(tmp_path, algorithm):
    password_hash, salt = hash_password("hunter2", algorithm)
    hashed = write(tmp_path, "hashed.csv",
                   f"user_id,password_hash,salt\nalice,{password_hash},{salt}\n")
    plain = write(tmp_path, "plain.json",
                  json.dumps([{"user_id": "bob", "password": "pw", "is_superuser": "true"}]))
    async with await open_db(tmp_path) as db:
        await db.import_users(hashed, algorithm)
        await db.import_users(plain, algorithm)
        assert (await db.check_password("alice", "username", "hunter2")).ok
        bob = await db.check_password("bob", "username", "pw")
        assert bob.ok and bob.user.is_superuser and bob.user.password_hash != "pw"


def test_import_plain_csv_the_bootstrap_way():
    users = parse_user_file("boot.csv", b"user_id,password,is_superuser\r\nadmin,pw,TRUE\r\n"
                                        b"\r\nguest,pw2,\r\n", "plain")
    assert [(user.user_id, user.password, user.is_superuser) for user in users] == [
        ("admin", "pw", True), ("guest", "pw2", False)]


@pytest.mark.parametrize("name, text, password_type, message", [
    ("u.csv", "user_id,passwd\nalice,x\n", None, "line 1: unknown column 'passwd'"),
    ("u.csv", "user_id,password_hash\nalice,x\nbob\n", None,
     "line 3: password_hash or password is missing"),
    ("u.csv", "user_id,password\nalice,x\n", "hash", "line 2: password_hash is missing"),
    ("u.csv", "user_id,password_hash,is_superuser\nalice,x,yes\n", None,
     "line 2: is_superuser 'yes' is not true or false"),
    ("u.csv", "user_id,password_hash\nalice,x\nalice,y\n", None,
     "line 3: user_id 'alice' is given again (first at line 2)"),
    ("u.csv", "user_id,password_hash\nalice,x,extra\n", None, "line 2: more fields"),
    ("u.csv", "user_id,password_hash\n", None, "no users in the file"),
    ("u.json", '{"user_id": "a"}', None, "a JSON array of users"),
    ("u.json", '[{"user_id": "a",\n "password_hash": }]', None, "line 2: invalid JSON"),
    ("u.json", '[{"user_id": "a", "password_hash": 5}]', None,
     "entry 1: password_hash must be a string"),
    ("u.json", '[{"user_id": "a", "password_hash": "x", "role": "x"}]', None,
     "entry 1: unknown key 'role'"),
    ("u.txt", "user_id\n", None, "unknown file type '.txt'"),
])
def test_import_file_errors_name_the_place(name, text, password_type, message):
    with pytest.raises(UserFileError) as caught:
        parse_user_file(name, text.encode(), password_type)
    assert str(caught.value).startswith(f"{name}: ")
    assert message in str(caught.value)


@run_async
async def test_import_is_all_or_nothing(tmp_path):
    source = write(tmp_path, "u.csv", "user_id,password_hash,is_superuser\na,x,true\nb,y,maybe\n")
    async with await open_db(tmp_path) as db:
        with pytest.raises(AuthDatabaseError, match="line 3"):
            await db.import_users(source, SHA256)
        assert await db.list_users() == []
        with pytest.raises(AuthDatabaseError, match="cannot read"):
            await db.import_users(tmp_path / "missing.csv", SHA256)


# ------------------------------------------------------------------ SCRAM


def peer(**facts: Any) -> PeerInfo:
    certificate = None
    if facts:
        now = datetime.datetime.now(datetime.timezone.utc)
        parsed = CertificateFacts(subject=f"CN={facts['common_name']}", issuer="CN=ca", serial=1,
                                  sha256="00", not_before=now, not_after=now, **facts)
        certificate = PeerCertificate(b"der", lambda _der: parsed)
    return PeerInfo(listener="tcp:default", address=("127.0.0.1", 50000), certificate=certificate)


@run_async
async def test_scram_credentials_serve_an_exchange(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_scram_user("carol", "pencil", iterations=4096, superuser=True)
        with pytest.raises(AlreadyExists):
            await db.add_scram_user("carol", "other")
        assert await db.get_scram("nobody") is None

        async def exchange(password: str) -> Any:
            request = AuthRequest(client_id="c1", username=None, password=None, peer=peer(),
                                  protocol_level=5, properties={})
            conversation = ScramSha256(db.get_scram).begin(request)
            client = ScramClient(["SCRAM-SHA-256"], "carol", password)
            step = await conversation.step(client.get_client_first().encode())
            client.set_server_first(step.data.decode())
            return conversation.step(client.get_client_final().encode()).result

        result = await exchange("pencil")
        assert result.allowed and result.superuser and result.identity == "carol"
        assert not (await exchange("crayon")).allowed
        await db.set_scram_password("carol", "crayon")
        assert (await exchange("crayon")).allowed
        assert [name for name, _ in await db.list_scram_users()] == ["carol"]
        await db.delete_scram_user("carol")
        with pytest.raises(NotFound):
            await db.delete_scram_user("carol")
        with pytest.raises(ValueError, match="4096"):
            await db.add_scram_user("dave", "pw", iterations=100)


# ------------------------------------------------------------------ ACL rules


def client(client_id: str = "c1", username: str | None = "alice", **facts: Any) -> ClientInfo:
    return ClientInfo(client_id=client_id, username=username, peer=peer(**facts))


def publish(who: ClientInfo, topic: str, qos: int = 0, retain: bool = False) -> AccessRequest:
    return AccessRequest(client=who, action="publish", topic=topic, qos=qos, retain=retain)


def subscribe(who: ClientInfo, topic: str, qos: int = 0) -> AccessRequest:
    return AccessRequest(client=who, action="subscribe", topic=topic, qos=qos)


async def source_of(db: AuthDatabase) -> BuiltinAclSource:
    return BuiltinAclSource(await db.all_rules())


@run_async
async def test_client_id_rules_then_username_rules_then_all(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_rule("all", None, "deny", "all", "t/#")
        await db.add_rule("username", "alice", "allow", "publish", "t/#")
        await db.add_rule("clientid", "c1", "deny", "publish", "t/secret")
        acl = await source_of(db)
        assert acl.check(publish(client(), "t/secret")) == "deny"     # client id's rule
        assert acl.check(publish(client(), "t/open")) == "allow"      # username's
        assert acl.check(publish(client("c2"), "t/secret")) == "allow"
        assert acl.check(subscribe(client(), "t/open")) == "deny"     # all's
        assert acl.check(publish(client("c2", None), "t/open")) == "deny"  # no username
        assert acl.check(publish(client(), "elsewhere")) is None      # no rule: no answer
        assert [rule.who_type for rule in await db.all_rules()] == ["clientid", "username", "all"]


@run_async
async def test_rules_keep_their_places(tmp_path):
    async with await open_db(tmp_path) as db:
        first = await db.add_rule("username", "alice", "allow", "publish", "a/#")
        second = await db.add_rule("username", "alice", "deny", "publish", "#")
        top = await db.add_rule("username", "alice", "deny", "publish", "a/b", position=1)
        assert [(r.id, r.position) for r in await db.list_rules("username", "alice")] == [
            (top.id, 1), (first.id, 2), (second.id, 3)]
        acl = await source_of(db)
        assert acl.check(publish(client(), "a/b")) == "deny"
        assert acl.check(publish(client(), "a/c")) == "allow"
        assert acl.check(publish(client(), "z")) == "deny"
        removed = await db.delete_rule(top.id)
        assert removed.topic == "a/b"
        assert [r.position for r in await db.list_rules("username", "alice")] == [1, 2]
        assert (await source_of(db)).check(publish(client(), "a/b")) == "allow"
        with pytest.raises(NotFound, match=str(top.id)):
            await db.delete_rule(top.id)
        # Far past the end is simply last.
        last = await db.add_rule("username", "alice", "allow", "all", "x", position=99)
        assert last.position == 3
        assert await db.list_rules("clientid") == []


@run_async
async def test_publish_matches_topics_and_subscribe_must_be_covered(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_rule("all", None, "allow", "all", "a/+")
        await db.add_rule("all", None, "allow", "subscribe", "eq b/#")
        await db.add_rule("all", None, "allow", "all", "#")
        await db.add_rule("all", None, "deny", "all", "+/private")  # after '#': never reached
        acl = await source_of(db)
        assert acl.check(publish(client(), "a/b")) == "allow"
        assert acl.check(subscribe(client(), "a/+")) == "allow"
        assert acl.check(subscribe(client(), "b/#")) == "allow"       # eq: exactly this filter
        assert acl.check(subscribe(client(), "b/c")) == "allow"       # through '#'
        assert acl.check(publish(client(), "$SYS/broker")) is None    # wildcards skip $ topics
        assert acl.check(subscribe(client(), "$SYS/#")) is None
    async with await open_db(tmp_path / "second") as db:
        await db.add_rule("all", None, "allow", "subscribe", "a/+")
        await db.add_rule("all", None, "allow", "subscribe", "eq b/#")
        acl = await source_of(db)
        assert acl.check(subscribe(client(), "a/#")) is None          # '+' does not cover '#'
        assert acl.check(subscribe(client(), "b/c")) is None          # eq is not a filter


@run_async
async def test_qos_and_retain_qualifiers(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_rule("all", None, "deny", "publish", "t", retain=True)
        await db.add_rule("all", None, "allow", "all", "t", qos=[0, 1])
        acl = await source_of(db)
        assert acl.check(publish(client(), "t", retain=True)) == "deny"
        assert acl.check(publish(client(), "t", qos=1)) == "allow"
        assert acl.check(publish(client(), "t", qos=2)) is None
        assert acl.check(subscribe(client(), "t", qos=2)) is None
        assert acl.check(subscribe(client(), "t", qos=0)) == "allow"
        rules = await db.all_rules()
        assert [(r.qos, r.retain) for r in rules] == [(None, True), ((0, 1), None)]


@run_async
async def test_placeholders_are_values_never_wildcards(tmp_path):
    async with await open_db(tmp_path) as db:
        await db.add_rule("all", None, "allow", "all", "users/${username}/#")
        await db.add_rule("all", None, "allow", "publish", "devices/${clientid}")
        await db.add_rule("all", None, "allow", "publish", "certs/${cert_common_name}")
        await db.add_rule("all", None, "allow", "publish", "${username}/inbox")
        await db.add_rule("all", None, "allow", "publish", "price/${$}{username}")
        await db.add_rule("all", None, "allow", "subscribe", "eq home/${username}")
        acl = await source_of(db)
        assert acl.check(publish(client(), "users/alice/x")) == "allow"
        assert acl.check(publish(client(), "users/bob/x")) is None
        assert acl.check(publish(client("dev7"), "devices/dev7")) == "allow"
        assert acl.check(publish(client(common_name="cn1"), "certs/cn1")) == "allow"
        assert acl.check(publish(client(), "certs/cn1")) is None      # no certificate
        assert acl.check(publish(client(), "price/${username}")) == "allow"
        assert acl.check(subscribe(client(), "home/${username}")) == "allow"
        assert acl.check(subscribe(client(), "home/alice")) is None
        for unsafe in ("+", "#", "a/b", "", None):
            assert acl.check(publish(client(username=unsafe), "users/x/y")) is None, unsafe
        assert acl.check(publish(client(username="$SYS"), "$SYS/inbox")) is None
        assert acl.check(publish(client(client_id="+"), "devices/x")) is None


@pytest.mark.parametrize("arguments, options, message", [
    (("all", None, "allow", "all", "a/#/b"), {}, "invalid topic filter"),
    (("all", None, "allow", "all", "a/${zone}"), {}, "unknown placeholder ${zone}"),
    (("all", None, "allow", "all", "eq "), {}, "invalid topic filter"),
    (("all", None, "allow", "subscribe", "t"), {"retain": True}, "retain applies to publish"),
    (("all", None, "allow", "all", "t"), {"qos": [3]}, "qos [3]"),
    (("all", None, "allow", "all", "t"), {"qos": []}, "qos []"),
    (("all", None, "permit", "all", "t"), {}, "permission 'permit'"),
    (("all", None, "allow", "pubsub", "t"), {}, "action 'pubsub'"),
    (("all", "alice", "allow", "all", "t"), {}, "a rule for all names nobody"),
    (("username", None, "allow", "all", "t"), {}, "a rule for all names nobody"),
    (("username", "", "allow", "all", "t"), {}, "must not be empty"),
    (("ipaddr", "1.2.3.4", "allow", "all", "t"), {}, "username, a clientid or all"),
    (("all", None, "allow", "all", "t"), {"position": 0}, "position 0"),
])
@run_async
async def test_invalid_rules_are_refused(tmp_path, arguments, options, message):
    async with await open_db(tmp_path) as db:
        with pytest.raises(ValueError) as caught:
            await db.add_rule(*arguments, **options)
        assert message in str(caught.value)
        assert await db.all_rules() == []


@run_async
async def test_read_rules_without_the_event_loop(tmp_path):
    path = tmp_path / "data" / "auth.sqlite3"
    assert read_rules(path) == []  # no database yet: no rules
    async with await AuthDatabase.open(path, rule_check=check_rule) as db:
        await db.add_rule("username", "alice", "allow", "publish", "a")
        await db.add_rule("all", None, "deny", "all", "#", qos=[2])
        assert read_rules(path) == await db.all_rules()


# ------------------------------------------------------------------ the file


@run_async
async def test_the_file_is_private_in_wal_mode_and_shared(tmp_path):
    path = tmp_path / "data" / "auth.sqlite3"
    async with await AuthDatabase.open(path) as broker, \
            await AuthDatabase.open(path, rule_check=check_rule) as tool:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("SELECT MAX(version) FROM schema_version").fetchall() == [(2,)]
        # One connection writes while the other reads, as the CLI does beside the broker.
        await tool.add_user("alice", "pw", SHA256)
        assert (await broker.check_password("alice", "username", "pw")).ok
        await tool.add_rule("all", None, "allow", "all", "#")
        assert len(await broker.all_rules()) == 1


@run_async
async def test_a_corrupt_file_is_named_in_a_clear_error(tmp_path):
    path = tmp_path / "auth.sqlite3"
    path.write_bytes(b"this is not a database, " * 200)
    with pytest.raises(AuthDatabaseError) as caught:
        await AuthDatabase.open(path)
    assert str(caught.value).startswith(f"{path}: not a usable auth database")
    with pytest.raises(AuthDatabaseError, match="not a usable auth database"):
        read_rules(path)


@run_async
async def test_other_sqlite_databases_and_newer_schemas_are_refused(tmp_path):
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(AuthDatabaseError, match="not a bastionmq auth database.*photos"):
        await AuthDatabase.open(other)
    with pytest.raises(AuthDatabaseError, match="not a bastionmq auth database"):
        read_rules(other)
    newer = tmp_path / "newer.sqlite3"
    await (await AuthDatabase.open(newer)).close()
    with sqlite3.connect(newer) as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(AuthDatabaseError, match="newer bastionmq.*99"):
        await AuthDatabase.open(newer)
    with pytest.raises(AuthDatabaseError, match="newer bastionmq"):
        read_rules(newer)
    with pytest.raises(AuthDatabaseError, match=str(tmp_path)):
        await AuthDatabase.open(tmp_path)  # a directory


@run_async
async def test_a_version_1_database_gains_api_keys_and_bans_keeping_its_users(tmp_path):
    path = tmp_path / "auth.sqlite3"
    async with await AuthDatabase.open(path) as db:
        await db.add_user("old-user", "pw", PasswordHash())
    with sqlite3.connect(path) as raw:  # as the first release left it
        raw.execute("DROP TABLE api_keys")
        raw.execute("DROP TABLE banned")
        raw.execute("DELETE FROM schema_version WHERE version > 1")
    async with await AuthDatabase.open(path) as db:
        assert (await db.check_password("old-user", "username", "pw")).ok
        await db.add_api_key("ops", "admin", "ab" * 32)
        assert [key.name for key in await db.list_api_keys()] == ["ops"]
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT MAX(version) FROM schema_version").fetchone() == (2,)


@run_async
async def test_api_keys_are_found_by_hash_only_and_named_once(tmp_path):
    from bastionmq.ops.keys import key_hash, new_key
    async with await AuthDatabase.open(tmp_path / "auth.sqlite3") as db:
        secret = new_key()
        assert secret.startswith("bmq_") and len(secret) > 40
        await db.add_api_key("grafana", "viewer", key_hash(secret))
        found = await db.find_api_key(key_hash(secret))
        assert (found.name, found.role) == ("grafana", "viewer")
        assert await db.find_api_key(key_hash(secret + "x")) is None
        with pytest.raises(AlreadyExists):
            await db.add_api_key("grafana", "admin", key_hash(new_key()))
        with pytest.raises(ValueError, match="role"):
            await db.add_api_key("root", "superuser", key_hash(new_key()))
        await db.delete_api_key("grafana")
        assert await db.find_api_key(key_hash(secret)) is None
        with pytest.raises(NotFound):
            await db.delete_api_key("grafana")


@run_async
async def test_bans_are_kept_replaced_and_lifted(tmp_path):
    from bastionmq.auth.builtin_db import Ban
    async with await AuthDatabase.open(tmp_path / "auth.sqlite3") as db:
        await db.add_ban(Ban("clientid", "rogue", "flooding", "ops"))
        await db.add_ban(Ban("peerhost", "192.0.2.7", until=4102444800.0))
        await db.add_ban(Ban("clientid", "rogue", "still flooding", "ops"))
        bans = await db.list_bans()
        assert [(b.kind, b.value, b.reason) for b in bans] == [
            ("clientid", "rogue", "still flooding"), ("peerhost", "192.0.2.7", "")]
        assert bans[1].until == 4102444800.0 and bans[0].created_at > 0
        with pytest.raises(ValueError, match="clientid, username, peerhost"):
            await db.add_ban(Ban("ip", "x"))
        await db.delete_ban("clientid", "rogue")
        with pytest.raises(NotFound):
            await db.delete_ban("clientid", "rogue")
        assert len(await db.list_bans()) == 1
