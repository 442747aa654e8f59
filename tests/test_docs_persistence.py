"""docs/persistence.md stays true: its configuration loads, its start-up
line is the one the broker writes, and the commands it names exist."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from bastionmq.app import describe_restore
from bastionmq.broker.store import RestoreReport
from bastionmq.cli import main
from bastionmq.config import DurableSessionsConfig, load_config

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "persistence.md").read_text()


def test_the_configuration_shown_is_the_defaults_turned_on():
    (block,) = re.findall(r"^```hocon\n(.*?)^```", GUIDE, re.S | re.M)
    # data_dir: where the default one is put (node.data_dir, bastionmq.data_dir).
    default_dir = load_config(text="").durable_sessions.data_dir
    assert load_config(text=block).durable_sessions == DurableSessionsConfig(
        enable=True, data_dir=default_dir)


def test_the_start_up_line_shown_is_the_one_written():
    (shown,) = re.findall(r"^(restored from .*)$", GUIDE, re.M)
    report = RestoreReport(sessions=12, subscriptions=30, queued=1200, inflight=8,
                           awaiting_rel=0, retained=45, expired_sessions=1,
                           expired_messages=3, wills_published=1)
    assert describe_restore(report, "data/sessions.sqlite3", 1100) == shown


def test_the_commands_named_exist():
    for command in re.findall(r"^bastionmq (data \w+)", GUIDE, re.M):
        result = CliRunner().invoke(main, [*command.split(), "--help"])
        assert result.exit_code == 0, command
    assert len(re.findall(r"^bastionmq data", GUIDE, re.M)) == 2
