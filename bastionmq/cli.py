"""The ``bastionmq`` command: start, check-config, config, certs, users, acl,
data, ctl, version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
import sqlite3
import sys
import typing
from importlib import resources
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from bastionmq import cert_hints, checks, pki
from bastionmq.acl.builtin_db import check_rule
from bastionmq.auth import builtin_db
from bastionmq.auth.passwords import NAMES as HASH_NAMES
from bastionmq.auth.passwords import PasswordHash
from bastionmq.auth.scram import DEFAULT_ITERATIONS
from bastionmq.app import Broker, make_dev_pki_on_first_start
from bastionmq.config import Config, ConfigError, load_config
from bastionmq.ctl import ctl_group
from bastionmq.ops.logs import configure_logging
from bastionmq.version import __version__
from bastionmq.workers import (Supervisor, SupervisorError, for_worker, ready, watch_supervisor,
                               with_workers, worker_command)
from bastionmq.workers import problems as worker_problems

DEFAULT_CONFIG = Path("etc/bastionmq.conf")
#: The built-in default (package data), used when no file is given or found.
BUILTIN_CONFIG = "builtin.conf"
#: The shipped etc/bastionmq.conf, installed with the package: in the source
#: tree a symbolic link to etc/bastionmq.conf, in a wheel a copy of it.
SHIPPED_CONFIG = "bastionmq.conf"

log = logging.getLogger("bastionmq")
T = typing.TypeVar("T")


BUILT_IN = "the built-in default configuration (loopback only)"


def _package_text(name: str) -> str:
    return resources.files("bastionmq").joinpath(name).read_text(encoding="utf-8")


def _load(config_file: str | None, every_problem: bool = False) -> tuple[Config, str]:
    """The config to use and where it came from: the file given, else
    etc/bastionmq.conf where it runs, else the built-in default (loopback
    listeners, bastionmq/builtin.conf); errors leave through click. With
    ``every_problem``, an invalid file's report also holds the problems of
    the files it names (bastionmq.checks)."""
    if config_file is None and DEFAULT_CONFIG.exists():
        config_file = str(DEFAULT_CONFIG)
    try:
        if config_file is None:
            config = load_config(text=_package_text(BUILTIN_CONFIG))
        else:
            config = load_config(config_file)
    except ConfigError as exc:
        _invalid(checks.problems_of(exc) if every_problem else exc.errors)
    return config, config_file or BUILT_IN


def _invalid(errors: Sequence[tuple[str, str]]) -> typing.NoReturn:
    problems = "\n".join(f"{where}: {message}" for where, message in errors)
    count = f" ({len(errors)} problems)" if len(errors) > 1 else ""
    raise click.ClickException(f"invalid configuration{count}:\n{problems}")


config_option = click.option(
    "-c", "--config", "config_file", type=click.Path(dir_okay=False),
    help=f"HOCON configuration file (default: {DEFAULT_CONFIG} when it exists).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="bastionmq",
                      message="%(prog)s %(version)s")
def main() -> None:
    """bastionmq: an MQTT 3.1 / 3.1.1 / 5.0 broker."""


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"bastionmq {__version__}")


@main.command("check-config")
@config_option
def check_config(config_file: str | None) -> None:
    """Validate a configuration and the files it names, and exit (non-zero
    when anything is wrong, with every problem listed)."""
    # What the loaders warn of while reading rule files reads like the rest.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="warning: %(message)s")
    config, source = _load(config_file, every_problem=True)
    problems = checks.file_problems(config)
    for warning in problems.warnings:
        click.echo(f"warning: {warning}", err=True)
    if problems.errors:
        _invalid(problems.errors)
    enabled = [f"{kind}:{name} {block.bind}" for kind, name, block in config.enabled_listeners()]
    click.echo(f"{source}: configuration is valid; listeners: {', '.join(enabled) or 'none'}")
    for line in problems.tls_lines:
        click.echo(line)
    click.echo(config.node.data.describe())
    click.echo(_persistence_line(config))


@main.group("config")
def config_group() -> None:
    """The configuration files that come with bastionmq."""


@config_group.command("show-default")
@click.option("--builtin", is_flag=True,
              help="Print the built-in default instead (loopback listeners only).")
def config_show_default(builtin: bool) -> None:
    """Print the shipped etc/bastionmq.conf: every key, most at its default,
    with what it does. To start from it:

        mkdir -p etc && bastionmq config show-default > etc/bastionmq.conf

    `bastionmq start` without -c reads etc/bastionmq.conf in the working
    directory, else the built-in default (--builtin prints it).
    """
    click.echo(_package_text(BUILTIN_CONFIG if builtin else SHIPPED_CONFIG), nl=False)
    # On stderr, so that the standard output is the file itself.
    found = "found here" if DEFAULT_CONFIG.exists() else "not found here"
    click.echo(f"# bastionmq start without -c reads {DEFAULT_CONFIG} in the working directory "
               f"({found}), else the built-in default (bastionmq config show-default "
               "--builtin)", err=True)


def _persistence_line(config: Config) -> str:
    durable = config.durable_sessions
    if not durable.enable:
        return "durable sessions: off (sessions and retained messages live in memory only)"
    return (f"durable sessions: {durable.database}, committed every "
            f"{durable.commit_interval * 1000:g} ms or {durable.batch_size} changes, "
            f"synchronous = {durable.synchronous}")


@main.command()
@config_option
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Worker processes, each a node of a cluster on NATS, sharing the "
                   "listeners' ports (node.workers; docs/cluster.md).")
def start(config_file: str | None, workers: int | None) -> None:
    """Start the broker in the foreground; SIGTERM or SIGINT stop it."""
    config, source = _load(config_file, every_problem=True)
    config = with_workers(config, workers)
    if not config.enabled_listeners():
        raise click.ClickException(f"{source}: no listener is enabled; nothing to serve")
    # Every file problem at once, before anything opens (the broker itself
    # would stop at the first).
    with _logging_off():  # what the rule files' loaders warn of, the broker warns of next
        found = checks.file_problems(config).errors
    if config.node.workers > 1:
        found = found + worker_problems(config)
    if found:
        _invalid(found)
    try:
        configure_logging(config.log)
    except OSError as exc:
        raise click.ClickException(f"log.file.path: {exc}") from None
    log.info("bastionmq %s starting with %s", __version__, source)
    file = None if source == BUILT_IN else source
    try:
        if config.node.workers > 1:
            # Made once, here, rather than by racing workers.
            make_dev_pki_on_first_start(config)
            supervisor = Supervisor(config, worker_command(file, config.node.workers))
            try:
                status = _run(supervisor.run())
            except SupervisorError as exc:
                raise click.ClickException(str(exc)) from None
            if status:
                raise click.ClickException("the workers did not start (their errors are above)")
            return
        broker = Broker(config, config_file=file, env=True)
        broker.manages_logging = True
        _run(_serve(broker))
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot open a listener: {exc}") from None


@main.command(hidden=True)
@config_option
@click.option("--workers", type=click.IntRange(1, 256), default=None)
@click.option("--index", type=click.IntRange(1, 256), required=True)
@click.option("--ready-fd", type=int, required=True)
@click.option("--life-fd", type=int, required=True)
def worker(config_file: str | None, workers: int | None, index: int, ready_fd: int,
           life_fd: int) -> None:
    """One worker of ``start --workers N``, run by its supervisor."""
    config, source = _load(config_file)

    def adapt(config: Config) -> Config:
        return for_worker(config, index, workers)
    config = adapt(config)
    configure_logging(config.log)
    try:
        broker = Broker(config, config_file=None if source == BUILT_IN else source, env=True)
        broker.manages_logging = True
        broker.adapt = adapt
        _run(_serve(broker, ready_fd, life_fd))
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot open a listener: {exc}") from None


@contextlib.contextmanager
def _logging_off() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _run(coroutine: typing.Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # not on Linux: the standard loop serves
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def _serve(broker: Broker, ready_fd: int | None = None,
                 life_fd: int | None = None) -> None:
    """Run ``broker`` until SIGTERM or SIGINT (a worker: or until its
    supervisor is gone), reloading on SIGHUP."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    if life_fd is not None:
        watch_supervisor(life_fd, stopping)
    # Before start-up, so that a SIGTERM while it runs stops cleanly after it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        if broker.core is None:
            log.warning("SIGHUP during start-up or shutdown: not reloading")
            return
        task = asyncio.ensure_future(broker.reload_config("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await broker.start()
    if ready_fd is not None:
        ready(ready_fd)
    await stopping.wait()
    core = broker.core
    assert core is not None  # made by start(), dropped by stop()
    log.info("stopping: closing listeners and disconnecting %d clients", len(core.connections))
    await broker.stop()
    log.info("stopped")


# ------------------------------------------------------------------ certs


@main.group()
def certs() -> None:
    """A development PKI: a CA, server and client certificates, a CRL."""


dir_option = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The PKI directory (made by certs init; default: node.data_dir/certs of the "
         "configuration, where the broker makes it on first start).")
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


def _pki(config_file: str | None, directory: Path | None) -> tuple[Config, str, Path]:
    """The configuration (for the hints: its listeners' hosts and ports) and
    the PKI directory: the one given, else the configuration's
    node.data_dir/certs, the directory the broker's first start uses."""
    config, source = _load(config_file)
    return config, source, directory if directory is not None else Path(config.node.pki_dir)


def _next_args(config: Config, config_file: str | None, directory: Path) -> str:
    """The options the next certs command needs to find the same directory."""
    args = "" if config_file is None else f" -c {shlex.quote(config_file)}"
    if directory != Path(config.node.pki_dir):
        args += f" --dir {shlex.quote(str(directory))}"
    return args


@certs.command("init")
@click.argument("directory", required=False, default=None,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", "hosts", multiple=True, metavar="H",
              help="A further server name or IP address (repeatable); "
                   "localhost, 127.0.0.1 and ::1 are always included.")
@rsa_option
@days_option
@click.option("--force", is_flag=True, help="Replace an existing CA.")
@config_option
def certs_init(directory: Path | None, hosts: tuple[str, ...], rsa: str | None, days: int,
               force: bool, config_file: str | None) -> None:
    """Create a CA, a server certificate and an empty CRL in DIRECTORY
    (default: node.data_dir/certs)."""
    config, _, directory = _pki(config_file, directory)
    with _pki_errors():
        server = pki.init_pki(directory, hosts, _key_type(rsa), days, force)
    names = ", ".join(["localhost", "127.0.0.1", "::1", *hosts])
    click.echo(f"wrote {directory / pki.CA_CERT} (CA certificate)")
    click.echo(f"wrote {directory / pki.CA_KEY} (CA private key: keep it to yourself)")
    click.echo(f"wrote {server.cert} (server certificate for {names})")
    click.echo(f"wrote {server.key} (server private key)")
    click.echo(f"wrote {directory / pki.CRL} (certificate revocation list, empty)")
    if directory == Path(config.node.pki_dir):
        click.echo("\nthe TLS listeners whose ssl_options leave cacertfile, certfile and "
                   "keyfile unset use these files.")
    else:
        click.echo("\nssl_options for a listener:")
        click.echo(f'  cacertfile = "{directory / pki.CA_CERT}"')
        click.echo(f'  certfile   = "{server.cert}"')
        click.echo(f'  keyfile    = "{server.key}"')
    click.echo(f"\nnext: bastionmq certs client NAME{_next_args(config, config_file, directory)}")


force_option = click.option("--force", is_flag=True,
                            help="Replace a certificate and key of that name.")


@certs.command("client")
@click.argument("name")
@dir_option
@rsa_option
@days_option
@force_option
@config_option
def certs_client(name: str, directory: Path | None, rsa: str | None, days: int, force: bool,
                 config_file: str | None) -> None:
    """Issue a client certificate with CN=NAME."""
    config, source, directory = _pki(config_file, directory)
    with _pki_errors():
        files = pki.issue_client(directory, name, _key_type(rsa), days, replace=force)
    click.echo(f"wrote {files.cert} (client certificate, CN={name})")
    click.echo(f"wrote {files.key} (client private key)")
    click.echo("")
    for line in cert_hints.client_hints(config, source, directory / pki.CA_CERT, files.cert,
                                        files.key):
        click.echo(line)


@certs.command("server")
@click.argument("name")
@click.option("--host", "hosts", multiple=True, required=True, metavar="H",
              help="A server name or IP address (repeatable); the first is the CN.")
@dir_option
@rsa_option
@days_option
@force_option
@config_option
def certs_server(name: str, hosts: tuple[str, ...], directory: Path | None, rsa: str | None,
                 days: int, force: bool, config_file: str | None) -> None:
    """Issue a further server certificate, for the given hosts only."""
    config, source, directory = _pki(config_file, directory)
    with _pki_errors():
        files = pki.issue_server(directory, name, hosts, _key_type(rsa), days, replace=force)
    click.echo(f"wrote {files.cert} (server certificate for {', '.join(hosts)})")
    click.echo(f"wrote {files.key} (server private key)")
    click.echo("")
    for line in cert_hints.server_hints(config, source, directory / pki.CA_CERT, files.cert,
                                        files.key, hosts):
        click.echo(line)


@certs.command("revoke")
@click.argument("cert_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@dir_option
@click.option("--reason", default="unspecified", show_default=True,
              help="RFC 5280 reason, such as keyCompromise or superseded.")
@config_option
def certs_revoke(cert_file: Path, directory: Path | None, reason: str,
                 config_file: str | None) -> None:
    """Put the certificate in FILE on the CA's revocation list, and say which
    TLS listeners of the configuration check that list."""
    config, source, directory = _pki(config_file, directory)
    with _pki_errors():
        crl = pki.revoke(directory, cert_file, reason)
    click.echo(f"revoked {cert_file}; wrote {crl}")
    click.echo("")
    for line in cert_hints.revoke_hints(config, source, crl, directory / pki.CA_CERT):
        click.echo(line)


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


# ------------------------------------------------------------------ users and acl
# The built-in database (node.data_dir/auth.sqlite3): users for
# ``backend = built_in_database`` and ``mechanism = scram``, and rules for the
# built_in_database authorization source. The file is SQLite in WAL mode, so
# these commands work while the broker runs.

user_type_option = click.option(
    "--clientid/--username", "clientid", default=None,
    help="The user is a client id / a username (default: the user_id_type of the "
         "configured built_in_database authenticator, else username).")
password_option = click.option(
    "--password", metavar="P",
    help="The password (visible to other local users and kept in shell history: "
         "prefer the prompt, which does not echo).")
scram_option = click.option(
    "--scram", is_flag=True,
    help="SCRAM-SHA-256 credentials (MQTT 5 enhanced authentication) instead.")


def _database_action(config: Config, action: Any) -> Any:
    """Run ``await action(db)`` on the configured database, errors as one line."""

    async def run() -> Any:
        db = await builtin_db.AuthDatabase.open(config.node.auth_database, rule_check=check_rule)
        try:
            return await action(db)
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except (builtin_db.AuthDatabaseError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.Error as exc:  # busy past the timeout, disk full...
        raise click.ClickException(f"{config.node.auth_database}: {exc}") from None


def _user_id_type(config: Config, clientid: bool | None) -> str:
    if clientid is not None:
        return "clientid" if clientid else "username"
    configured = config.builtin_authenticator("password_based")
    return configured.user_id_type if configured is not None else "username"


def _hashing(config: Config, name: str | None) -> PasswordHash:
    """The configured password_hash_algorithm, or ``name`` (with the configured
    parameters when the configuration names the same algorithm)."""
    configured = config.builtin_authenticator("password_based")
    algorithm = configured.password_hash_algorithm if configured is not None else PasswordHash()
    if name is None or name == algorithm.name:
        return algorithm
    return PasswordHash(name)


def _scram_iterations(config: Config) -> int:
    configured = config.builtin_authenticator("scram")
    return configured.iteration_count if configured is not None else DEFAULT_ITERATIONS


def _new_password(given: str | None) -> str:
    if given is None:
        given = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not given:
        raise click.ClickException("the password must not be empty")
    return given


def _no_scram_clientid(scram: bool, clientid: bool | None) -> None:
    if scram and clientid:
        raise click.UsageError("SCRAM credentials belong to a username, not a --clientid")


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in (headers, *rows)) for column in range(len(headers))]
    for row in (headers, *rows):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@main.group()
def users() -> None:
    """Users of the built-in database (authentication backend built_in_database)."""


@users.command("add")
@click.argument("user")
@password_option
@user_type_option
@click.option("--superuser", is_flag=True, help="Skip authorization checks for this user.")
@click.option("--algorithm", type=click.Choice(HASH_NAMES),
              help="Hash the password with this (default: the configured "
                   "password_hash_algorithm, else sha256 with a prefix salt).")
@scram_option
@config_option
def users_add(user: str, password: str | None, clientid: bool | None, superuser: bool,
              algorithm: str | None, scram: bool, config_file: str | None) -> None:
    """Add USER with a password (prompted for when not given)."""
    config, _ = _load(config_file)
    _no_scram_clientid(scram, clientid)
    secret = _new_password(password)
    where = config.node.auth_database
    role = ", superuser" if superuser else ""
    if scram:
        iterations = _scram_iterations(config)
        _database_action(config, lambda db: db.add_scram_user(user, secret, iterations, superuser))
        click.echo(f"added SCRAM user {user!r} to {where} ({iterations} iterations{role})")
        return
    user_id_type = _user_id_type(config, clientid)
    hashing = _hashing(config, algorithm)
    _database_action(config, lambda db: db.add_user(user, secret, hashing, user_id_type, superuser))
    click.echo(f"added {user_id_type} {user!r} to {where} ({hashing.name}{role})")


@users.command("passwd")
@click.argument("user")
@password_option
@user_type_option
@click.option("--algorithm", type=click.Choice(HASH_NAMES),
              help="Hash the new password with this (default: as the old one was).")
@scram_option
@config_option
def users_passwd(user: str, password: str | None, clientid: bool | None, algorithm: str | None,
                 scram: bool, config_file: str | None) -> None:
    """Give USER a new password (prompted for when not given)."""
    config, _ = _load(config_file)
    _no_scram_clientid(scram, clientid)
    secret = _new_password(password)
    if scram:
        _database_action(config, lambda db: db.set_scram_password(user, secret))
        click.echo(f"changed the SCRAM password of {user!r}")
        return
    user_id_type = _user_id_type(config, clientid)
    hashing = None if algorithm is None else _hashing(config, algorithm)
    record = _database_action(
        config, lambda db: db.set_password(user, secret, user_id_type, hashing))
    click.echo(f"changed the password of {user_id_type} {user!r} ({record.algorithm.name})")


@users.command("del")
@click.argument("user")
@user_type_option
@scram_option
@config_option
def users_del(user: str, clientid: bool | None, scram: bool, config_file: str | None) -> None:
    """Delete USER."""
    config, _ = _load(config_file)
    _no_scram_clientid(scram, clientid)
    if scram:
        _database_action(config, lambda db: db.delete_scram_user(user))
        click.echo(f"deleted SCRAM user {user!r}")
        return
    user_id_type = _user_id_type(config, clientid)
    _database_action(config, lambda db: db.delete_user(user, user_id_type))
    click.echo(f"deleted {user_id_type} {user!r}")


@users.command("list")
@config_option
def users_list(config_file: str | None) -> None:
    """List the users (password and SCRAM), without their secrets."""
    config, _ = _load(config_file)

    async def everyone(db: builtin_db.AuthDatabase) -> tuple[list, list]:
        return await db.list_users(), await db.list_scram_users()

    passwords, scram = _database_action(config, everyone)
    rows = [(record.user_id_type, record.user_id, record.algorithm.name,
             "yes" if record.is_superuser else "") for record in passwords]
    rows += [("scram", username, f"scram-sha-256 ({credentials.iterations})",
              "yes" if credentials.superuser else "") for username, credentials in scram]
    if not rows:
        click.echo(f"no users in {config.node.auth_database}")
        return
    _table(("TYPE", "USER", "ALGORITHM", "SUPERUSER"), rows)


@users.command("import")
@click.argument("user_file", metavar="FILE", type=click.Path(dir_okay=False, exists=True))
@user_type_option
@click.option("--algorithm", type=click.Choice(HASH_NAMES),
              help="The algorithm the file's hashes were made with, or to hash its plain "
                   "passwords with (default: the configured password_hash_algorithm).")
@click.option("--type", "password_type", type=click.Choice(["hash", "plain"]),
              help="EMQX's import type: password_hash and salt fields (hash) or password "
                   "fields (plain); default: whichever each user has.")
@config_option
def users_import(user_file: str, clientid: bool | None, algorithm: str | None,
                 password_type: str | None, config_file: str | None) -> None:
    """Import users from an EMQX user file (.csv or .json); users that exist are replaced."""
    config, _ = _load(config_file)
    user_id_type = _user_id_type(config, clientid)
    hashing = _hashing(config, algorithm)
    result = _database_action(config, lambda db: db.import_users(
        user_file, hashing, user_id_type, password_type))
    click.echo(f"imported {result.total} {user_id_type}s from {user_file} ({hashing.name}): "
               f"{result.added} added, {result.replaced} replaced, {result.unchanged} unchanged")


@main.group()
def acl() -> None:
    """Rules of the built-in database (authorization source built_in_database).

    A client's rules are tried in order: its client id's, its username's,
    then those for all clients; the first that matches decides. A running
    broker reads the rules when it starts and when it gets SIGHUP.
    """


def _who(username: str | None, clientid: str | None, everyone: bool,
         required: bool) -> tuple[str | None, str | None]:
    given = [(kind, value) for kind, value in
             (("username", username), ("clientid", clientid),
              ("all", "all" if everyone else None))
             if value is not None]
    if len(given) > 1 or (required and not given):
        raise click.UsageError("give one of --username U, --clientid C or --all")
    if not given:
        return None, None
    kind, value = given[0]
    return kind, None if kind == "all" else value


def _qos_levels(values: tuple[str, ...]) -> list[int] | None:
    if not values:
        return None
    levels = []
    for value in values:
        for part in value.split(","):
            if part.strip() not in ("0", "1", "2"):
                raise click.BadParameter(f"{part.strip()!r} is not 0, 1 or 2",
                                         param_hint="--qos")
            levels.append(int(part))
    return levels


@acl.command("add")
@click.argument("permission", type=click.Choice(builtin_db.PERMISSIONS))
@click.argument("action", type=click.Choice(builtin_db.ACTIONS))
@click.argument("topic")
@click.option("--username", metavar="U", help="The rule is for this username.")
@click.option("--clientid", metavar="C", help="The rule is for this client id.")
@click.option("--all", "everyone", is_flag=True, help="The rule is for every client.")
@click.option("--qos", multiple=True, metavar="LEVELS",
              help="Only for these QoS levels, like 0,1 (repeatable; default: any).")
@click.option("--retain", type=click.Choice(["true", "false", "all"]), default="all",
              show_default=True, help="Only for publishes with this retain flag.")
@click.option("--position", type=click.IntRange(min=1), metavar="N",
              help="Put the rule N-th in its owner's list (default: last).")
@config_option
def acl_add(permission: str, action: str, topic: str, username: str | None,
            clientid: str | None, everyone: bool, qos: tuple[str, ...], retain: str,
            position: int | None, config_file: str | None) -> None:
    """Add a rule: PERMISSION (allow, deny) ACTION (publish, subscribe, all) on TOPIC.

    TOPIC is a topic filter; it may hold ${username}, ${clientid} and
    ${cert_common_name}; "eq t/#" matches exactly the filter t/#. Quote it
    for the shell: 'devices/${clientid}/#'.
    """
    config, _ = _load(config_file)
    who_type, who = _who(username, clientid, everyone, required=True)
    levels = _qos_levels(qos)
    flag = None if retain == "all" else retain == "true"
    rule = _database_action(config, lambda db: db.add_rule(
        who_type, who, permission, action, topic, qos=levels, retain=flag, position=position))
    click.echo(f"added rule {rule.id} (place {rule.position}): {rule.describe()}")


@acl.command("del")
@click.argument("rule_id", metavar="ID", type=int)
@config_option
def acl_del(rule_id: int, config_file: str | None) -> None:
    """Delete the rule with this ID (see acl list)."""
    config, _ = _load(config_file)
    rule = _database_action(config, lambda db: db.delete_rule(rule_id))
    click.echo(f"deleted rule {rule.id}: {rule.describe()}")


@acl.command("list")
@click.option("--username", metavar="U", help="Only this username's rules.")
@click.option("--clientid", metavar="C", help="Only this client id's rules.")
@click.option("--all", "everyone", is_flag=True, help="Only the rules for every client.")
@config_option
def acl_list(username: str | None, clientid: str | None, everyone: bool,
             config_file: str | None) -> None:
    """List the rules in the order they are tried."""
    config, _ = _load(config_file)
    who_type, who = _who(username, clientid, everyone, required=False)
    rules = _database_action(config, lambda db: db.list_rules(who_type, who))
    if not rules:
        click.echo(f"no rules in {config.node.auth_database}")
        return
    rows = [(str(rule.id), "all" if rule.who is None else f"{rule.who_type} {rule.who}",
             str(rule.position), rule.permission, rule.action, rule.topic,
             "any" if rule.qos is None else ",".join(map(str, rule.qos)),
             "any" if rule.retain is None else str(rule.retain).lower())
            for rule in rules]
    _table(("ID", "WHO", "PLACE", "PERMISSION", "ACTION", "TOPIC", "QOS", "RETAIN"), rows)


# ------------------------------------------------------------------ data
# The durable store (durable_sessions.data_dir/sessions.sqlite3).


def _on_store(action: Any, config_file: str | None, path: str | None) -> tuple[str, Any]:
    """(path, what ``action(path)`` returns) for the store the options name."""
    from bastionmq.broker.store import maintenance
    if path is None:
        config, _ = _load(config_file)
        path = config.durable_sessions.database
    try:
        return path, action(maintenance, path)
    except maintenance.StoreError as exc:
        raise click.ClickException(str(exc)) from None


def _bytes(size: float) -> str:  # a byte count; float: it is divided below
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


store_file_option = click.option(
    "--file", "path", type=click.Path(dir_okay=False), default=None,
    help="The store's database file (default: durable_sessions.data_dir/sessions.sqlite3 "
         "of the configuration).")


@main.group()
def data() -> None:
    """Check or compact the durable store (durable_sessions)."""


@data.command("check")
@config_option
@store_file_option
def data_check(config_file: str | None, path: str | None) -> None:
    """Read the whole store: what it holds and whether anything is wrong
    (exit status 1 when something is). Safe while the broker runs."""
    path, report = _on_store(lambda maintenance, path: maintenance.check(path), config_file, path)
    click.echo(f"{path}: schema {report.schema_version}, {_bytes(report.size)} "
               f"(write-ahead log {_bytes(report.wal_size)})")
    rows = report.rows
    if rows:
        click.echo(
            f"  {rows['sessions']} sessions ({report.expired_sessions} expired, removed at the "
            f"next start), {rows['subscriptions']} subscriptions, {rows['queue']} queued and "
            f"{rows['inflight']} in-flight messages, {rows['messages']} message bodies, "
            f"{rows['awaiting_rel']} QoS 2 messages awaiting release, "
            f"{rows['retained']} retained messages, {rows['wills']} wills")
    if report.unreferenced_messages:
        click.echo(f"  {report.unreferenced_messages} message bodies nothing points at "
                   "(harmless: the next start or `bastionmq data compact` removes them)")
    if report.ok:
        click.echo("  no problems found")
        return
    for problem in report.problems:
        click.echo(f"  problem: {problem}", err=True)
    raise click.ClickException(
        f"{path} has {len(report.problems)} problems; `bastionmq data compact` removes rows "
        "that point at nothing; damage SQLite reports needs the file restored from a backup")


@data.command("compact")
@config_option
@store_file_option
def data_compact(config_file: str | None, path: str | None) -> None:
    """Remove rows that point at nothing and rewrite the store to its
    smallest size. The broker must be stopped."""
    path, report = _on_store(lambda maintenance, path: maintenance.compact(path), config_file,
                             path)
    click.echo(f"{path}: {_bytes(report.size_before)} -> {_bytes(report.size_after)}; removed "
               f"{report.dangling_removed} rows that pointed at nothing and "
               f"{report.unreferenced_removed} unreferenced message bodies")


main.add_command(ctl_group(_load, config_option, _database_action), "ctl")
