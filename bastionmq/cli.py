"""The ``bastionmq`` command: start, check-config, certs, version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import click

import bastionmq
from bastionmq import pki, tls_policy
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
    tls = tls_policy.report(config)
    for warning in tls.warnings:
        click.echo(f"warning: {warning}", err=True)
    if tls.errors:
        problems = "\n".join(f"{where}: {message}" for where, message in tls.errors)
        raise click.ClickException(f"invalid configuration:\n{problems}")
    enabled = [f"{kind}:{name} {block.bind}" for kind, name, block in config.enabled_listeners()]
    click.echo(f"{source}: configuration is valid; listeners: {', '.join(enabled) or 'none'}")
    for line in tls.lines:
        click.echo(line)


@main.command()
@config_option
def start(config_file: str | None) -> None:
    """Start the broker in the foreground; SIGTERM or SIGINT stop it."""
    config, source = _load(config_file)
    if not config.enabled_listeners():
        raise click.ClickException(f"{source}: no listener is enabled; nothing to serve")
    logging.basicConfig(
        level=config.log.level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("bastionmq %s starting with %s", bastionmq.__version__, source)
    try:
        _run(_serve(Broker(config)))
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from None
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
    loop.add_signal_handler(signal.SIGHUP, broker.reload_tls, "SIGHUP")
    await stopping.wait()
    log.info("stopping: closing listeners and disconnecting %d clients",
             len(broker.core.connections))
    await broker.stop()
    log.info("stopped")


# ------------------------------------------------------------------ certs


@main.group()
def certs() -> None:
    """A development PKI: a CA, server and client certificates, a CRL."""


dir_option = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
    default=pki.DEFAULT_DIR, show_default=True, help="The PKI directory (made by certs init).")
rsa_option = click.option(
    "--rsa", type=click.Choice(["2048", "3072", "4096"]),
    help="An RSA key of this size instead of ECDSA P-256.")
days_option = click.option(
    "--days", type=click.IntRange(min=1), default=825, show_default=True,
    help="Validity of the certificate in days.")


_KEY_TYPES: dict[str | None, pki.KeyType] = {
    None: "ec", "2048": "rsa2048", "3072": "rsa3072", "4096": "rsa4096"}


def _key_type(rsa: str | None) -> pki.KeyType:
    return _KEY_TYPES[rsa]


def _dir_args(directory: Path) -> str:
    return "" if directory == pki.DEFAULT_DIR else f" --dir {shlex.quote(str(directory))}"


@certs.command("init")
@click.argument("directory", required=False, default=pki.DEFAULT_DIR,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", "hosts", multiple=True, metavar="H",
              help="A further server name or IP address (repeatable); "
                   "localhost, 127.0.0.1 and ::1 are always included.")
@rsa_option
@days_option
@click.option("--force", is_flag=True, help="Replace an existing CA.")
def certs_init(directory: Path, hosts: tuple[str, ...], rsa: str | None, days: int,
               force: bool) -> None:
    """Create a CA, a server certificate and an empty CRL in DIRECTORY."""
    with _pki_errors():
        server = pki.init_pki(directory, hosts, _key_type(rsa), days, force)
    names = ", ".join(["localhost", "127.0.0.1", "::1", *hosts])
    click.echo(f"wrote {directory / pki.CA_CERT} (CA certificate)")
    click.echo(f"wrote {directory / pki.CA_KEY} (CA private key: keep it to yourself)")
    click.echo(f"wrote {server.cert} (server certificate for {names})")
    click.echo(f"wrote {server.key} (server private key)")
    click.echo(f"wrote {directory / pki.CRL} (certificate revocation list, empty)")
    click.echo("\nssl_options for a listener:")
    click.echo(f'  cacertfile = "{directory / pki.CA_CERT}"')
    click.echo(f'  certfile   = "{server.cert}"')
    click.echo(f'  keyfile    = "{server.key}"')
    click.echo(f"\nnext: bastionmq certs client NAME{_dir_args(directory)}")


@certs.command("client")
@click.argument("name")
@dir_option
@rsa_option
@days_option
def certs_client(name: str, directory: Path, rsa: str | None, days: int) -> None:
    """Issue a client certificate with CN=NAME."""
    with _pki_errors():
        files = pki.issue_client(directory, name, _key_type(rsa), days)
    click.echo(f"wrote {files.cert} (client certificate, CN={name})")
    click.echo(f"wrote {files.key} (client private key)")
    command = ["mosquitto_pub", "-h", "localhost", "-p", "8883",
               "--cafile", str(directory / pki.CA_CERT), "--cert", str(files.cert),
               "--key", str(files.key), "-t", "test", "-m", "hello"]
    click.echo(f"\ntry it:\n  {shlex.join(command)}")


@certs.command("server")
@click.argument("name")
@click.option("--host", "hosts", multiple=True, required=True, metavar="H",
              help="A server name or IP address (repeatable); the first is the CN.")
@dir_option
@rsa_option
@days_option
def certs_server(name: str, hosts: tuple[str, ...], directory: Path, rsa: str | None,
                 days: int) -> None:
    """Issue a further server certificate, for the given hosts only."""
    with _pki_errors():
        files = pki.issue_server(directory, name, hosts, _key_type(rsa), days)
    click.echo(f"wrote {files.cert} (server certificate for {', '.join(hosts)})")
    click.echo(f"wrote {files.key} (server private key)")


@certs.command("revoke")
@click.argument("cert_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@dir_option
@click.option("--reason", default="unspecified", show_default=True,
              help="RFC 5280 reason, such as keyCompromise or superseded.")
def certs_revoke(cert_file: Path, directory: Path, reason: str) -> None:
    """Put the certificate in FILE on the CA's revocation list."""
    with _pki_errors():
        crl = pki.revoke(directory, cert_file, reason)
    click.echo(f"revoked {cert_file}; wrote {crl}")


@certs.command("show")
@click.argument("cert_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
def certs_show(cert_file: Path) -> None:
    """Describe the certificate(s) in FILE."""
    with _pki_errors():
        click.echo(pki.describe(cert_file))


@contextlib.contextmanager
def _pki_errors() -> Iterator[None]:
    try:
        yield
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # a directory that cannot be created or written
        raise click.ClickException(f"cannot write {exc.filename}: {exc.strerror or exc}") from None
