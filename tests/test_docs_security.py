"""docs/security.md stays true: its configurations load, its rule files parse,
it names every authentication and authorization setting, and its
``bastionmq`` commands run in the order given, with the output it shows."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from bastionmq.acl.emqx_file import parse_acl_text
from bastionmq.acl.mosquitto_file import parse_mosquitto_acl_text
from bastionmq.auth.user_import import parse_user_file
from bastionmq.auth.mosquitto_passwd import hash_mosquitto
from bastionmq.auth.passwords import PasswordHash
from bastionmq.cli import main
from bastionmq.config import (
    AclSourceConfig, AuthenticatorConfig, AuthnBanConfig, AuthorizationConfig, AuthzCacheConfig,
    Config, NodeConfig, load_config,
)

GUIDE_PATH = Path(__file__).resolve().parent.parent / "docs" / "security.md"
GUIDE = GUIDE_PATH.read_text(encoding="utf-8")

#: A Mosquitto acl_file block is a ```text block right after this line.
MOSQUITTO_ACL_MARK = "<!-- mosquitto-acl -->"
_BLOCK = re.compile(rf"^({re.escape(MOSQUITTO_ACL_MARK)}\n)?```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, text) of every fenced block; the kind is the fence's
    language, or ``mosquitto-acl`` for a marked block."""
    found = []
    for match in _BLOCK.finditer(text):
        marked, language, body = match.groups()
        line = text.count("\n", 0, match.start()) + 1 + bool(marked)
        found.append((line, "mosquitto-acl" if marked else language, body))
    return found


BLOCKS = _blocks(GUIDE)


def blocks(kind: str) -> list[tuple[int, str]]:
    return [(line, body) for line, found, body in BLOCKS if found == kind]


def _params(kind: str):
    return [pytest.param(body, id=f"line {line}") for line, body in blocks(kind)]


HOCON = blocks("hocon")


def test_the_guide_has_its_examples():
    assert len(HOCON) >= 10
    assert len(blocks("erlang")) >= 2
    assert len(blocks("mosquitto-acl")) >= 2
    assert blocks("csv") and blocks("json")
    # The marker stands right before a text fence, never anywhere else.
    assert GUIDE.count(MOSQUITTO_ACL_MARK) == len(blocks("mosquitto-acl"))


@pytest.mark.parametrize("block", _params("hocon"))
def test_every_configuration_block_loads(block):
    config = load_config(text=block, env={})
    assert config != Config(), "the block sets nothing"


@pytest.mark.parametrize("block", _params("erlang"))
def test_every_acl_conf_block_parses(block):
    assert parse_acl_text(block, "docs/security.md").rules


@pytest.mark.parametrize("block", _params("mosquitto-acl"))
def test_every_mosquitto_acl_block_parses(block):
    parse_mosquitto_acl_text(block, "docs/security.md")


def _mentioned(name: str) -> bool:
    """In code quotes (`no_match`, `cache.ttl`) or as a key in a block."""
    if re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", GUIDE):
        return True
    return any(re.search(rf"\b{re.escape(name)}\s*[=:{{]", text) for _, text in HOCON)


@pytest.mark.parametrize("cls", [AuthenticatorConfig, PasswordHash, AuthorizationConfig,
                                 AuthzCacheConfig, AclSourceConfig, AuthnBanConfig, NodeConfig])
def test_every_field_is_in_the_guide(cls):
    missing = [field.name for field in attrs.fields(cls)
               if not field.metadata.get("internal") and not _mentioned(field.name)]
    assert not missing, f"docs/security.md does not mention {cls.__name__} fields {missing}"


def test_the_user_files_parse_and_the_csv_hash_is_the_password_given():
    (_, csv_text), = blocks("csv")
    (_, json_text), = blocks("json")
    users = parse_user_file("users.csv", csv_text.encode())
    users += parse_user_file("users.json", json_text.encode())
    assert [user.user_id for user in users] == ["carol", "dave", "erin"]
    carol = users[0]
    match = re.search(r"password `(\S+)`", GUIDE[GUIDE.index("A CSV file"):])
    assert hashlib.sha256((carol.salt + match.group(1)).encode()).hexdigest() == carol.password_hash


# ------------------------------------------------------------------ commands


def _sections() -> dict[str, str]:
    """Each '## ' section of the guide by its heading."""
    parts = re.split(r"^(## .*)$", GUIDE, flags=re.M)
    return {heading: body for heading, body in zip(parts[1::2], parts[2::2])}


SECTIONS = _sections()
SETUPS = [heading for heading in SECTIONS if heading.startswith("## Set-up")]
PASSWORD_INPUT = "pw-from-the-test\npw-from-the-test\n"


def _commands(text: str) -> list[list[str]]:
    """The words of each command of the sh blocks, continuation lines joined,
    comments and a trailing '& broker_pid=$!' dropped."""
    commands = []
    for _, kind, body in _blocks(text):
        if kind != "sh":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" & ")[0].rstrip(" &"), comments=True)
            if words:
                commands.append(words)
    return commands


def _run(words: list[str]) -> str:
    result = CliRunner().invoke(main, words[1:], input=PASSWORD_INPUT)
    assert result.exit_code == 0, f"{shlex.join(words)}:\n{result.output}"
    return result.output


def test_there_are_three_set_ups():
    assert len(SETUPS) == 3, SETUPS


@pytest.mark.parametrize("heading", SETUPS)
def test_the_set_up_commands_run_in_order(heading, tmp_path, monkeypatch):
    """A set-up from an empty directory: the files it names (a block whose first
    line is a comment naming the file), then its bastionmq commands, as given;
    /etc/mosquitto stands in the directory, and mosquitto_passwd is done here."""
    # A project directory, as the guide says: node.data_dir is data/ in it.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "bastionmq.conf").write_text("")
    monkeypatch.chdir(tmp_path)
    text = SECTIONS[heading].replace("/etc/mosquitto/", f"{tmp_path}/etc/mosquitto/")
    for _, kind, body in _blocks(text):
        first = body.splitlines()[0]
        name = {"hocon": "# ", "erlang": "%% ", "mosquitto-acl": "# "}.get(kind)
        if name and first.startswith(name) and first.endswith((".conf", "/acl")):
            path = tmp_path / first[len(name):].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    ran = []
    for words in _commands(text):
        if words[0] == "mosquitto_passwd":
            path = Path(words[-2])
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [] if "-c" in words or not path.exists() else path.read_text().splitlines()
            path.write_text("\n".join([*lines, f"{words[-1]}:{hash_mosquitto('pw')}"]) + "\n")
            ran.append("mosquitto_passwd")
        elif words[0] == "bastionmq" and words[1] != "start":
            _run(words)
            ran.append(" ".join(words[1:3]))
    assert "check-config -c" in ran, ran
    assert len(ran) >= 3, ran


def test_the_reference_commands_run_and_show_what_the_guide_shows(tmp_path, monkeypatch):
    """The bastionmq users and acl commands outside the set-ups, one after
    another against one database, with their files; the output of list and
    import is what the guide prints."""
    monkeypatch.chdir(tmp_path)
    # No project directory here: the data_dir is the per-user one, kept in the test's.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    (tmp_path / "broker.conf").write_text(
        "authentication = [\n"
        "  { mechanism = password_based, backend = built_in_database,\n"
        "    password_hash_algorithm { name = pbkdf2, iterations = 1000 } }\n"
        "  { mechanism = scram }\n"
        "]\n")
    (_, csv_text), = blocks("csv")
    (_, json_text), = blocks("json")
    (tmp_path / "users.csv").write_text(csv_text)
    (tmp_path / "users.json").write_text(json_text)
    reference = "".join(body for heading, body in SECTIONS.items() if heading not in SETUPS)
    ran = []
    for words in _commands(reference):
        if words[0] != "bastionmq" or words[1] not in ("users", "acl"):
            continue
        output = _run(words)
        ran.append(" ".join(words[1:3]))
        if words[2] in ("list", "import"):
            for line in output.splitlines():
                if not line.startswith("no "):
                    assert line in GUIDE, f"{shlex.join(words)} printed a line not in the guide: {line!r}"
    for command in ("users add", "users passwd", "users del", "users list", "users import",
                    "acl add", "acl list", "acl del"):
        assert command in ran, f"the guide has no example of bastionmq {command}"
