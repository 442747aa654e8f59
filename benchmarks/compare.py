"""Run the load-generator scenarios against bastionmq and Mosquitto, compare.

    python benchmarks/compare.py --runs 5

Each (run, scenario, broker) gets a fresh broker on a free loopback port,
pinned to one core (taskset -c 0), and a fresh generator pinned to the other
(taskset -c 1). The brokers' order is reversed from one run to the next. The
table shows the median over the runs and the ratios (bastionmq / Mosquitto,
and below); all figures also go to benchmarks/results/compare-<time>.json.
Options that compare.py does not know are passed on to loadgen.py (e.g.
--pairs 4).

For the TLS scenarios compare.py first makes a development PKI per key type
(bastionmq.pki) in its temporary directory; both brokers serve the same
certificate and trust the same CA, and the generator presents the same
client certificate to both.

For the WebSocket scenario (WS_SCENARIOS) each broker's one listener is a
WebSocket listener instead (bastionmq: listeners.ws; Mosquitto: `protocol
websockets`, beside an unused TCP listener on another port, without which
Debian's Mosquitto 2.0.11 refuses to start: see the README).

Besides the two brokers there are broker variants: bastionmq-acl and
bastionmq-acl-nocache are bastionmq with authorization on, from a generated
EMQX acl.conf of 1,000 rules (acl_conf()) whose first match for the
benchmark's clients is its last rule, with the decision cache on or off.
bastionmq-durable (and bastionmq-durable-normal, with synchronous = normal)
is bastionmq with durable_sessions on, mosquitto-persist is Mosquitto with
persistence on; each start of one gets a fresh, empty data folder (under
--store-dir). bastionmq-ops is bastionmq with its operations listener on,
its /metrics scraped every second during the run. bastionmq-observer is
bastionmq embedded by benchmarks/observer_broker.py with one on_message
observer that counts (--observer-cmd), configured as bastionmq: run it
with bastionmq in the same runs (`--brokers bastionmq,bastionmq-observer
--scenarios qos0-1to1`) for what an observer costs. Some scenarios add to
every broker's configuration
(SCENARIO_CONFIG: qos1-durable lifts the offline queue limits).
Ratios are shown for each pair in RATIOS whose two members ran.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import pwd
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402

CONFIGS = {
    "bastionmq": (
        "{listener}"
        "allow_anonymous = true\n"
        "log.level = warning\n"
    ),
    "mosquitto": (
        "{listener}"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_connections -1\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    ),
}
LISTENERS = {
    "bastionmq": {
        "tcp": "listeners.tcp.default {{ bind = \"127.0.0.1:{port}\", max_connections = infinity }}\n",
        # websocket { mqtt_path = "/mqtt", mqtt_piggyback = multiple, subprotocols incl. "mqtt" }: the defaults
        "ws": "listeners.ws.default {{ bind = \"127.0.0.1:{port}\", max_connections = infinity }}\n",
        "tls": (
            "listeners.ssl.default {{\n"
            "  bind = \"127.0.0.1:{port}\"\n"
            "  max_connections = infinity\n"
            "  ssl_options {{\n"
            "    cacertfile = \"{cafile}\"\n"
            "    certfile = \"{certfile}\"\n"
            "    keyfile = \"{keyfile}\"\n"
            "    verify = {verify}\n"
            "    fail_if_no_peer_cert = {mutual}\n"
            "  }}\n"
            "}}\n"
        ),
    },
    "mosquitto": {
        "tcp": "listener {port} 127.0.0.1\n",
        # Debian's 2.0.11 exits ("Unable to start any listening sockets") when
        # its only listener is a websockets one; the TCP listener on {spare}
        # gets no client. max_connections (below) applies to the last listener.
        "ws": "listener {spare} 127.0.0.1\nlistener {port} 127.0.0.1\nprotocol websockets\n",
        "tls": (
            "listener {port} 127.0.0.1\n"
            "cafile {cafile}\n"
            "certfile {certfile}\n"
            "keyfile {keyfile}\n"
            "require_certificate {mutual}\n"
        ),
    },
}
# TLS scenario: (key type of the CA, server and client certificates, client certificate required)
TLS_SCENARIOS = {
    "tls-handshake-ec": ("ec", True),
    "tls-handshake-rsa": ("rsa2048", True),
    "tls-qos0": ("ec", False),
}
KEY_TYPES = {"ec": "ECDSA P-256", "rsa2048": "RSA 2048"}
# Scenarios whose listener is a WebSocket listener (path /mqtt, subprotocol mqtt).
WS_SCENARIOS = {"ws-qos0"}
# The authorization block the bastionmq-acl variants add; {acl} is the
# generated acl.conf, {cache} true or false.
AUTHORIZATION = """\
authorization {
  sources = [ { type = file, path = "{acl}" } ]
  cache { enable = {cache} }
}
"""
# The durable store the bastionmq-durable variants add ({data_dir}: a fresh
# folder per broker start); commit_interval 5 ms and batch_size 1000 are
# the defaults, and so is synchronous = full.
DURABLE = """\
durable_sessions {
  enable = true
  data_dir = "{data_dir}"
{synchronous}}
"""
# The operations listener the bastionmq-ops variant adds ({ops_port}: a free
# port); the run scrapes its /metrics every second (scrape_metrics()). It
# opens the built-in database (API keys, bans) in node.data_dir.
OPS = ('http_api { enable = true, bind = "127.0.0.1:{ops_port}" }\n'
       'node.data_dir = "{data_dir}"\n')
# Mosquitto's persistence: it writes its database at autosave_interval
# (default 1800 s) and at shutdown, not before acknowledging.
MOSQUITTO_PERSIST = "persistence true\npersistence_location {data_dir}/\n"
# Broker name -> (the broker it runs: its command, listeners and base
# configuration; what its configuration adds, with {acl} and {data_dir}
# filled in). A Mosquitto option the addition sets replaces the base's line.
BROKERS = {
    "bastionmq": ("bastionmq", ""),
    "mosquitto": ("mosquitto", ""),
    "bastionmq-acl": ("bastionmq", AUTHORIZATION.replace("{cache}", "true")),
    "bastionmq-acl-nocache": ("bastionmq", AUTHORIZATION.replace("{cache}", "false")),
    "bastionmq-durable": ("bastionmq", DURABLE.replace("{synchronous}", "")),
    "bastionmq-durable-normal": ("bastionmq", DURABLE.replace("{synchronous}", "  synchronous = normal\n")),
    "mosquitto-persist": ("mosquitto", MOSQUITTO_PERSIST),
    "bastionmq-ops": ("bastionmq", OPS),
    # another build of bastionmq (--baseline-cmd), e.g. the commit before a change
    "bastionmq-baseline": ("bastionmq", ""),
    # bastionmq embedded with one on_message observer (--observer-cmd)
    "bastionmq-observer": ("bastionmq", ""),
}
# Scenario -> broker program -> what it adds to the configuration of every
# broker that program runs. qos1-durable queues everything it publishes in
# offline sessions: the queues must not drop (bastionmq: 0 is no limit;
# its default is 1000, the oldest dropped; Mosquitto's is 1000 messages).
SCENARIO_CONFIG = {
    "qos1-durable": {
        "bastionmq": "mqtt.max_mqueue_len = 0\n",
        "mosquitto": "max_queued_messages 0\nmax_queued_bytes 0\n",
    },
}
# Ratio columns (numerator, denominator), shown when both ran.
RATIOS = (
    ("bastionmq", "mosquitto"),
    ("bastionmq", "bastionmq-baseline"),
    ("bastionmq-acl", "bastionmq"),
    ("bastionmq-acl-nocache", "bastionmq"),
    ("bastionmq-durable", "mosquitto-persist"),
    ("bastionmq-durable", "bastionmq"),
    ("bastionmq-durable-normal", "mosquitto-persist"),
    ("bastionmq-durable-normal", "bastionmq"),
    ("mosquitto-persist", "mosquitto"),
    ("bastionmq-ops", "bastionmq"),
    ("bastionmq-observer", "bastionmq"),
)
ACL_RULES = 1000
# Scenarios whose generator spins its event loop on purpose (its core is busy
# by design, not at its limit).
SPINNING_GENERATOR = {"qos1-latency"}
HIGHER_IS_BETTER = {
    "qos0-1to1": True,
    "qos1": True,
    "qos1-durable": True,
    "qos1-overload": True,
    "qos1-overload-fanout": True,
    "qos1-overload-fanin": True,
    "qos1-latency": False,
    "fanout": True,
    "shared": True,
    "idle": False,
    "tls-handshake-ec": True,
    "tls-handshake-rsa": True,
    "tls-qos0": True,
    "ws-qos0": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def acl_conf(rules: int = ACL_RULES, last: str = "{allow, all}.") -> str:
    """An EMQX acl.conf of `rules` rules that none of the benchmark's
    clients (anonymous, client ids "bm<pid>-<role><n>", from 127.0.0.1)
    matches before the end: per-username and per-client-id rules for a fleet
    of devices, gateways and services (allow and deny, exact and wildcard
    filters, ${clientid} / ${username} placeholders, QoS and retain
    qualifiers, a client-id regex, an address condition), and every 50th
    rule one for all clients on topics the benchmark does not use; then
    EMQX's default deny of subscriptions to $SYS/# and "#", and `last`,
    which decides for the benchmark's clients."""
    kinds = (
        '{{allow, {{username, "dev-{d}"}}, publish, ["t/{t}/dev-{d}/up", "t/{t}/dev-{d}/state"]}}.',
        '{{allow, {{username, "dev-{d}"}}, subscribe, ["t/{t}/dev-{d}/down/#"]}}.',
        '{{deny, {{username, "dev-{d}"}}, all, ["t/{t}/admin/#", "$SYS/#"]}}.',
        '{{allow, {{username, "app-{d}"}}, subscribe, ["t/{t}/+/up", "t/{t}/+/state"]}}.',
        '{{allow, {{clientid, "gw-{d}"}}, all, ["gw/${{clientid}}/#"]}}.',
        '{{allow, {{clientid, "sensor-{d}"}}, {{publish, [{{qos, [0, 1]}}, {{retain, false}}]}}, '
        '["plant/{t}/sensor-{d}/metrics"]}}.',
        '{{deny, {{clientid, "sensor-{d}"}}, publish, ["plant/{t}/#"]}}.',
        '{{allow, {{username, "svc-{d}"}}, all, ["svc/${{username}}/#", "t/{t}/events/#"]}}.',
        '{{allow, {{\'and\', [{{username, "op-{d}"}}, {{ipaddr, "10.{o}.0.0/16"}}]}}, all, ["t/{t}/#"]}}.',
        '{{allow, {{clientid, {{re, "^line-{d}-[0-9]+$"}}}}, publish, ["plant/{t}/line/${{clientid}}/+"]}}.',
    )
    for_all = (
        '{{allow, all, publish, ["inbox/{t}/${{clientid}}/#"]}}.',
        '{{deny, all, publish, ["t/{t}/+/raw/#"]}}.',
    )
    lines = [
        f"% {rules} rules generated by benchmarks/compare.py (acl_conf): none matches",
        "% the benchmark's clients before the last one.",
    ]
    for i in range(rules - 2):
        # device or service number d, of tenant t (also the second octet of its network)
        d, t, o = f"{i:04d}", f"{i % 40:02d}", i % 40
        rule = for_all[i // 50 % 2] if i % 50 == 49 else kinds[i % len(kinds)]
        lines.append(rule.format(d=d, t=t, o=o))
    lines.append('{deny, all, subscribe, ["$SYS/#", {eq, "#"}]}.')
    lines.append(last)
    return "\n".join(lines) + "\n"


def make_pki(root: Path, key_types) -> dict:
    """A development PKI per key type under `root` (bastionmq.pki): CA,
    server certificate for localhost/127.0.0.1/::1 and one client
    certificate, all of that key type. Returns key type -> file paths."""
    from bastionmq import pki

    files = {}
    for key_type in key_types:
        directory = root / f"pki-{key_type}"
        server = pki.init_pki(directory, key_type=key_type)
        client = pki.issue_client(directory, "bench-client", key_type=key_type)
        files[key_type] = {
            "cafile": str(directory / pki.CA_CERT),
            "certfile": str(server.cert),
            "keyfile": str(server.key),
            "client_certfile": str(client.cert),
            "client_keyfile": str(client.key),
        }
    return files


def share_with_mosquitto(root: Path, files: dict):
    """Mosquitto started as root switches to its `user` (mosquitto by
    default) before it loads its certificates, and `root` and the keys are
    root's alone: let that user through `root` and give it the server keys
    (readable to all if there is no mosquitto user)."""
    if os.geteuid() != 0:
        return
    os.chmod(root, 0o711)  # enter, not list
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        user = None
    for f in files.values():
        if user:
            os.chown(f["keyfile"], user.pw_uid, user.pw_gid)
        else:
            os.chmod(f["keyfile"], 0o644)


def config(
    name: str,
    port: int,
    tls: dict | None = None,
    acl: str = "",
    ws: bool = False,
    data_dir: str = "",
    scenario: str = "",
    ops_port: int = 0,
) -> str:
    """A broker's configuration: plain TCP, or with `tls` (a make_pki entry
    plus "mutual") a TLS listener instead, or with `ws` a WebSocket listener;
    a variant's addition with `acl` (the acl.conf's path) and `data_dir` (its
    data folder) filled in, then what `scenario` adds (SCENARIO_CONFIG)."""
    name, added = BROKERS[name]
    added = added.replace("{acl}", acl).replace("{data_dir}", data_dir)
    added = added.replace("{ops_port}", str(ops_port))
    added += SCENARIO_CONFIG.get(scenario, {}).get(name, "")
    if ws:
        spare = free_port()
        while spare == port:
            spare = free_port()
        listener = LISTENERS[name]["ws"].format(port=port, spare=spare)
    elif tls is None:
        listener = LISTENERS[name]["tcp"].format(port=port)
    else:
        mutual = tls["mutual"]
        listener = LISTENERS[name]["tls"].format(
            port=port,
            cafile=tls["cafile"],
            certfile=tls["certfile"],
            keyfile=tls["keyfile"],
            verify="verify_peer" if mutual else "verify_none",
            mutual="true" if mutual else "false",
        )
    base = CONFIGS[name].format(listener=listener)
    if name == "mosquitto":  # one line per option: the addition's replaces the base's
        options = {ln.split()[0] for ln in added.splitlines() if ln.strip()}
        base = "".join(ln for ln in base.splitlines(keepends=True) if not ln.strip() or ln.split()[0] not in options)
    return base + added


def fresh_data_dir(root: Path, prefix: str, program: str) -> Path:
    """An empty folder for one broker start's data. Mosquitto started as
    root writes as its `mosquitto` user, so that user gets the folder (and
    must be able to reach `root`)."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    if program == "mosquitto" and os.geteuid() == 0:
        try:
            user = pwd.getpwnam("mosquitto")
            os.chown(path, user.pw_uid, user.pw_gid)
        except KeyError:
            os.chmod(path, 0o777)
    return path


def filesystem(path: Path) -> str:
    """The type and device of the filesystem `path` is on (/proc/mounts): a
    store's commits cost what its fsync costs there (nothing on tmpfs)."""
    path = os.path.realpath(path)
    best = ("", "unknown", "")
    with open("/proc/mounts") as f:
        for line in f:
            device, mount, kind = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                best = (mount, kind, device)
    return f"{best[1]} ({best[2]} on {best[0]})"


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Broker:
    """A broker subprocess on a free port, pinned to `cpu`; stopped with
    SIGTERM when the `with` block ends. With `tls` (see config()) its one
    listener is a TLS listener, with `ws` a WebSocket listener; `acl` is the
    acl.conf a variant may use. A variant that keeps data gets a fresh folder
    under `store_root`, removed when the broker has stopped (its size is
    kept in `store_bytes`, the time the broker took to stop in `stop_s`);
    `scenario` adds its SCENARIO_CONFIG."""

    def __init__(
        self,
        name: str,
        cmd: str,
        cpu: int,
        workdir: Path,
        tls: dict | None = None,
        acl: str = "",
        ws: bool = False,
        store_root: Path | None = None,
        scenario: str = "",
    ):
        self.name, self.cmd, self.cpu, self.workdir, self.tls, self.acl = name, cmd, cpu, workdir, tls, acl
        self.ws, self.store_root, self.scenario = ws, store_root or workdir, scenario
        self.data_dir = None
        self.store_bytes = self.stop_s = None
        #: The operations listener's port, for variants that have one.
        self.ops_port = 0

    def __enter__(self):
        self.port = free_port()
        program, added = BROKERS[self.name]
        if "{data_dir}" in added:
            self.data_dir = fresh_data_dir(self.store_root, f"{self.name}-{self.port}-", program)
        if "{ops_port}" in added:
            self.ops_port = free_port()
        conf = self.workdir / f"{self.name}-{self.port}.conf"
        conf.write_text(
            config(self.name, self.port, self.tls, self.acl, self.ws, str(self.data_dir or ""), self.scenario,
                   self.ops_port)
        )
        argv = ["taskset", "-c", str(self.cpu), *shlex.split(self.cmd.format(conf=conf, port=self.port))]
        self.logpath = self.workdir / f"{self.name}-{self.port}.log"
        with open(self.logpath, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile
            )
        try:
            self._wait_listening()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_listening(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not listening on {self.port} after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n=20) -> str:
        return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)  # a persistent broker may write its store first
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.stop_s = round(time.monotonic() - t0, 3)
        if self.data_dir is not None and self.data_dir.exists():
            self.store_bytes = sum(f.stat().st_size for f in self.data_dir.rglob("*") if f.is_file())
            shutil.rmtree(self.data_dir, ignore_errors=True)


def background_load(cpus, seconds=0.3) -> float:
    """Busy share of the benchmark's cores while nothing of ours runs: other
    work on the machine would take CPU from the broker or the generator."""
    a, t = loadgen.idle_seconds(cpus), time.monotonic()
    time.sleep(seconds)
    return round(1 - (loadgen.idle_seconds(cpus) - a) / ((time.monotonic() - t) * len(cpus)), 3)


def scrape_metrics(port: int, cpu: int, stop: threading.Event, scrapes: list) -> None:
    """GET /metrics every second until ``stop``, on the generator's core (as
    Prometheus would, from elsewhere); ``scrapes`` gets each one's size, or
    None for one that got no answer within 5 s (counted, not fatal: a broker
    too busy to answer is a finding)."""
    os.sched_setaffinity(0, {cpu})  # this thread only
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                scrapes.append(len(response.read()))
        except OSError:
            scrapes.append(None)


def run_scenario(args, scenario, broker: Broker, extra) -> dict:
    argv = [
        "taskset", "-c", str(args.gen_cpu), sys.executable, str(HERE / "loadgen.py"), scenario,
        "--port", str(broker.port), "--broker-pid", str(broker.proc.pid),
        "--duration", str(args.duration), "--warmup", str(args.warmup), *extra,
    ]  # fmt: skip
    if broker.tls:  # the files the broker was given, so they cannot differ
        argv += ["--cafile", broker.tls["cafile"]]
        if broker.tls["mutual"]:
            argv += ["--certfile", broker.tls["client_certfile"], "--keyfile", broker.tls["client_keyfile"]]
    stop, scrapes = threading.Event(), []
    scraper = None
    if broker.ops_port:
        scraper = threading.Thread(target=scrape_metrics, args=(broker.ops_port, args.gen_cpu, stop, scrapes))
        scraper.start()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=args.warmup + args.duration + 180)
    finally:
        stop.set()
        if scraper is not None:
            scraper.join()
    if broker.proc.poll() is not None:
        raise RuntimeError(f"{broker.name} exited with {broker.proc.returncode}:\n{broker.log_tail()}")
    if out.returncode:
        raise RuntimeError(f"loadgen failed ({out.returncode}):\n{out.stderr.strip()[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if scraper is not None:
        result["metrics_scrapes"] = sum(1 for size in scrapes if size is not None)
        result["metrics_scrapes_unanswered"] = sum(1 for size in scrapes if size is None)
    return result


def version(cmd: str) -> str:
    """`mosquitto -h` / `bastionmq version`, from the command up to its first option or `start`."""
    argv = shlex.split(cmd)
    head = argv[: next((i for i, a in enumerate(argv) if a == "start" or a.startswith("-")), len(argv))]
    probe = head + (["version"] if "start" in argv else ["-h"])
    try:
        out = subprocess.run(probe, capture_output=True, text=True, timeout=20)
    except OSError as e:
        return f"unknown ({e})"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def describe(r: dict) -> str:
    """One line for one run."""
    text = f"{fmt(r['figure'])} {r['unit']}"
    if "loss_pct" in r:
        text += f"  loss {fmt(r['loss_pct'])}%"
    if "expected_deliveries" in r:  # qos1-overload*
        text += (f"  acked {r['acked_total']:,} delivered {r['delivered_total']:,}"
                 f" of {r['expected_deliveries']:,} due, lost {fmt(r['lost'])}, out of order {r['disorder']:,}")
    elif "acked_total" in r:  # qos1-durable
        text += f"  acked {r['acked_total']:,} unacked {r['unacked']:,}"
        if "queued_delivered" in r:
            text += f"  delivered on reconnect {r['queued_delivered']:,} in {fmt(r['fetch_s'])} s"
        if "fetch_error" in r:
            text += f"  reconnect failed: {r['fetch_error']}"
    if r.get("store_bytes") is not None:
        text += f"  store {r['store_bytes'] / 2**20:.1f} MiB, stopped in {fmt(r['stop_s'])} s"
    if "failures" in r:
        text += f"  failures {r['failures']:,}"
        if r["failures"]:
            text += " (" + ", ".join(f"{n:,} {why}" for why, n in r["failure_reasons"].items()) + ")"
    if "gen_cpu" in r:
        text += f"  generator cpu {fmt(r['gen_cpu'])} core {fmt(r['gen_core_busy'])}"
        text += f"  broker cpu {fmt(r.get('broker_cpu'))} core {fmt(r.get('broker_core_busy'))}"
    if "p999_us" in r:
        text += f"  p50 {fmt(r['p50_us'])} p90 {fmt(r['p90_us'])} p99.9 {fmt(r['p999_us'])} max {fmt(r['max_us'])} us"
    if "cycle_ms_median" in r:
        text += f"  CONNACK after {fmt(r['cycle_ms_median'])} ms (median)"
    if r.get("broker_log_lines"):
        text += f"  broker logged {r['broker_log_lines']:,} lines"
    if "rss_before_kib" in r:
        text += f"  RSS {r['rss_before_kib']:,} -> {r['rss_after_kib']:,} KiB for {r['connections']:,} connections"
    return text


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")


def fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def summarize(results, scenarios, brokers):
    """Median figure per scenario and broker, plus the worst loss and the
    busiest the generator's core got (a check that it was not the limit)."""
    summary = {}
    for sc in scenarios:
        summary[sc] = {}
        for b in brokers:
            ok = [r for r in results[sc][b] if "error" not in r]
            if not ok:
                summary[sc][b] = None
                continue
            def values(key):
                return [r[key] for r in ok if r.get(key) is not None]

            figs = values("figure")
            summary[sc][b] = {
                "median": statistics.median(figs),
                "min": min(figs),
                "max": max(figs),
                "unit": ok[0]["unit"],
                "runs": len(ok),
                "errors": len(results[sc][b]) - len(ok),
                "max_loss_pct": max(values("loss_pct"), default=None),
                "failures": sum(values("failures")) if values("failures") else None,
                "max_gen_cpu": max(values("gen_cpu"), default=None),
                "max_gen_core_busy": max(values("gen_core_busy"), default=None),
                "median_broker_cpu": statistics.median(values("broker_cpu") or [None]),
                "median_broker_core_busy": statistics.median(values("broker_core_busy") or [None]),
                "disturbed_runs": sum(r.get("background_load", 0) > 0.1 for r in ok),
            }
    return summary


def ratios(summary, scenarios, brokers) -> dict:
    """Scenario -> {"a/b": median of a / median of b} for the RATIOS pairs that ran."""
    pairs = [(a, b) for a, b in RATIOS if a in brokers and b in brokers]
    out = {}
    for sc in scenarios:
        out[sc] = {}
        for a, b in pairs:
            x, y = summary[sc][a], summary[sc][b]
            out[sc][f"{a}/{b}"] = round(x["median"] / y["median"], 3) if x and y and y["median"] else None
    return out


def print_table(summary, ratio, scenarios, brokers):
    pairs = list(ratio[scenarios[0]]) if scenarios else []
    cols = ["scenario", "unit", *brokers, *pairs]
    rows = []
    for sc in scenarios:
        s = summary[sc]
        unit = next((v["unit"] for v in s.values() if v), "")
        unit += " (higher is better)" if HIGHER_IS_BETTER[sc] else " (lower is better)"
        row = [sc, unit] + [fmt(s[b]["median"]) if s[b] else "error" for b in brokers]
        row += [f"{ratio[sc][p]:.3f}" if ratio[sc][p] is not None else "-" for p in pairs]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    for r in [cols, ["-" * w for w in widths], *rows]:
        print("  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print()
    print("median [min-max]; worst loss (TLS handshakes: failures, all runs); generator: highest CPU")
    print("(1.0 = its core) and busiest its core got;")
    print("broker: median CPU and core busy")
    warn = False
    w = max(10, *map(len, scenarios))
    bw = max(10, *map(len, brokers))
    for sc in scenarios:
        for b in brokers:
            v = summary[sc][b]
            if not v:
                print(f"  {sc:{w}} {b:{bw}} no successful run")
                continue
            gen = max(v["max_gen_cpu"] or 0, v["max_gen_core_busy"] or 0)
            warn |= gen >= 0.9 and sc not in SPINNING_GENERATOR
            text = f"  {sc:{w}} {b:{bw}} {fmt(v['median'])} [{fmt(v['min'])}-{fmt(v['max'])}] {v['unit']}"
            if v["max_gen_cpu"] is not None:
                if v["failures"] is not None:
                    text += f"  failures {v['failures']:,}"
                else:
                    text += f"  loss {fmt(v['max_loss_pct'])}%"
                text += f"  generator {fmt(v['max_gen_cpu'])}/{fmt(v['max_gen_core_busy'])}"
                text += f"  broker {fmt(v['median_broker_cpu'])}/{fmt(v['median_broker_core_busy'])}"
            if v["disturbed_runs"]:
                text += f"  ({v['disturbed_runs']} disturbed)"
            print(text + (f"  ({v['errors']} failed)" if v["errors"] else ""))
    if warn:
        print("WARNING: the generator's core was >= 90% busy in some run: figures may be the generator's limit")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="measured window per scenario, seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the window")
    p.add_argument("--scenarios", default=",".join(loadgen.SCENARIOS), help="comma-separated subset")
    p.add_argument("--brokers", default="bastionmq,mosquitto", help="comma-separated, of: " + ", ".join(BROKERS))
    p.add_argument("--bastionmq-cmd", default="bastionmq start -c {conf}", help="{conf} and {port} are filled in")
    p.add_argument("--mosquitto-cmd", default="mosquitto -c {conf}")
    p.add_argument(
        "--baseline-cmd",
        help="command of the bastionmq-baseline broker: another bastionmq build, run in the same "
        "runs, alternated ({conf} and {port} are filled in)",
    )
    p.add_argument(
        "--observer-cmd",
        default=f"{shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'observer_broker.py'))} start -c {{conf}}",
        help="command of the bastionmq-observer broker: bastionmq embedded with one on_message "
        "observer ({conf} and {port} are filled in)",
    )
    p.add_argument("--broker-cpu", type=int, default=0)
    p.add_argument("--gen-cpu", type=int, default=1)
    p.add_argument(
        "--store-dir", type=Path,
        help="where the persistent variants' data folders go (default: the temporary directory)",
    )
    p.add_argument(
        "--awake-broker-core", action="store_true",
        help="keep the broker's core from going idle (a SCHED_IDLE spinner on it), so that waking an "
        "idle CPU does not show in latency figures; core-busy figures of the broker then read 1.0",
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p


def main():
    args, extra = parser().parse_known_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    brokers = [b for b in args.brokers.split(",") if b]
    for s in scenarios:
        if s not in loadgen.SCENARIOS:
            sys.exit(f"unknown scenario {s!r}; known: {', '.join(loadgen.SCENARIOS)}")
    for s in scenarios:  # reject bad pass-through options before starting anything
        loadgen.parser().parse_args([s, "--port", "1", *extra])
    programs = {"bastionmq": args.bastionmq_cmd, "mosquitto": args.mosquitto_cmd}
    cmds = {b: programs[BROKERS[b][0]] for b in brokers if b in BROKERS}
    if "bastionmq-baseline" in brokers:
        if not args.baseline_cmd:
            sys.exit("bastionmq-baseline needs --baseline-cmd")
        cmds["bastionmq-baseline"] = args.baseline_cmd
    if "bastionmq-observer" in brokers:
        cmds["bastionmq-observer"] = args.observer_cmd
    for b in brokers:
        if b not in BROKERS:
            sys.exit(f"unknown broker {b!r}; known: {', '.join(BROKERS)}")
        exe = shlex.split(cmds[b])[0]
        if not shutil.which(exe):
            sys.exit(f"{b}: {exe!r} not found (its --*-cmd option, or --brokers to leave it out)")
    uses_acl = [b for b in brokers if "{acl}" in BROKERS[b][1]]
    uses_store = [b for b in brokers if "{data_dir}" in BROKERS[b][1]]

    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadgen_options": extra,
        "host": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,  # Python's: the generator's and bastionmq's
        },
        "versions": {b: version(cmds[b]) for b in brokers},
    }
    if uses_acl:
        meta["acl"] = {"rules": ACL_RULES, "brokers": {b: BROKERS[b][1] for b in uses_acl}}
    added = {sc: SCENARIO_CONFIG[sc] for sc in scenarios if sc in SCENARIO_CONFIG}
    if added:
        meta["scenario_config"] = added
    key_types = sorted({TLS_SCENARIOS[sc][0] for sc in scenarios if sc in TLS_SCENARIOS})
    if key_types:
        meta["tls"] = {
            sc: {"key_type": KEY_TYPES[kt], "client_certificate": mutual}
            for sc, (kt, mutual) in TLS_SCENARIOS.items()
            if sc in scenarios
        }
    results = {sc: {b: [] for b in brokers} for sc in scenarios}
    cores = {args.broker_cpu, args.gen_cpu}
    awake = None
    if args.awake_broker_core:
        # A SCHED_IDLE spinner: it runs only when the broker does not, and the
        # broker preempts it at once, so the broker's core never halts.
        awake = subprocess.Popen(["taskset", "-c", str(args.broker_cpu), "chrt", "-i", "0",
                                  sys.executable, "-c", "while True: pass"])
        atexit.register(awake.kill)
        cores = {args.gen_cpu}
        meta["awake_broker_core"] = True
    w = max(10, *map(len, scenarios))
    bw = max(10, *map(len, brokers))
    with tempfile.TemporaryDirectory(prefix="bastionmq-bench-") as tmp:
        pki_files = make_pki(Path(tmp), key_types)
        acl = ""
        if uses_acl:
            acl = str(Path(tmp) / "acl.conf")
            Path(acl).write_text(acl_conf())
        if any(BROKERS[b][0] == "mosquitto" for b in brokers):
            share_with_mosquitto(Path(tmp), pki_files)
        store_root = args.store_dir or Path(tmp)
        if uses_store:
            meta["store"] = {
                "root": str(store_root),
                "filesystem": filesystem(store_root),
                "brokers": {b: BROKERS[b][1] for b in uses_store},
            }
        for run in range(args.runs):
            for sc in scenarios:
                tls = None
                if sc in TLS_SCENARIOS:
                    key_type, mutual = TLS_SCENARIOS[sc]
                    tls = {**pki_files[key_type], "mutual": mutual}
                for b in brokers if run % 2 == 0 else brokers[::-1]:
                    try:
                        before = background_load(cores)
                        with Broker(
                            b, cmds[b], args.broker_cpu, Path(tmp), tls, acl, sc in WS_SCENARIOS, store_root, sc
                        ) as broker:
                            r = run_scenario(args, sc, broker, extra)
                        if broker.data_dir is not None:
                            r["store_bytes"], r["stop_s"] = broker.store_bytes, broker.stop_s
                        r["background_load"] = max(before, background_load(cores))
                        # errors and warnings it logged (per-connection logging costs it too)
                        r["broker_log_lines"] = len(broker.logpath.read_text(errors="replace").splitlines())
                        line = describe(r)
                        if r["background_load"] > 0.1:
                            line += f"  (DISTURBED: cores {r['background_load']:.0%} busy without us)"
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                        r = {"error": str(e)}
                        line = f"ERROR {e}"
                    results[sc][b].append(r)
                    print(f"run {run + 1}/{args.runs}  {sc:{w}} {b:{bw}} {line}", flush=True)

    if awake is not None:
        awake.kill()
        awake.wait()
    summary = summarize(results, scenarios, brokers)
    ratio = ratios(summary, scenarios, brokers)
    print()
    print(f"{meta['date']}  {meta['command']}")
    print_table(summary, ratio, scenarios, brokers)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compare-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({**meta, "summary": summary, "ratios": ratio, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
