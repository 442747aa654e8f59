"""Reloading the configuration file: which changed keys a running broker
takes at once, and which wait for a restart.

Live: log settings, the ``mqtt`` options (for connections made from now
on), the authentication and authorization chains and their settings, a
listener's TLS files and policy, its max_connections and its own chain.
Restart: whatever opens or closes a socket or a file the process holds
(binds, listeners added, removed, enabled or disabled, TCP and WebSocket
options, node, durable_sessions, http_api, cluster), and the rest listed in
RESTART_SECTIONS. A planned reload changes nothing by itself: it says what
would apply (``effective``, the running config with the live changes) and
what is left as it was.
"""

from __future__ import annotations

from typing import Any

import attrs

from bastionmq.config import Config

#: Top-level sections that need a restart as a whole.
RESTART_SECTIONS = ("node", "durable_sessions", "http_api", "sys_topics",
                    "psk_authentication", "crl_cache", "cluster")
#: Keys of a listener block that need a restart.
RESTART_LISTENER_KEYS = ("enable", "bind", "tcp_options", "websocket", "proxy_protocol",
                         "proxy_protocol_timeout", "proxy_protocol_trusted")


@attrs.define(slots=True)
class ReloadReport:
    """What a reload did, by key path."""

    #: Keys that changed and now apply.
    applied: list[str] = attrs.field(factory=list)
    #: Keys that changed and keep their running value until a restart.
    restart_required: list[str] = attrs.field(factory=list)
    #: Why nothing was applied (an invalid file), or what failed to apply.
    errors: list[str] = attrs.field(factory=list)

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def flatten(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a config, by its key path (``listeners.ssl.default.bind``)."""
    if attrs.has(type(value)):
        value = {field.name: getattr(value, field.name) for field in attrs.fields(type(value))}
    if isinstance(value, dict):  # an empty one has no leaves: its keys' removal shows
        found: dict[str, Any] = {}
        for key, item in value.items():
            found.update(flatten(item, f"{path}.{key}" if path else str(key)))
        return found
    if isinstance(value, tuple) and value and attrs.has(type(value[0])):
        found = {}
        for index, item in enumerate(value):
            found.update(flatten(item, f"{path}.{index}"))
        found[f"{path}.#"] = len(value)  # a list that only got shorter still differs
        return found
    return {path: value}


def changed_keys(old: Any, new: Any) -> list[str]:
    before, after = flatten(old), flatten(new)
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def _listener_blocks(config: Config) -> dict[tuple[str, str], Any]:
    listeners = config.listeners
    return {(kind, name): block for kind in ("tcp", "ssl", "ws", "wss")
            for name, block in getattr(listeners, kind).items()}


def plan_reload(running: Config, new: Config) -> tuple[Config, ReloadReport]:
    """The config to run with after reloading ``new``, and the report."""
    report = ReloadReport()
    restart_prefixes = [f"{section}." for section in RESTART_SECTIONS]
    old_blocks, new_blocks = _listener_blocks(running), _listener_blocks(new)
    effective_blocks: dict[tuple[str, str], Any] = {}
    for key, old_block in old_blocks.items():
        kind, name = key
        block = new_blocks.get(key)
        if block is None:
            restart_prefixes.append(f"listeners.{kind}.{name}.")
            effective_blocks[key] = old_block
            continue
        kept = {field: getattr(old_block, field) for field in RESTART_LISTENER_KEYS
                if hasattr(old_block, field)}
        restart_prefixes += [f"listeners.{kind}.{name}.{field}" for field in kept]
        effective_blocks[key] = attrs.evolve(block, **kept)
    restart_prefixes += [f"listeners.{kind}.{name}." for kind, name in new_blocks.keys()
                         - old_blocks.keys()]
    listeners = attrs.evolve(running.listeners, **{
        kind: {name: block for (k, name), block in effective_blocks.items() if k == kind}
        for kind in ("tcp", "ssl", "ws", "wss")})
    effective = attrs.evolve(new, listeners=listeners, **{
        section: getattr(running, section) for section in RESTART_SECTIONS})
    for path in changed_keys(running, new):
        if any(path == prefix or path.startswith(prefix if prefix.endswith(".") else prefix + ".")
               for prefix in restart_prefixes):
            report.restart_required.append(path)
        else:
            report.applied.append(path)
    if running.authorization.active != new.authorization.active:
        # Turning authorization on or off changes what every connection
        # carries; a restart does that cleanly.
        effective = attrs.evolve(effective, authorization=running.authorization)
        moved = [key for key in report.applied if key.startswith("authorization.")]
        report.applied = [key for key in report.applied if key not in moved]
        report.restart_required += moved
    return effective, report
