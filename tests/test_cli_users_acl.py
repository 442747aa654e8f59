"""``bastionmq users`` and ``bastionmq acl``: the operator's commands on the built-in database."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bastionmq.acl.builtin_db import BuiltinAclSource
from bastionmq.auth.builtin_db import AuthDatabase
from bastionmq.broker.ports import AccessRequest, ClientInfo, PeerInfo
from bastionmq.cli import main

# bcrypt at its lowest cost keeps the tests fast.
CONFIG = """
node.data_dir = "{data}"
authentication = [
  {{ mechanism = password_based, backend = built_in_database, user_id_type = {user_id_type}
     password_hash_algorithm {{ name = bcrypt, salt_rounds = 5 }} }}
]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "bastionmq.conf"
    path.write_text(CONFIG.format(data=tmp_path / "data", user_id_type="username"))
    return path


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "data" / "auth.sqlite3"


def bastionmq(config: Path, *args: str, input: str | None = None) -> Any:
    runner = CliRunner()
    return runner.invoke(main, [*args, "-c", str(config)], input=input,
                         env={"BASTIONMQ_NODE__DATA_DIR": None})


def ok(config: Path, *args: str, input: str | None = None) -> str:
    result = bastionmq(config, *args, input=input)
    assert result.exit_code == 0, result.output
    return result.output


def fails(config: Path, *args: str, code: int = 1) -> str:
    """The one-line error of a refused command; never a traceback."""
    result = bastionmq(config, *args)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result.output


def query(database: Path, action: Any) -> Any:
    async def run() -> Any:
        async with await AuthDatabase.open(database) as db:
            return await action(db)
    return asyncio.run(run())


def password_ok(database: Path, user: str, password: str, user_id_type: str = "username") -> bool:
    return query(database, lambda db: db.check_password(user, user_id_type, password)).ok


# ------------------------------------------------------------------ users


def test_add_list_passwd_del(config, database):
    output = ok(config, "users", "add", "alice", "--password", "s3cret", "--superuser")
    assert output == f"added username 'alice' to {database} (bcrypt, superuser)\n"
    assert password_ok(database, "alice", "s3cret")
    assert query(database, lambda db: db.get_user("alice")).algorithm.salt_rounds == 5

    ok(config, "users", "add", "sensor-1", "--clientid", "--password", "pw",
       "--algorithm", "sha512")
    record = query(database, lambda db: db.get_user("sensor-1", "clientid"))
    assert record.algorithm.name == "sha512"

    listing = ok(config, "users", "list").splitlines()
    assert listing[0].split() == ["TYPE", "USER", "ALGORITHM", "SUPERUSER"]
    assert [line.split() for line in listing[1:]] == [
        ["username", "alice", "bcrypt", "yes"], ["clientid", "sensor-1", "sha512"]]
    assert "s3cret" not in "".join(listing) and record.password_hash not in "".join(listing)

    ok(config, "users", "passwd", "alice", "--password", "n3w")
    assert password_ok(database, "alice", "n3w") and not password_ok(database, "alice", "s3cret")

    assert ok(config, "users", "del", "sensor-1", "--clientid") == "deleted clientid 'sensor-1'\n"
    assert query(database, lambda db: db.get_user("sensor-1", "clientid")) is None


def test_the_password_prompt_does_not_echo(config, database):
    output = ok(config, "users", "add", "bob", input="hidden-pw\nhidden-pw\n")
    assert "Password" in output and "Repeat for confirmation" in output
    assert "hidden-pw" not in output
    assert password_ok(database, "bob", "hidden-pw")
    # Two different entries, then nothing more: refused, nobody added.
    result = bastionmq(config, "users", "add", "carol", input="one\ntwo\n")
    assert result.exit_code != 0 and "do not match" in result.output
    assert query(database, lambda db: db.get_user("carol")) is None


def test_refusals_are_one_line(config, database):
    ok(config, "users", "add", "alice", "--password", "pw")
    assert fails(config, "users", "add", "alice", "--password", "pw") == \
        "Error: username 'alice' exists already\n"
    assert fails(config, "users", "passwd", "nobody", "--password", "pw") == \
        "Error: no username 'nobody'\n"
    assert fails(config, "users", "del", "nobody") == "Error: no username 'nobody'\n"
    assert fails(config, "users", "add", "x", "--password", "") == \
        "Error: the password must not be empty\n"
    assert "belong to a username" in fails(
        config, "users", "add", "x", "--scram", "--clientid", "--password", "pw", code=2)


def test_the_configured_user_id_type_is_the_default(tmp_path, database):
    config = tmp_path / "clientid.conf"
    config.write_text(CONFIG.format(data=tmp_path / "data", user_id_type="clientid"))
    assert "added clientid 'dev-9'" in ok(config, "users", "add", "dev-9", "--password", "pw")
    assert "added username 'dev-9'" in ok(config, "users", "add", "dev-9", "--username",
                                          "--password", "pw")
    assert password_ok(database, "dev-9", "pw", "clientid")


def test_scram_users(config, database):
    output = ok(config, "users", "add", "carol", "--scram", "--password", "pencil")
    assert output == f"added SCRAM user 'carol' to {database} (4096 iterations)\n"
    credentials = query(database, lambda db: db.get_scram("carol"))
    assert credentials.iterations == 4096 and not credentials.superuser
    assert ["scram", "carol", "scram-sha-256", "(4096)"] in [
        line.split() for line in ok(config, "users", "list").splitlines()]
    ok(config, "users", "passwd", "carol", "--scram", "--password", "crayon")
    assert query(database, lambda db: db.get_scram("carol")).salt != credentials.salt
    ok(config, "users", "del", "carol", "--scram")
    assert query(database, lambda db: db.get_scram("carol")) is None
    assert fails(config, "users", "del", "carol", "--scram") == "Error: no SCRAM user 'carol'\n"


def test_list_of_nobody(config, database):
    assert ok(config, "users", "list") == f"no users in {database}\n"


def test_import_emqx_files(config, database, tmp_path):
    csv_file = tmp_path / "myusers.csv"
    csv_file.write_text(
        "user_id,password_hash,salt,is_superuser\n"
        "myuser3,b6c743545a7817ae8c8f624371d5f5f0373234bb0ff36b8ffbf19bce0e06ab75,"
        "de1024f462fb83910fd13151bd4bd235,true\n"
        "myuser4,ee68c985a69208b6eda8c6c9b4c7c2d2b15ee2352cdd64a903171710a99182e8,"
        "ad773b5be9dd0613fe6c2f4d8c403139,false\n")
    output = ok(config, "users", "import", str(csv_file), "--algorithm", "sha256")
    assert output == (f"imported 2 usernames from {csv_file} (sha256): "
                      "2 added, 0 replaced, 0 unchanged\n")
    assert query(database, lambda db: db.get_user("myuser3")).is_superuser

    plain = tmp_path / "plain.json"
    plain.write_text('[{"user_id": "dave", "password": "pw", "is_superuser": false}]')
    assert "1 added" in ok(config, "users", "import", str(plain), "--type", "plain")
    assert password_ok(database, "dave", "pw")  # hashed with the configured bcrypt

    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,password_hash\nalice,x\nbob\n")
    assert fails(config, "users", "import", str(bad)) == (
        f"Error: {bad}: line 3: password_hash or password is missing\n")


def test_a_corrupt_database_is_one_clear_line(config, database):
    database.parent.mkdir()
    database.write_bytes(b"garbage " * 1000)
    output = fails(config, "users", "list")
    assert output.startswith(f"Error: {database}: not a usable auth database")
    assert output.count("\n") == 1


def test_commands_work_while_the_broker_reads(config, database):
    ok(config, "users", "add", "alice", "--password", "pw")
    # The broker's connection in the middle of a read transaction.
    with sqlite3.connect(database, isolation_level=None) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM users").fetchall()
        ok(config, "users", "add", "bob", "--password", "pw")
        ok(config, "acl", "add", "allow", "publish", "t/#", "--all")
        reader.execute("COMMIT")
        assert reader.execute("SELECT COUNT(*) FROM users").fetchone() == (2,)


# ------------------------------------------------------------------ acl


def rules_of(database: Path) -> BuiltinAclSource:
    return BuiltinAclSource(query(database, lambda db: db.all_rules()))


def publish(client_id: str, username: str | None, topic: str, qos: int = 0,
            retain: bool = False) -> AccessRequest:
    who = ClientInfo(client_id=client_id, username=username, peer=PeerInfo(listener="tcp:default"))
    return AccessRequest(client=who, action="publish", topic=topic, qos=qos, retain=retain)


def test_acl_add_list_del(config, database):
    output = ok(config, "acl", "add", "allow", "publish", "devices/${clientid}/#",
                "--clientid", "dev1", "--qos", "0,1", "--retain", "false")
    assert output == ("added rule 1 (place 1): --clientid dev1 allow publish "
                      "devices/${clientid}/# --qos 0,1 --retain false\n")
    ok(config, "acl", "add", "deny", "all", "#", "--all")
    ok(config, "acl", "add", "allow", "subscribe", "eq t/#", "--username", "alice")
    ok(config, "acl", "add", "deny", "publish", "t/x", "--username", "alice", "--position", "1")

    listing = [line.split() for line in ok(config, "acl", "list").splitlines()]
    assert listing == [
        ["ID", "WHO", "PLACE", "PERMISSION", "ACTION", "TOPIC", "QOS", "RETAIN"],
        ["1", "clientid", "dev1", "1", "allow", "publish", "devices/${clientid}/#", "0,1", "false"],
        ["4", "username", "alice", "1", "deny", "publish", "t/x", "any", "any"],
        ["3", "username", "alice", "2", "allow", "subscribe", "eq", "t/#", "any", "any"],
        ["2", "all", "1", "deny", "all", "#", "any", "any"],
    ]
    assert len(ok(config, "acl", "list", "--username", "alice").splitlines()) == 3
    assert len(ok(config, "acl", "list", "--all").splitlines()) == 2

    acl = rules_of(database)
    assert acl.check(publish("dev1", None, "devices/dev1/temp", qos=1)) == "allow"
    assert acl.check(publish("dev1", None, "devices/dev1/temp", qos=2)) == "deny"
    assert acl.check(publish("dev1", None, "devices/dev1/temp", retain=True)) == "deny"

    assert ok(config, "acl", "del", "2") == "deleted rule 2: --all deny all #\n"
    assert rules_of(database).check(publish("dev2", None, "x")) is None
    assert fails(config, "acl", "del", "2") == "Error: no rule with id 2\n"


def test_acl_refusals(config):
    assert "give one of --username U, --clientid C or --all" in fails(
        config, "acl", "add", "allow", "publish", "t", code=2)
    assert "give one of" in fails(
        config, "acl", "add", "allow", "publish", "t", "--all", "--username", "u", code=2)
    assert fails(config, "acl", "add", "allow", "publish", "a/#/b", "--all") == (
        "Error: invalid topic filter 'a/#/b': '#' must be the last level on its own\n")
    assert "unknown placeholder ${zone}" in fails(
        config, "acl", "add", "allow", "publish", "a/${zone}", "--all")
    assert "retain applies to publish" in fails(
        config, "acl", "add", "allow", "subscribe", "t", "--all", "--retain", "true")
    assert "'3' is not 0, 1 or 2" in fails(
        config, "acl", "add", "allow", "publish", "t", "--all", "--qos", "1,3", code=2)
    assert "'pubsub' is not one of" in fails(
        config, "acl", "add", "allow", "pubsub", "t", "--all", code=2)


def test_acl_list_of_nothing(config, database):
    assert ok(config, "acl", "list") == f"no rules in {database}\n"
