"""docs/tls.md stays true: its configurations load, it names every TLS
setting, and its ``bastionmq certs`` commands and Python examples still run
or compile."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from bastionmq.broker.settings import PEER_CERT_SOURCES
from bastionmq.cli import main
from bastionmq.config import (
    Config, CrlCacheConfig, OcspConfig, PskConfig, SniCertificate, SslListenerConfig, SslOptions,
    load_config,
)

GUIDE_PATH = Path(__file__).resolve().parent.parent / "docs" / "tls.md"
GUIDE = GUIDE_PATH.read_text(encoding="utf-8")


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block of ``language``."""
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```", GUIDE, re.S | re.M):
        found.append((GUIDE.count("\n", 0, match.start()) + 1, match.group(1)))
    return found


def _ids(found: list[tuple[int, str]]) -> list[str]:
    return [f"line {line}" for line, _ in found]


HOCON = blocks("hocon")
PYTHON = blocks("python")


def test_the_guide_has_examples():
    # Seven sections, each with its configuration and a paho example.
    assert len(HOCON) >= 7
    assert len(PYTHON) >= 7


@pytest.mark.parametrize("block", [text for _, text in HOCON], ids=_ids(HOCON))
def test_every_configuration_block_loads(block):
    # Every block of the guide is whole (section 7's blocks use full key
    # paths), so it loads on its own: a renamed or misspelt key fails here.
    config = load_config(text=block, env={})
    assert config != Config(), "the block sets nothing"


def _mentioned(name: str) -> bool:
    """In code quotes (`depth`, `reuse_sessions = true`) or as a key in a block."""
    if re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", GUIDE):
        return True
    return any(re.search(rf"\b{re.escape(name)}\s*[=:{{]", text) for _, text in HOCON)


@pytest.mark.parametrize("cls", [SslOptions, SniCertificate, CrlCacheConfig, PskConfig,
                                 OcspConfig])
def test_every_field_is_in_the_guide(cls):
    missing = [field.name for field in attrs.fields(cls) if not _mentioned(field.name)]
    assert not missing, f"docs/tls.md does not mention {cls.__name__} fields {missing}"


def test_the_certificate_identity_keys_and_sources_are_in_the_guide():
    keys = [field.name for field in attrs.fields(SslListenerConfig)
            if field.name.startswith("peer_cert_")]
    assert keys and all(_mentioned(key) for key in keys), keys
    missing = [source for source in PEER_CERT_SOURCES if f"`{source}`" not in GUIDE]
    assert not missing, f"identity sources missing from docs/tls.md: {missing}"
    for mode in ("replace", "enforce"):
        assert f"`{mode}`" in GUIDE


def _shell_commands() -> list[list[str]]:
    """Each command of the sh blocks, continuation lines joined, comments dropped."""
    commands = []
    for _, text in blocks("sh"):
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_the_certs_commands_run_in_order(tmp_path, monkeypatch):
    """``bastionmq certs`` and the PKI's Python calls, as the guide gives them,
    one after another in a project directory (etc/bastionmq.conf in it), as
    the guide says: node.data_dir is data/ there."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "bastionmq.conf").write_text("")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    ran = []
    for words in _shell_commands():
        if words[:2] == ["bastionmq", "certs"]:
            result = runner.invoke(main, words[1:])
            assert result.exit_code == 0, f"{shlex.join(words)}:\n{result.output}"
            ran.append(words[2])
        elif words[:2] == ["python", "-c"] and "bastionmq" in words[2]:
            exec(compile(words[2], "docs/tls.md", "exec"), {})
            ran.append("python")
    assert {"init", "client", "revoke", "server", "python"} <= set(ran)
    assert (tmp_path / "data" / "certs" / "sensor-10.pem").exists()


@pytest.mark.parametrize("block", [text for _, text in PYTHON], ids=_ids(PYTHON))
def test_every_python_example_compiles(block):
    compile(block, "docs/tls.md", "exec")
    assert "CallbackAPIVersion.VERSION2" in block
