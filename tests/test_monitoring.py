"""The ready-made monitoring: the alert rules pass promtool (Debian's
prometheus package), fire as their unit tests say, and name only metrics a
running broker exports."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bastionmq.pki import init_pki

from mosquitto_peer import tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_the_alert_rules_pass_promtool():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout


def test_the_alert_rules_fire_as_their_tests_say():
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_metric_the_rules_name_is_exported(start_broker, tmp_path):
    pki = tmp_path / "pki"
    init_pki(pki)
    broker = start_broker(f"""
http_api {{ enable = true, bind = "127.0.0.1:0" }}
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{ cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
                 keyfile = "{pki / 'server.key'}" }}
}}
""")
    host, port = broker.run(lambda: broker.broker.ops.address)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    exported = {sample.name for family in text_string_to_metric_families(text)
                for sample in family.samples}
    named = set(re.findall(r"\bbastionmq_[a-z_]+\b", RULES.read_text()))
    assert named, "the rules name no bastionmq metric"
    assert sorted(named - exported) == []
