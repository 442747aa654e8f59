"""The ready-made monitoring: the alert rules pass promtool (Debian's
prometheus package) and fire as their unit tests say; the Grafana dashboard
is one, and its expressions are PromQL; and both name only metrics a running
broker exports."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as paho
from prometheus_client.parser import text_string_to_metric_families

from bastionmq.pki import init_pki, issue_client

from mosquitto_peer import tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "bastionmq.json"

#: The broker's metrics and the process collector's, as an expression names them.
METRIC_NAME = re.compile(r"\b(?:bastionmq|process)_[a-z0-9_]+\b")
#: The samples of a histogram, and the family they belong to.
HISTOGRAM_SAMPLE = re.compile(r"_(?:bucket|sum|count)$")


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_the_alert_rules_pass_promtool():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout


def test_the_alert_rules_fire_as_their_tests_say():
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def running_broker(start_broker, clients, tmp_path: Path) -> Any:
    """A broker with every part that has metrics of its own: the operations
    listener, a TCP and a mutual-TLS listener, authorization and durable
    sessions, after a little traffic of each QoS (through TLS too), so that
    the families labelled by what happened have samples."""
    pki = tmp_path / "pki"
    init_pki(pki)
    issue_client(pki, "watcher")
    acl = tmp_path / "acl.conf"
    acl.write_text("{allow, all}.\n")
    data = tmp_path / "data"
    data.mkdir()
    broker = start_broker(f"""
node.data_dir = "{data}"
http_api {{ enable = true, bind = "127.0.0.1:0" }}
authorization {{ sources = [ {{ type = file, path = "{acl}" }} ] }}
durable_sessions {{ enable = true, data_dir = "{data}" }}
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{ cacertfile = "{pki / 'ca.pem'}", certfile = "{pki / 'server.pem'}",
                 keyfile = "{pki / 'server.key'}", verify = verify_peer }}
}}
""")
    watcher = clients(broker.port_of("ssl:default"), client_id="watcher", clean=False,
                      tls={"ca_certs": str(pki / "ca.pem"), "certfile": str(pki / "watcher.pem"),
                           "keyfile": str(pki / "watcher.key")})
    assert watcher.subscribe("dash/#", qos=2) == [2]
    sender = clients(broker.port, client_id="sender", version=paho.MQTTv5)
    for qos in (0, 1, 2):
        sender.publish(f"dash/{qos}", b"m", qos=qos, retain=qos == 1)
    assert sorted(message.qos for message in watcher.expect(3)) == [0, 1, 2]
    return broker


def not_exported(named: set[str], broker: Any) -> list[str]:
    """The names in ``named`` that /metrics has no sample of. A histogram's
    _bucket, _sum and _count count as exported once its family is (a
    labelled histogram has no samples until it observes something)."""
    host, port = broker.run(lambda: broker.broker.ops.address)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: set[str] = set()
    histograms: set[str] = set()
    for family in text_string_to_metric_families(text):
        samples.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            histograms.add(family.name)
    return sorted(name for name in named if name not in samples
                  and HISTOGRAM_SAMPLE.sub("", name) not in histograms)


def test_every_metric_the_rules_name_is_exported(start_broker, clients, tmp_path):
    broker = running_broker(start_broker, clients, tmp_path)
    named = set(METRIC_NAME.findall(RULES.read_text()))
    assert named, "the rules name no bastionmq metric"
    assert not_exported(named, broker) == []


# The Grafana dashboard ---------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel but rows, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", ())
        else:
            yield panel


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_data_source():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    # Imported from a file, Grafana asks for the data source of this input...
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    # ...which becomes the default of the data source variable every query uses.
    source = variables["datasource"]
    assert (source["type"], source["query"], source["current"]["value"]) == (
        "datasource", "prometheus", "${DS_PROMETHEUS}")
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    instance = variables["instance"]
    assert (instance["type"], instance["datasource"]) == ("query", datasource)
    assert METRIC_NAME.search(instance["definition"])
    ids = [panel["id"] for panel in dashboard["panels"]] + \
        [panel["id"] for row in dashboard["panels"] for panel in row.get("panels", ())]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    shown = list(panels(dashboard))
    assert len(shown) >= 20
    for panel in shown:
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == datasource, where
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        assert panel["targets"], where
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"] == datasource, where
            assert METRIC_NAME.search(target["expr"]), where
            # Every query follows the instance picked at the top.
            assert 'instance=~"$instance"' in target["expr"], where


def test_the_dashboard_queries_are_promql(tmp_path):
    # promtool checks them as recording rules, Grafana's variables given values.
    values = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for number, expr in enumerate(expressions(load_dashboard())):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_every_metric_the_dashboard_names_is_exported(start_broker, clients, tmp_path):
    dashboard = load_dashboard()
    named = {name for expr in expressions(dashboard) for name in METRIC_NAME.findall(expr)}
    named |= {name for variable in dashboard["templating"]["list"]
              for name in METRIC_NAME.findall(variable.get("definition", ""))}
    broker = running_broker(start_broker, clients, tmp_path)
    assert not_exported(named, broker) == []
