"""What crossing nodes costs: broker CPU per delivered message, local path
against the path through NATS, in the same run.

Three setups per scenario, each started fresh, alternated, pinned to core 0
(every broker process and nats-server), the load generator on core 1:

- ``local``: one bastionmq, no cluster; publishers and subscribers on it;
- ``local-in-cluster``: one node of a cluster (nats-server beside it), all
  clients on that node: what cluster mode costs when nothing has to cross;
- ``cross-node``: two nodes and nats-server; publishers on node A,
  subscribers on node B: every message crosses.

The figure that compares them is the CPU of every broker-side process (the
nodes and nats-server, from /proc) divided by the messages delivered in the
window, in microseconds. On two cores this is the honest figure: a scaling
curve needs cores for each node (see ../docs/cluster.md).

    python benchmarks/cluster.py --runs 3
    python benchmarks/cluster.py --runs 5 --scenarios qos0-1to1 --pairs 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402  (its /proc readers)
SETUPS = ("local", "local-in-cluster", "cross-node")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on {port} after {timeout} s")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Processes:
    """The broker-side processes of one setup, stopped (SIGTERM) at the end."""

    def __init__(self, workdir: Path, cpu: int, bastionmq: str, nats_server: str,
                 qos1_path: str = "stream", durable: bool = False) -> None:
        self.workdir, self.cpu, self.bastionmq, self.nats_server = workdir, cpu, bastionmq, nats_server
        self.qos1_path, self.durable = qos1_path, durable
        self.started: list[subprocess.Popen] = []

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            process = subprocess.Popen(["taskset", "-c", str(self.cpu), *argv],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def nats(self) -> tuple[subprocess.Popen, int]:
        port = free_port()
        process = self._spawn([self.nats_server, "-a", "127.0.0.1", "-p", str(port),
                               "-js", "-sd", str(self.workdir / "jetstream")],
                              self.workdir / f"nats-{port}.log")
        wait_port(port, process, "nats-server")
        return process, port

    def node(self, name: str, nats_port: int | None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        data = self.workdir / f"{name}-{port}"
        data.mkdir()
        text = (f'listeners.tcp.default {{ bind = "127.0.0.1:{port}", max_connections = infinity }}\n'
                f'allow_anonymous = true\nnode.data_dir = "{data}"\nhttp_api.enable = false\n'
                f"durable_sessions.enable = {str(self.durable).lower()}\n")
        if self.durable:
            text += "mqtt.max_mqueue_len = 0\n"  # qos1-durable queues all it publishes
        if nats_port is not None:
            text += (f'cluster {{ enable = true, node_name = "{name}", qos1_path = {self.qos1_path}, '
                     f'nats.servers = ["127.0.0.1:{nats_port}"] }}\n')
        conf = self.workdir / f"{name}-{port}.conf"
        conf.write_text(text)
        process = self._spawn([*self.bastionmq.split(), "start", "-c", str(conf)],
                              self.workdir / f"{name}-{port}.log")
        wait_port(port, process, f"bastionmq {name}")
        return process, port

    def stop(self) -> None:
        for process in reversed(self.started):
            stop(process)


def run(args, setup: str, scenario: str, extra: list[str]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bmq-cluster-bench-"))
    processes = Processes(workdir, args.broker_cpu, args.bastionmq_cmd, args.nats_server,
                          args.qos1_path, args.durable)
    try:
        if setup == "local":
            node, port = processes.node("a", None)
            pids, sub_port = [node.pid], port
        else:
            nats, nats_port = processes.nats()
            node, port = processes.node("a", nats_port)
            pids, sub_port = [node.pid, nats.pid], port
            if setup == "cross-node":
                other, sub_port = processes.node("b", nats_port)
                pids.append(other.pid)
            time.sleep(0.5)  # the nodes' subscriptions settle before the load
        argv = ["taskset", "-c", str(args.gen_cpu), sys.executable, str(HERE / "loadgen.py"), scenario,
                "--port", str(port), "--sub-port", str(sub_port), "--broker-pid", str(pids[0]),
                *[f"--also-pid={pid}" for pid in pids[1:]],
                "--duration", str(args.duration), "--warmup", str(args.warmup), *extra]
        before = [loadgen.cpu_seconds(pid) for pid in pids]
        out = subprocess.run(argv, capture_output=True, text=True,
                             timeout=args.warmup + args.duration + 180)
        used = [loadgen.cpu_seconds(pid) - was for pid, was in zip(pids, before)]
        if out.returncode:
            raise RuntimeError(f"loadgen failed ({out.returncode}):\n{out.stderr.strip()[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        processes.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    # qos1-durable counts the messages acknowledged into offline sessions.
    delivered = result.get("delivered_window", result.get("acked_window"))
    cpu = result["broker_cpu"] * result["window_s"]
    result["us_per_delivery"] = round(cpu / delivered * 1e6, 3) if delivered else None
    # Each process's share of the broker-side CPU over the whole loadgen run
    # (warm-up included): node a, then nats-server, then node b.
    result["cpu_shares"] = [round(u / sum(used), 3) for u in used] if sum(used) else []
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--scenarios", default="qos0-1to1,fanout")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--bastionmq-cmd", default="bastionmq")
    p.add_argument("--nats-server", default=shutil.which("nats-server")
                   or shutil.which("nats-server", path="/usr/sbin") or "nats-server")
    p.add_argument("--broker-cpu", type=int, default=0)
    p.add_argument("--gen-cpu", type=int, default=1)
    p.add_argument("--qos1-path", choices=("stream", "core"), default="stream",
                   help="cluster.qos1_path of the nodes: QoS 1/2 through JetStream, or at "
                        "most once like QoS 0")
    p.add_argument("--durable", action="store_true",
                   help="durable_sessions on every node, offline queues unbounded (for "
                        "qos1-durable: the persistent sessions in the subscribers' node's "
                        "SQLite store)")
    args, extra = p.parse_known_args(argv)
    scenarios = args.scenarios.split(",")
    setups = args.setups.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    for n in range(args.runs):
        order = setups if n % 2 == 0 else setups[::-1]
        for scenario in scenarios:
            for setup in order:
                result = run(args, setup, scenario, extra)
                results.setdefault((scenario, setup), []).append(result)
                print(f"run {n + 1} {scenario:10} {setup:17} {result['figure']:>10} {result['unit']:>14}"
                      f"  {result['us_per_delivery']} us broker CPU per delivery"
                      f"  shares {result['cpu_shares']}", flush=True)
    print()
    print(f"{'scenario':10} {'setup':17} {'median rate':>12} {'us CPU/delivery':>16} {'vs local':>9}")
    summary = {}
    for scenario in scenarios:
        local = None
        for setup in setups:
            runs = results[(scenario, setup)]
            rate = statistics.median(r["figure"] for r in runs)
            cost = statistics.median(r["us_per_delivery"] for r in runs)
            if setup == "local":
                local = cost
            ratio = f"{cost / local:.2f}x" if local else ""
            summary[f"{scenario}/{setup}"] = {"rate": rate, "us_per_delivery": cost, "runs": runs}
            print(f"{scenario:10} {setup:17} {rate:>12,.0f} {cost:>16.3f} {ratio:>9}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "extra": extra, "cpus": os.cpu_count(),
                                "summary": summary}, indent=1))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
