"""Every problem of a configuration in one pass: what the schema refuses and
what the files it names hold (certificates, keys, CAs, CRLs, PSK, password
and ACL files), each with its key path. check-config reports them all; so
does start-up, before any port opens."""

from __future__ import annotations

import attrs

from bastionmq import tls_policy
from bastionmq.app import check_rule_files
from bastionmq.config import Config, ConfigError

__all__ = ["Problems", "file_problems", "problems_of"]

Problem = tuple[str, str]


@attrs.define(slots=True)
class Problems:
    """What check-config says besides the listeners' lines."""

    errors: list[Problem] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)
    #: The TLS policy lines of every TLS listener (check-config prints them).
    tls_lines: list[str] = attrs.field(factory=list)


def file_problems(config: Config) -> Problems:
    """The problems of the files ``config`` names, each file on its own."""
    tls = tls_policy.report(config)
    errors = list(tls.errors)
    for error in _rule_file_errors(config):
        if error not in errors:
            errors.append(error)
    return Problems(errors, tls.warnings, tls.lines)


def problems_of(exc: ConfigError) -> list[Problem]:
    """The schema's errors, then those of the files the rest of the
    configuration names; a file found under a key in error is not checked
    (what it would say is about the default standing in for that key)."""
    errors = list(exc.errors)
    if exc.partial is None:
        return errors
    for where, message in file_problems(exc.partial).errors:
        if any(where == key or where.startswith(key + ".") for key in exc.unchecked):
            continue
        if (where, message) not in errors:
            errors.append((where, message))
    return errors


def _rule_file_errors(config: Config) -> list[Problem]:
    """check_rule_files stops at the first entry of a chain that does not
    load; asking it about one entry at a time (the others disabled, so
    indexes and key paths stay) finds every one."""
    none_authz = _only_source(config, None)
    errors: list[Problem] = []
    for index in range(len(config.authorization.sources)):
        errors += check_rule_files(_only_authenticator(_only_source(config, index), None))
    longest = max([len(config.authentication)] + [
        len(block.authentication or ()) for _, _, block in config.enabled_listeners()])
    for index in range(longest):
        errors += check_rule_files(_only_authenticator(none_authz, index))
    return list(dict.fromkeys(errors))


def _only_source(config: Config, keep: int | None) -> Config:
    authz = config.authorization
    sources = tuple(source if index == keep else attrs.evolve(source, enable=False)
                    for index, source in enumerate(authz.sources))
    return attrs.evolve(config, authorization=attrs.evolve(authz, sources=sources))


def _only_authenticator(config: Config, keep: int | None) -> Config:
    def chain(entries: tuple) -> tuple:
        return tuple(entry if index == keep else attrs.evolve(entry, enable=False)
                     for index, entry in enumerate(entries))

    listeners = config.listeners
    blocks = {kind: {name: block if block.authentication is None
                     else attrs.evolve(block, authentication=chain(block.authentication))
                     for name, block in getattr(listeners, kind).items()}
              for kind in ("tcp", "ssl", "ws", "wss")}
    return attrs.evolve(config, authentication=chain(config.authentication),
                        listeners=attrs.evolve(listeners, **blocks))
