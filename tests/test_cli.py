"""The ``bastionmq`` command as an operator runs it: the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version as distribution_version
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import MQTT_5
from bastionmq.broker.store.sqlite import SCHEMA, SCHEMA_VERSION
from mosquitto_peer import tool

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "etc" / "bastionmq.conf"
TIMEOUT = 20.0
SERVER_SHUTTING_DOWN = 0x8B


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without stray BASTIONMQ_* overrides, plus ``overrides``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BASTIONMQ_")}
    env.update(overrides)
    return env


@pytest.fixture
def command() -> str:
    path = shutil.which("bastionmq")
    assert path is not None, "the bastionmq console script is not installed (pip install -e .)"
    return path


@pytest.fixture
def run(command):
    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
        return subprocess.run([command, *args], capture_output=True, text=True, timeout=TIMEOUT,
                              cwd=cwd, env=env if env is not None else clean_env())
    return run


class BrokerProcess:
    """``bastionmq start`` in the background, its stderr collected in a file."""

    def __init__(self, command: str, config: Path, log: Path, cwd: Path | None,
                 env: dict[str, str]) -> None:
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [command, "start", "-c", str(config)], cwd=cwd, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    @property
    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, port: int, listener: str = "tcp:default") -> None:
        """Poll until the port accepts connections and the listener is logged."""
        line = f"listener {listener} listening on 127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"bastionmq exited with {self.process.returncode}:\n{self.stderr}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
            except ConnectionRefusedError:
                pass
            else:
                if line in self.stderr:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"no {line!r} within {TIMEOUT}s:\n{self.stderr}")
            time.sleep(0.05)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(TIMEOUT)


@pytest.fixture
def start_process(command, tmp_path):
    started: list[BrokerProcess] = []

    def start(config: Path, cwd: Path | None = None, env: dict[str, str] | None = None):
        process = BrokerProcess(command, config, tmp_path / f"stderr-{len(started)}.log", cwd,
                                env if env is not None else clean_env())
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait(TIMEOUT)


def write_config(tmp_path: Path, text: str, name: str = "bastionmq.conf") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def good_config(tmp_path: Path, port: int) -> Path:
    return write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
allow_anonymous = true
""")


# ------------------------------------------------------------------ version


def test_version_prints_the_distribution_version(run):
    result = run("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"bastionmq {distribution_version('bastionmq')}"


def test_version_and_help_options_and_python_m(run):
    expected = f"bastionmq {distribution_version('bastionmq')}"
    for args in (["--version"], ["-V"]):
        assert run(*args).stdout.strip() == expected
    assert "Usage: bastionmq" in run("-h").stdout
    assert "Usage: bastionmq certs" in run("certs", "-h").stdout
    module = subprocess.run([sys.executable, "-m", "bastionmq", "--version"], capture_output=True,
                            text=True, timeout=TIMEOUT, env=clean_env())
    assert module.stdout.strip() == expected, module.stderr


# ------------------------------------------------------------------ check-config


def test_check_config_accepts_the_shipped_config(run):
    result = run("check-config", "-c", "etc/bastionmq.conf", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert "tcp:default 127.0.0.1:1883" in result.stdout
    assert "ws:default 127.0.0.1:8083" in result.stdout
    assert "wss:default 0.0.0.0:8084" in result.stdout
    assert ("durable sessions: data/sessions.sqlite3, committed every 5 ms or 1000 changes, "
            "synchronous = full") in result.stdout


BAD_VALUES = {
    "unknown key": ("listeners.tcp.default.bogus_key = 42", "listeners.tcp.default.bogus_key",
                    "unknown key"),
    "out-of-range value": ("mqtt.max_inflight = 70000", "mqtt.max_inflight", "70000"),
    "bad bind": ('listeners.tcp.default.bind = "nowhere"', "listeners.tcp.default.bind",
                 "'nowhere'"),
    "port out of range": ('listeners.tcp.default.bind = "127.0.0.1:99999"',
                          "listeners.tcp.default.bind", "99999"),
    "bad duration": ("mqtt.idle_timeout = soon", "mqtt.idle_timeout", "soon"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_check_config_names_the_key_path_and_the_value(run, tmp_path, case):
    line, path, value = BAD_VALUES[case]
    config = write_config(tmp_path, f"allow_anonymous = true\n{line}\n")
    result = run("check-config", "-c", str(config))
    assert result.returncode != 0
    error_lines = [text for text in result.stderr.splitlines() if text.startswith(f"{path}:")]
    assert error_lines, result.stderr
    assert value in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reports_every_error_in_one_pass(run, tmp_path):
    config = write_config(tmp_path, "\n".join(line for line, _, _ in BAD_VALUES.values()))
    result = run("check-config", "-c", str(config))
    assert result.returncode != 0
    for case, (_, path, value) in BAD_VALUES.items():
        if case == "bad bind":  # the later bind line of the file replaces this one
            continue
        assert any(text.startswith(f"{path}:") and value in text
                   for text in result.stderr.splitlines()), (case, result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("subcommand", ["check-config", "start"])
def test_a_missing_config_file_is_named(run, tmp_path, subcommand):
    missing = tmp_path / "no-such.conf"
    result = run(subcommand, "-c", str(missing))
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ start


def test_start_with_a_bad_config_opens_no_port(run, tmp_path):
    port = free_port()
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
allow_anonymous = true
mqtt.max_inflight = 0
""")
    result = run("start", "-c", str(config))
    assert result.returncode != 0
    assert "mqtt.max_inflight" in result.stderr
    assert "listening on" not in result.stderr
    assert "Traceback" not in result.stderr
    assert refuses_connections(port)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_start_serves_until_a_signal_then_disconnects_everyone(
        start_process, clients, raw_clients, tmp_path, signum):
    port = free_port()
    broker = start_process(good_config(tmp_path, port))
    broker.wait_listening(port)

    v5 = clients(port, client_id="paho-v5", version=paho.MQTTv5)
    v311 = clients(port, client_id="paho-v311", version=paho.MQTTv311)
    assert v5.reason_code == 0
    assert v311.reason_code == 0
    raw = raw_clients(port, MQTT_5)
    assert raw.connect("raw-v5").reason_code == 0
    # A round trip through the broker proves it routes before it is stopped.
    v5.subscribe("cli/check", qos=1)
    v311.publish("cli/check", b"up", qos=1)
    assert v5.expect()[0].payload == b"up"

    assert broker.stop(signum) == 0, broker.stderr
    assert raw.closing_reasons() == [SERVER_SHUTTING_DOWN]
    assert v5.disconnects.get(timeout=TIMEOUT).value == SERVER_SHUTTING_DOWN
    assert v311.disconnects.get(timeout=TIMEOUT) is not None
    assert refuses_connections(port)
    assert "Traceback" not in broker.stderr


def _shipped_config_env(port: int, tls_port: int, ws_port: int = 0,
                        wss_port: int = 0) -> dict[str, str]:
    """The shipped config moved to free loopback ports."""
    return clean_env(BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND=f"127.0.0.1:{port}",
                     BASTIONMQ_LISTENERS__SSL__DEFAULT__BIND=f"127.0.0.1:{tls_port}",
                     BASTIONMQ_LISTENERS__WS__DEFAULT__BIND=f"127.0.0.1:{ws_port}",
                     BASTIONMQ_LISTENERS__WSS__DEFAULT__BIND=f"127.0.0.1:{wss_port}",
                     BASTIONMQ_HTTP_API__BIND="127.0.0.1:0")


def test_environment_overrides_the_listener_of_the_shipped_config(start_process, clients, run,
                                                                   tmp_path):
    port, ws_port = free_port(), free_port()
    # Not run from a project directory: the data (and the development PKI)
    # go to the per-user directory, here in the test's own.
    env = {**_shipped_config_env(port, free_port(), ws_port),
           "XDG_DATA_HOME": str(tmp_path / "xdg")}

    checked = run("check-config", "-c", "etc/bastionmq.conf", cwd=REPO, env=env)
    assert checked.returncode == 0, checked.stderr
    assert f"tcp:default 127.0.0.1:{port}" in checked.stdout
    assert f"ws:default 127.0.0.1:{ws_port}" in checked.stdout

    # Run elsewhere than the checkout: the first start writes the PKI in the data_dir.
    broker = start_process(REPO / "etc/bastionmq.conf", cwd=tmp_path, env=env)
    broker.wait_listening(port)
    broker.wait_listening(ws_port, "ws:default")
    # The shipped config allows anonymous clients on its loopback listeners.
    assert clients(port, client_id="env-moved").reason_code == 0
    assert clients(ws_port, client_id="env-moved-ws", transport="websockets").reason_code == 0
    assert broker.stop(signal.SIGTERM) == 0, broker.stderr
    assert "listening on 127.0.0.1:1883" not in broker.stderr
    assert "listening on 127.0.0.1:8083" not in broker.stderr
    assert refuses_connections(port)
    assert refuses_connections(ws_port)
    data = tmp_path / "xdg" / "bastionmq"
    assert f"data_dir {data} (per-user default: no data_dir configured, not run from a " \
           "project directory, XDG_DATA_HOME set)" in broker.stderr
    assert (data / "certs" / "ca.pem").is_file()
    assert not (tmp_path / "data").exists()


def test_start_on_a_port_in_use_fails_with_a_clear_message(run, tmp_path):
    with socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen()
        port = occupier.getsockname()[1]
        result = run("start", "-c", str(good_config(tmp_path, port)))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error, result.stderr
    assert str(port) in error[0]
    assert "in use" in error[0]


def test_first_start_makes_a_development_pki_and_a_client_certificate_is_all_a_newcomer_needs(
        start_process, run, clients, tmp_path):
    port, tls_port, wss_port = free_port(), free_port(), free_port()
    env = _shipped_config_env(port, tls_port, wss_port=wss_port)
    # A project directory, as the README runs it from the checkout: data/ in it.
    (tmp_path / "etc").mkdir()
    shutil.copy(DEFAULT_CONFIG, tmp_path / "etc" / "bastionmq.conf")
    broker = start_process(Path("etc/bastionmq.conf"), cwd=tmp_path, env=env)
    broker.wait_listening(port)
    assert "data_dir data (project default: no data_dir configured and etc/bastionmq.conf " \
           "is in the working directory)" in broker.stderr
    assert "made a development PKI" in broker.stderr
    assert "bastionmq certs client NAME" in broker.stderr
    certs = tmp_path / "data" / "certs"
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600

    issued = run("certs", "client", "sensor-7", cwd=tmp_path, env=env)
    assert issued.returncode == 0, issued.stderr
    tls = ["-h", "localhost", "-p", str(tls_port), "--cafile", str(certs / "ca.pem")]
    publish = ["-t", "test", "-m", "hello", "-q", "1"]
    sent = subprocess.run([tool("mosquitto_pub"), *tls, "--cert", str(certs / "sensor-7.pem"),
                           "--key", str(certs / "sensor-7.key"), *publish],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert sent.returncode == 0, sent.stderr
    # The hint names the host and port the listener is on, not the shipped localhost:8883.
    assert f"mosquitto_pub -h 127.0.0.1 -p {tls_port} --cafile data/certs/ca.pem " \
           "--cert data/certs/sensor-7.pem" in issued.stdout
    # Without a certificate the TLS listener refuses (verify_peer, fail_if_no_peer_cert).
    refused = subprocess.run([tool("mosquitto_pub"), *tls, *publish], capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert refused.returncode != 0
    # The wss listener takes the same development PKI and the same certificate.
    broker.wait_listening(wss_port, "wss:default")
    web = clients(wss_port, client_id="sensor-7-web", transport="websockets",
                  tls={"ca_certs": str(certs / "ca.pem"), "certfile": str(certs / "sensor-7.pem"),
                       "keyfile": str(certs / "sensor-7.key")})
    assert web.reason_code == 0
    web.disconnect()
    assert broker.stop(signal.SIGTERM) == 0, broker.stderr
    assert "no client certificate" in broker.stderr

    # The second start uses the PKI made by the first.
    again = start_process(Path("etc/bastionmq.conf"), cwd=tmp_path, env=env)
    again.wait_listening(port)
    assert "made a development PKI" not in again.stderr
    assert again.stop(signal.SIGTERM) == 0


def test_bad_tls_material_stops_start_with_the_key_path(run, tmp_path):
    port = free_port()
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
listeners.ssl.default {{ bind = "127.0.0.1:0", ssl_options {{ certfile = "missing.pem" }} }}
""")
    result = run("start", "-c", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "listeners.ssl.default.ssl_options.certfile: 'missing.pem': no such file" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert refuses_connections(port)


def test_sighup_reloads_the_tls_material(start_process, run, tmp_path):
    port = free_port()
    assert run("certs", "init", str(tmp_path / "pki")).returncode == 0
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{
    cacertfile = "{tmp_path / 'pki' / 'ca.pem'}", certfile = "{tmp_path / 'pki' / 'server.pem'}"
    keyfile = "{tmp_path / 'pki' / 'server.key'}", watch_interval = 0s
  }}
}}
""")
    broker = start_process(config)
    broker.wait_listening(port)
    # The ssl listener opens after the tcp one: a SIGHUP before it has nothing to reload.
    deadline = time.monotonic() + TIMEOUT
    while "listener ssl:default listening" not in broker.stderr:
        assert time.monotonic() < deadline, broker.stderr
        time.sleep(0.05)
    broker.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while "listener ssl:default: reloaded TLS material (SIGHUP)" not in broker.stderr:
        assert time.monotonic() < deadline, broker.stderr
        time.sleep(0.05)
    assert broker.stop(signal.SIGTERM) == 0


def test_check_config_prints_the_tls_policy_of_the_shipped_config(run, tmp_path):
    xdg = tmp_path / "xdg"
    checked = run("check-config", "-c", str(REPO / "etc/bastionmq.conf"), cwd=tmp_path,
                  env=clean_env(XDG_DATA_HOME=str(xdg)))
    assert checked.returncode == 0, checked.stderr
    lines = checked.stdout.splitlines()
    assert "ssl:default 0.0.0.0:8883" in lines
    assert "  versions: tlsv1.3, tlsv1.2" in lines
    certs = xdg / "bastionmq" / "certs"
    assert f"  client certificates: required, verified against {certs}/ca.pem (depth 10)" \
        in lines
    assert "  revocation: not checked" in lines
    assert f"data_dir {xdg / 'bastionmq'} (per-user default: no data_dir configured, not run " \
           "from a project directory, XDG_DATA_HOME set)" in lines
    assert not (tmp_path / "data").exists() and not xdg.exists()  # checking makes nothing


def test_check_config_warns_of_tls_traps(run, tmp_path):
    from bastionmq.pki import init_pki, issue_server
    init_pki(tmp_path)
    soon = issue_server(tmp_path, "soon", ["localhost"], days=10)
    config = write_config(tmp_path, f"""
listeners.ssl.legacy {{
  bind = "127.0.0.1:0"
  peer_cert_as_username = cn
  ssl_options {{
    cacertfile = "{tmp_path / 'ca.pem'}", certfile = "{soon.cert}", keyfile = "{soon.key}"
    versions = [tlsv1.2, tlsv1.1]
  }}
}}
""")
    checked = run("check-config", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    warnings = [line for line in checked.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, checked.stderr
    assert "certificate identity is configured but the listener does not verify" in warnings[0]
    assert "tlsv1.1 enabled" in warnings[1]
    assert f"the certificate in {soon.cert} expires on" in warnings[2]
    assert "  identity (replace): username from the certificate's cn, client id from what " \
           "the client sends" in checked.stdout.splitlines()


def test_check_config_loads_the_tls_files(run, tmp_path):
    config = write_config(tmp_path, """
listeners.ssl.default { bind = "127.0.0.1:0", ssl_options { certfile = "gone.pem" } }
""")
    checked = run("check-config", "-c", str(config), cwd=tmp_path)
    assert checked.returncode != 0
    assert "listeners.ssl.default.ssl_options.certfile: 'gone.pem': no such file" \
        in checked.stderr


def test_a_listener_warns_when_its_certificate_expires_soon(start_process, tmp_path):
    from bastionmq.pki import init_pki, issue_server
    init_pki(tmp_path)
    soon = issue_server(tmp_path, "soon", ["localhost"], days=10)
    port = free_port()
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{ cacertfile = "{tmp_path / 'ca.pem'}", certfile = "{soon.cert}", keyfile = "{soon.key}" }}
}}
""")
    broker = start_process(config)
    broker.wait_listening(port)
    deadline = time.monotonic() + TIMEOUT
    while f"WARNING bastionmq.listener: listener ssl:default: the certificate in {soon.cert} " \
            "expires on" not in broker.stderr:
        assert time.monotonic() < deadline, broker.stderr
        time.sleep(0.05)
    assert broker.stop(signal.SIGTERM) == 0


def test_check_config_loads_password_and_acl_files(run, tmp_path):
    (tmp_path / "passwd").write_text("alice:not a hash\n")
    (tmp_path / "acl.conf").write_text('{allow, all, publsh, ["t"]}.\n')
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
authentication = [ {{ mechanism = password_based, backend = password_file, path = "{tmp_path / 'passwd'}" }} ]
authorization.sources = [ {{ type = file, path = "{tmp_path / 'acl.conf'}" }} ]
""")
    checked = run("check-config", "-c", str(config))
    assert checked.returncode != 0
    assert "authorization.sources.0.path: " in checked.stderr and "publsh" in checked.stderr
    assert "authentication.0: " in checked.stderr and "passwd:1" in checked.stderr


# ------------------------------------------------------------------ data


def durable_config(tmp_path: Path, port: int) -> Path:
    return write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
allow_anonymous = true
durable_sessions {{ enable = true, data_dir = "{tmp_path / 'store'}" }}
""")


def test_data_check_and_compact_look_after_the_store(start_process, clients, run, tmp_path):
    port = free_port()
    config = durable_config(tmp_path, port)
    broker = start_process(config)
    broker.wait_listening(port)
    subscriber = clients(port, client_id="s", version=paho.MQTTv5, clean=False,
                         session_expiry=3600)
    subscriber.subscribe("t", 1)
    subscriber.disconnect()
    publisher = clients(port)
    for i in range(3):
        publisher.publish("t", f"m{i}", qos=1)
    publisher.publish("r", "kept", qos=1, retain=True)

    # check reads beside the running broker; compact must wait for it to stop.
    checked = run("data", "check", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    assert ("1 sessions (0 expired, removed at the next start), 1 subscriptions, 3 queued and "
            "0 in-flight messages, 3 message bodies, 0 QoS 2 messages awaiting release, "
            "1 retained messages, 0 wills") in checked.stdout
    assert "no problems found" in checked.stdout
    refused = run("data", "compact", "-c", str(config))
    assert refused.returncode == 1
    assert "is held by a running broker" in refused.stderr
    assert broker.stop(signal.SIGTERM) == 0, broker.stderr

    compacted = run("data", "compact", "-c", str(config))
    assert compacted.returncode == 0, compacted.stderr
    assert "removed 0 rows that pointed at nothing" in compacted.stdout
    # The store still serves: the queued messages come after a restart.
    broker = start_process(config)
    broker.wait_listening(port)
    assert "restored from" in broker.stderr
    subscriber = clients(port, client_id="s", version=paho.MQTTv5, clean=False,
                         session_expiry=3600)
    assert [m.payload for m in subscriber.expect(3)] == [b"m0", b"m1", b"m2"]


def test_data_check_finds_rows_pointing_at_nothing_and_compact_removes_them(run, tmp_path):
    config = durable_config(tmp_path, free_port())
    store = tmp_path / "store" / "sessions.sqlite3"
    store.parent.mkdir()
    db = sqlite3.connect(store)
    db.executescript(f"{SCHEMA} INSERT INTO schema_version VALUES ({SCHEMA_VERSION});"
                     "INSERT INTO sessions (sid, client_id, expiry) VALUES (1, 'c', 60);"
                     "INSERT INTO queue VALUES (1, 1, 42, 1, 0, NULL, NULL);"
                     "INSERT INTO subscriptions VALUES (2, 'x', 1, 0, 0, 0, NULL);")
    db.close()
    checked = run("data", "check", "-c", str(config))
    assert checked.returncode == 1
    assert "problem: 1 queue entries pointing at a missing message" in checked.stderr
    assert "problem: 1 subscriptions rows of a missing session" in checked.stderr
    compacted = run("data", "compact", "-c", str(config))
    assert "removed 2 rows that pointed at nothing" in compacted.stdout
    assert run("data", "check", "-c", str(config)).returncode == 0


def test_data_check_names_a_damaged_or_missing_store(run, tmp_path):
    missing = run("data", "check", "--file", str(tmp_path / "none.sqlite3"))
    assert (missing.returncode, missing.stderr.strip()) == (
        1, f"Error: there is no store at {tmp_path / 'none.sqlite3'}")
    (tmp_path / "junk.sqlite3").write_bytes(b"junk" * 1000)
    damaged = run("data", "check", "--file", str(tmp_path / "junk.sqlite3"))
    assert damaged.returncode == 1
    assert "is not a usable bastionmq store: file is not a database" in damaged.stderr
    assert "Traceback" not in damaged.stderr


# ------------------------------------------------------------------ logging

def test_the_log_is_json_lines_in_a_rotated_file(start_process, clients, tmp_path):
    port = free_port()
    log_file = tmp_path / "broker.log"
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
allow_anonymous = true
log {{
  format = json
  file {{ path = "{log_file}", max_size = 2KB, rotate = 2 }}
}}
""")
    broker = start_process(config)
    broker.wait_listening(port)
    for index in range(12):
        clients(port, client_id=f"logged-{index}").disconnect()
    assert broker.stop(signal.SIGTERM) == 0, broker.stderr
    files = sorted(tmp_path.glob("broker.log*"))
    assert [path.name for path in files] == ["broker.log", "broker.log.1", "broker.log.2"]
    assert all(path.stat().st_size <= 2048 for path in files)
    events = [json.loads(line) for path in reversed(files)  # the oldest first
              for line in path.read_text().splitlines()]
    connects = [e for e in events if e.get("event") == "connect"]
    disconnects = [e for e in events if e.get("event") == "disconnect"]
    assert connects and disconnects
    last = connects[-1]
    assert (last["level"], last["listener"]) == ("info", "tcp:default")
    assert last["client_id"].startswith("logged-") and last["peer"].startswith("127.0.0.1:")
    assert disconnects[-1]["reason"] == "client disconnected"
    assert "connected (protocol" in last["message"]


def test_connects_and_refusals_are_logged_at_info_by_default(start_process, clients, tmp_path):
    port = free_port()
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}" }}
allow_anonymous = false
""")
    broker = start_process(config)
    broker.wait_listening(port)
    assert clients(port, client_id="stranger").reason_code != 0
    assert broker.stop(signal.SIGTERM) == 0
    assert "INFO bastionmq.connection: refusing client 'stranger'" in broker.stderr


def test_with_no_file_it_serves_loopback_and_the_api_without_a_key(start_process, run, tmp_path):
    """No -c and no etc/bastionmq.conf where it starts: the built-in default."""
    port, ws_port, api_port = free_port(), free_port(), free_port()
    env = clean_env(BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND=f"127.0.0.1:{port}",
                    BASTIONMQ_LISTENERS__WS__DEFAULT__BIND=f"127.0.0.1:{ws_port}",
                    BASTIONMQ_HTTP_API__BIND=f"127.0.0.1:{api_port}",
                    XDG_DATA_HOME=str(tmp_path / "xdg"))
    log = tmp_path / "stderr.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([shutil.which("bastionmq"), "start"], cwd=tmp_path, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        deadline = time.monotonic() + TIMEOUT
        while f"operations listener on http://127.0.0.1:{api_port}" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "starting with the built-in default configuration" in log.read_text()
        # The operations listener's database (API keys, bans) in the per-user data_dir.
        assert f"data_dir {tmp_path / 'xdg' / 'bastionmq'} (per-user default" in log.read_text()
        assert (tmp_path / "xdg" / "bastionmq" / "auth.sqlite3").is_file()
        sent = subprocess.run([tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port),
                               "-t", "hello", "-m", "world", "-q", "1"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert sent.returncode == 0, sent.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/v1/stats",
                                    timeout=TIMEOUT) as answer:
            assert json.loads(answer.read())["counters"]["connacks"]["0"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0, log.read_text()


# ------------------------------------------------------------------ every problem at once


def test_check_config_and_start_report_schema_and_file_errors_together(run, tmp_path):
    port = free_port()
    config = write_config(tmp_path, f"""
listeners.tcp.default {{ bind = "127.0.0.1:{port}", bogus_key = 1 }}
allow_anonymous = true
mqtt.max_inflight = 0
listeners.ssl.default {{
  bind = "127.0.0.1:0"
  ssl_options {{
    certfile = "gone.pem", keyfile = "gone.key", cacertfile = "no-ca.pem"
    verify = verify_peer, enable_crl_check = true, crlfile = ["one.crl", "two.crl"]
  }}
}}
authentication = [ {{ mechanism = password_based, backend = password_file, path = "no-passwd" }} ]
authorization.sources = [ {{ type = file, path = "no-acl.conf" }} ]
""")
    expected = [
        "listeners.tcp.default.bogus_key: unknown key",
        "mqtt.max_inflight: 0 is out of range",
        "listeners.ssl.default.ssl_options.certfile: 'gone.pem': no such file",
        "listeners.ssl.default.ssl_options.keyfile: 'gone.key': no such file",
        "listeners.ssl.default.ssl_options.cacertfile: 'no-ca.pem': no such file",
        "listeners.ssl.default.ssl_options.crlfile: 'one.crl': no such file",
        "listeners.ssl.default.ssl_options.crlfile: 'two.crl': no such file",
        "authentication.0: ",
        "authorization.sources.0.path: ",
    ]
    for command in ("check-config", "start"):
        result = run(command, "-c", str(config), cwd=tmp_path)
        assert result.returncode != 0
        lines = result.stderr.splitlines()
        assert lines[0] == f"Error: invalid configuration ({len(expected)} problems):", \
            result.stderr
        for start in expected:
            assert sum(line.startswith(start) for line in lines) == 1, (start, result.stderr)
        assert "no-passwd" in result.stderr and "no-acl.conf" in result.stderr
        assert "Traceback" not in result.stderr
        assert "listening on" not in result.stderr
    assert refuses_connections(port)


def test_every_missing_file_of_a_valid_config_is_listed(run, tmp_path):
    config = write_config(tmp_path, """
listeners.ssl.a { bind = "127.0.0.1:0", ssl_options { certfile = "a.pem", keyfile = "a.key" } }
listeners.wss.b { bind = "127.0.0.1:0", ssl_options {
  certfile = "b.pem", keyfile = "b.key", verify = verify_peer, cacertfile = "b-ca.pem"
  server_names = [ { names = ["x.example"], certfile = "x.pem", keyfile = "x.key" } ] } }
""")
    result = run("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode != 0
    missing = [line.split(": ")[0] for line in result.stderr.splitlines()
               if line.endswith("no such file")]
    assert missing == [
        "listeners.ssl.a.ssl_options.certfile", "listeners.ssl.a.ssl_options.keyfile",
        "listeners.wss.b.ssl_options.certfile", "listeners.wss.b.ssl_options.keyfile",
        "listeners.wss.b.ssl_options.cacertfile",
        "listeners.wss.b.ssl_options.server_names.0.certfile",
        "listeners.wss.b.ssl_options.server_names.0.keyfile"], result.stderr


# ------------------------------------------------------------------ config show-default


def test_show_default_prints_the_shipped_config_and_says_where_start_looks(run, tmp_path):
    shown = run("config", "show-default", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == DEFAULT_CONFIG.read_text(encoding="utf-8")
    assert "bastionmq start without -c reads etc/bastionmq.conf in the working directory " \
           "(not found here), else the built-in default" in shown.stderr
    builtin = run("config", "show-default", "--builtin", cwd=tmp_path)
    assert builtin.stdout == (REPO / "bastionmq" / "builtin.conf").read_text(encoding="utf-8")
    # What it prints, saved as etc/bastionmq.conf, is what start reads from there.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "bastionmq.conf").write_text(shown.stdout, encoding="utf-8")
    checked = run("check-config", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("etc/bastionmq.conf: configuration is valid")
    assert "data_dir data (project default" in checked.stdout
