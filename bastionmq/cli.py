"""The ``bastionmq`` command: start, check-config, version."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

import bastionmq
from bastionmq.app import Broker
from bastionmq.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path("etc/bastionmq.conf")

log = logging.getLogger("bastionmq")


def _load(config_file: str | None) -> tuple[Config, str]:
    """The config to use and where it came from; errors leave through click."""
    if config_file is None and DEFAULT_CONFIG.exists():
        config_file = str(DEFAULT_CONFIG)
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from None
    return config, config_file or "built-in defaults"


config_option = click.option(
    "-c", "--config", "config_file", type=click.Path(dir_okay=False),
    help=f"HOCON configuration file (default: {DEFAULT_CONFIG} when it exists).")


@click.group()
def main() -> None:
    """bastionmq: an MQTT 3.1 / 3.1.1 / 5.0 broker."""


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"bastionmq {bastionmq.__version__}")


@main.command("check-config")
@config_option
def check_config(config_file: str | None) -> None:
    """Validate a configuration file and exit (non-zero when it is invalid)."""
    config, source = _load(config_file)
    enabled = [f"tcp:{name} {tcp.bind}" for name, tcp in config.listeners.tcp.items() if tcp.enable]
    click.echo(f"{source}: configuration is valid; listeners: {', '.join(enabled) or 'none'}")


@main.command()
@config_option
def start(config_file: str | None) -> None:
    """Start the broker in the foreground; SIGTERM or SIGINT stop it."""
    config, source = _load(config_file)
    if not any(tcp.enable for tcp in config.listeners.tcp.values()):
        raise click.ClickException(f"{source}: no listener is enabled; nothing to serve")
    logging.basicConfig(
        level=config.log.level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("bastionmq %s starting with %s", bastionmq.__version__, source)
    try:
        _run(_serve(Broker(config)))
    except OSError as exc:
        raise click.ClickException(f"cannot open a listener: {exc}") from None


def _run(coroutine) -> None:
    try:
        import uvloop
    except ImportError:  # not on Linux: the standard loop serves
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


async def _serve(broker: Broker) -> None:
    await broker.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("stopping: closing listeners and disconnecting %d clients",
             len(broker.core.connections))
    await broker.stop()
    log.info("stopped")
