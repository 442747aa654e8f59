"""The scaling curve of ``node.workers``: throughput with 1, 2, 4 and 8
workers, each setup on cores of its own. Needs a machine with at least
(largest worker count + 2) cores; on a smaller one it runs the counts that
fit and says which it left out.

For each worker count N:

- the broker (``bastionmq start --workers N``; for N = 1 the single process
  with no cluster, the baseline) on cores 0..N-1;
- its nats-server (N > 1) on core N;
- G load generators (benchmarks/loadgen.py), each on a core of its own among
  the rest, each with its own clients: the figure is their sum.

Each scenario and count is run ``--runs`` times; the table gives the median
and the speed-up over one process. Scenarios: ``fanout`` (1 publisher to
1000 subscribers per generator, deliveries/s), ``qos0-1to1`` (pairs, messages/s;
publisher and subscriber land on whichever workers the kernel picks, so most
messages cross between workers), ``tls-handshake-ec`` (TLS 1.3 handshakes
with CONNECT per second: they share nothing between workers).

    python benchmarks/scaling.py --workers 1,2,4,8 --generators 4 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cluster import free_port, stop, wait_port  # noqa: E402

SCENARIOS = ("fanout", "qos0-1to1", "tls-handshake-ec")


#: With --oversubscribe, core numbers wrap around the machine's (to check the
#: script on a small machine; the figures then mean nothing).
WRAP = 0


def cores(first: int, count: int) -> str:
    numbers = range(first, first + count)
    return ",".join(sorted({str(core % WRAP if WRAP else core) for core in numbers}))


def write_config(args, workdir: Path, workers: int, port: int, tls_port: int,
                 nats_port: int) -> Path:
    data = workdir / f"data-{workers}"
    data.mkdir()
    # The development PKI the TLS listener uses, and a client certificate
    # for the generators' handshakes.
    bastionmq = args.bastionmq_cmd.split()
    for words in (["init", str(data / "certs")], ["client", "bench", "--dir", str(data / "certs")]):
        subprocess.run([*bastionmq, "certs", *words], check=True, capture_output=True)
    text = (f'node.data_dir = "{data}"\nallow_anonymous = true\nhttp_api.enable = false\n'
            'log.level = warning\ndurable_sessions.enable = false\n'
            f'listeners.tcp.default {{ bind = "127.0.0.1:{port}", max_connections = infinity }}\n'
            f'listeners.ssl.default {{ bind = "127.0.0.1:{tls_port}", '
            'max_connections = infinity, ssl_options.verify = verify_none }\n')
    if workers > 1:
        # nats-server is started here, on a core of its own (not by the supervisor).
        text += (f'cluster {{ enable = true, nats.servers = ["127.0.0.1:{nats_port}"] }}\n')
    path = workdir / f"bastionmq-{workers}.conf"
    path.write_text(text)
    return path


def run_once(args, workers: int, scenario: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bmq-scaling-"))
    started: list[subprocess.Popen] = []
    try:
        port, tls_port, nats_port = free_port(), free_port(), free_port()
        config = write_config(args, workdir, workers, port, tls_port, nats_port)
        if workers > 1:
            nats = subprocess.Popen(
                ["taskset", "-c", cores(workers, 1), args.nats_server, "-a", "127.0.0.1",
                 "-p", str(nats_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(nats)
            wait_port(nats_port, nats, "nats-server")
        log = open(workdir / "broker.log", "wb")
        broker = subprocess.Popen(
            ["taskset", "-c", cores(0, workers), *args.bastionmq_cmd.split(), "start",
             "-c", str(config), "--workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT)
        started.append(broker)
        wait_port(port, broker, "bastionmq")
        time.sleep(1.0 + 0.2 * workers)  # every worker listening
        first_generator = workers + (1 if workers > 1 else 0)
        target = tls_port if scenario.startswith("tls") else port
        certs = workdir / f"data-{workers}" / "certs"
        extra = ["--cafile", str(certs / "ca.pem"), "--certfile", str(certs / "bench.pem"),
                 "--keyfile", str(certs / "bench.key")] if scenario.startswith("tls") else []
        generators = [subprocess.Popen(
            ["taskset", "-c", cores(first_generator + index, 1), sys.executable,
             str(HERE / "loadgen.py"), scenario, "--port", str(target),
             "--duration", str(args.duration), "--warmup", str(args.warmup), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for index in range(args.generators)]
        figures = []
        for generator in generators:
            out, err = generator.communicate(timeout=args.warmup + args.duration + 300)
            if generator.returncode:
                raise RuntimeError(f"loadgen failed:\n{err.strip()[-2000:]}")
            figures.append(json.loads(out.strip().splitlines()[-1])["figure"])
        return {"workers": workers, "scenario": scenario, "figure": sum(figures),
                "per_generator": figures}
    finally:
        for process in reversed(started):
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--generators", type=int, default=4,
                        help="load generator processes, one core each")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--oversubscribe", action="store_true",
                        help="run every count, core numbers wrapping around this machine's "
                             "(checks the script; the figures mean nothing)")
    parser.add_argument("--bastionmq-cmd", default=shutil.which("bastionmq") or "bastionmq")
    parser.add_argument("--nats-server", default=shutil.which("nats-server")
                        or "/usr/sbin/nats-server")
    args = parser.parse_args(argv)
    available = len(os.sched_getaffinity(0))
    if args.oversubscribe:
        global WRAP
        WRAP, available = available, 1 << 16
    counts = []
    for count in (int(word) for word in args.workers.split(",")):
        needed = count + (1 if count > 1 else 0) + args.generators
        if needed > available:
            print(f"# {count} workers left out: they need {needed} cores "
                  f"({args.generators} generators), this machine has {available}",
                  file=sys.stderr)
        else:
            counts.append(count)
    results: dict[tuple[str, int], list[float]] = {}
    for run in range(args.runs):
        for scenario in args.scenarios.split(","):
            for count in counts:
                result = run_once(args, count, scenario)
                print(json.dumps(result), flush=True)
                results.setdefault((scenario, count), []).append(result["figure"])
    print(f"\n{'scenario':<18}{'workers':>8}{'median/s':>14}{'speed-up':>10}")
    for scenario in args.scenarios.split(","):
        base = statistics.median(results[(scenario, counts[0])]) if counts else 0
        for count in counts:
            median = statistics.median(results[(scenario, count)])
            print(f"{scenario:<18}{count:>8}{median:>14,.0f}"
                  f"{median / base if base else 0:>10.2f}")


if __name__ == "__main__":
    main()
