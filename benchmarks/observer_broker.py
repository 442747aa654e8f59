"""bastionmq embedded in a small application with one ``on_message``
observer that counts: the broker of compare.py's ``bastionmq-observer``
variant, to weigh what an observer costs against plain ``bastionmq`` in the
same run.

    python benchmarks/observer_broker.py start -c CONF
    python benchmarks/observer_broker.py version

It runs as ``bastionmq start`` does (uvloop when installed, the
configuration's logging, SIGTERM or SIGINT stop it) and prints the count on
stopping.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bastionmq import Broker, __version__
from bastionmq.broker.local import LocalMessage
from bastionmq.ops.logs import configure_logging


async def serve(conf: str) -> int:
    broker = Broker(conf)
    broker.manages_logging = True
    configure_logging(broker.config.log)
    seen = 0

    @broker.on_message
    def count(message: LocalMessage) -> None:  # plain: runs inline, as cheap as one can be
        nonlocal seen
        seen += 1

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with broker:
        await stopping.wait()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start")
    start.add_argument("-c", "--config", required=True)
    commands.add_parser("version")
    args = parser.parse_args()
    if args.command == "version":
        print(f"bastionmq {__version__} (embedded, one on_message observer)")
        return
    try:
        import uvloop
    except ImportError:
        seen = asyncio.run(serve(args.config))
    else:
        seen = uvloop.run(serve(args.config))
    print(f"the observer saw {seen} messages", file=sys.stderr)


if __name__ == "__main__":
    main()
