"""The configuration file: HOCON (pyhocon) structured onto attrs classes.

Key names mirror EMQX 5 so that an operator's knowledge carries over. Each
block is structured straight onto the settings class its package declares,
next to the code that uses it: ``mqtt { ... }`` onto
:class:`bastionmq.broker.settings.MqttSettings`, ``ssl_options``,
``tcp_options``, ``websocket``, ``crl_cache`` and ``psk_authentication`` onto
``listeners/settings.py``, ``authentication`` and its ban onto
``auth/settings.py``, ``authorization`` onto ``acl/settings.py``. This module
composes them, reads HOCON and applies environment overrides; sizes and
durations in EMQX notation are read by ``bastionmq.units``.

Every problem in a file is reported in one pass, each with its key path, what
was given and what is allowed: an operator fixes the whole file at once
instead of restarting once per typo. Structuring goes through cattrs with
unknown keys forbidden and detailed validation, which collects the errors of
all attributes instead of stopping at the first; each field's attrs validator
is run inside its own structuring hook so that range errors are collected the
same way and carry their path.

Environment variables override keys: ``BASTIONMQ_MQTT__MAX_INFLIGHT=64`` sets
``mqtt.max_inflight``. Segments are joined by double underscores because key
names themselves contain single ones.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import attrs
import cattrs
from attrs import validators as v
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override
from pyhocon import ConfigFactory
from pyhocon.config_tree import ConfigTree, NoneValue
from pyhocon.exceptions import ConfigException
from pyparsing import ParseBaseException

from bastionmq.acl.settings import AclSourceConfig, AuthorizationConfig, AuthzCacheConfig
from bastionmq.auth.settings import AuthenticatorConfig, AuthnBanConfig
from bastionmq.broker.settings import INFINITY, MqttSettings, peer_cert_source
from bastionmq.cluster.settings import ClusterConfig
from bastionmq.data_dir import DataDir, choose
from bastionmq.listeners.settings import (
    ALL_INTERFACES, ANY_ADDRESS, DEV_PKI_FILE_KEYS, Bind, CrlCacheConfig, OcspConfig, PskConfig,
    SniCertificate, SslOptions, TcpOptions, WebSocketOptions, dev_pki_files, proxy_sources,
)
from bastionmq.ops.logs import LogConfig, LogFileConfig
from bastionmq.ops.settings import HttpApiConfig
from bastionmq.units import format_duration, format_size, parse_duration, parse_size, show_value

__all__ = [
    "Bind",
    "Config",
    "ConfigError",
    "AclSourceConfig",
    "AuthenticatorConfig",
    "AuthnBanConfig",
    "AuthorizationConfig",
    "AuthzCacheConfig",
    "CrlCacheConfig",
    "DurableSessionsConfig",
    "OcspConfig",
    "PskConfig",
    "SniCertificate",
    "ENV_PREFIX",
    "ListenersConfig",
    "NodeConfig",
    "LogConfig",
    "LogFileConfig",
    "TcpListenerConfig",
    "TcpOptions",
    "SslListenerConfig",
    "SslOptions",
    "WebSocketOptions",
    "WsListenerConfig",
    "WssListenerConfig",
    "TLS_KINDS",
    "load_config",
    "resolve_data_dir",
]

#: Environment variables with this prefix override configuration keys.
ENV_PREFIX = "BASTIONMQ_"
#: Variables of the same prefix that are not overrides: bastionmq ctl's key.
NOT_OVERRIDES = frozenset({"BASTIONMQ_API_KEY"})
_ENV_SEPARATOR = "__"

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """The configuration could not be read; ``errors`` lists every problem.

    Each error is ``(where, message)``: ``where`` is a key path such as
    ``listeners.tcp.default.bind`` or, for a problem with the file itself,
    the file name. ``str()`` gives one line per error.
    """

    def __init__(self, errors: Iterable[tuple[str, str]], *, source: str | None = None,
                 partial: Config | None = None, unchecked: Iterable[str] = ()) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        #: The file (or ``<text>``) the configuration came from.
        self.source = source
        #: The configuration with the keys in error left at their defaults
        #: (None when even that cannot be made), so that check-config and
        #: start-up can still check the files it names and report every
        #: problem in one pass.
        self.partial = partial
        #: Key paths ``partial`` left at their defaults: what is found below
        #: them would be about a default, not about the file.
        self.unchecked: tuple[str, ...] = tuple(unchecked)
        super().__init__("\n".join(f"{where}: {message}" for where, message in self.errors))

    def __str__(self) -> str:
        return "\n".join(f"{where}: {message}" for where, message in self.errors)


# --------------------------------------------------------------------------
# The configuration classes


@attrs.define(slots=True, frozen=True, kw_only=True)
class TcpListenerConfig:
    """One ``listeners.tcp.<name>`` block: plain MQTT over TCP."""

    enable: bool = True
    bind: Bind = Bind(ALL_INTERFACES, 1883)
    #: Concurrent connections accepted; None (``infinity`` in the file) is no limit.
    max_connections: int | None = attrs.field(
        default=None, metadata=INFINITY, validator=v.optional(v.ge(1)))
    #: None inherits the top-level ``allow_anonymous``.
    allow_anonymous: bool | None = None
    tcp_options: TcpOptions = attrs.field(factory=TcpOptions)
    #: This listener's own authentication chain, replacing the top-level one.
    authentication: tuple[AuthenticatorConfig, ...] | None = None
    #: false: clients of this listener are not authenticated at all.
    enable_authn: bool = True
    #: Every connection starts with a PROXY protocol header (version 1 or 2)
    #: from a load balancer, read before anything else (TLS, WebSocket);
    #: the client it names is the peer. A connection without one is closed.
    proxy_protocol: bool = False
    #: A connection whose header is not complete by then is closed.
    proxy_protocol_timeout: float = attrs.field(default=3.0, metadata={"unit": "duration"},
                                                validator=v.gt(0))
    #: The balancers (addresses or networks) whose connections are read;
    #: others are closed. Any address by default: see docs/load-balancer.md.
    proxy_protocol_trusted: tuple[str, ...] = attrs.field(default=ANY_ADDRESS,
                                                          validator=proxy_sources)


@attrs.define(slots=True, frozen=True, kw_only=True)
class SslListenerConfig(TcpListenerConfig):
    """One ``listeners.ssl.<name>`` block: MQTT over TLS."""

    bind: Bind = Bind(ALL_INTERFACES, 8883)
    ssl_options: SslOptions = attrs.field(factory=SslOptions)
    #: This listener's own mqtt.peer_cert_as_username / _clientid /
    #: peer_cert_identity; None inherits the mqtt block's.
    peer_cert_as_username: str | None = attrs.field(default=None, validator=peer_cert_source)
    peer_cert_as_clientid: str | None = attrs.field(default=None, validator=peer_cert_source)
    peer_cert_identity: str | None = attrs.field(
        default=None, validator=v.optional(v.in_(("replace", "enforce"))))


@attrs.define(slots=True, frozen=True, kw_only=True)
class WsListenerConfig(TcpListenerConfig):
    """One ``listeners.ws.<name>`` block: MQTT over WebSocket."""

    bind: Bind = Bind(ALL_INTERFACES, 8083)
    websocket: WebSocketOptions = attrs.field(factory=WebSocketOptions)


@attrs.define(slots=True, frozen=True, kw_only=True)
class WssListenerConfig(SslListenerConfig):
    """One ``listeners.wss.<name>`` block: MQTT over WebSocket over TLS: every
    key of an ssl listener, plus the ws listener's ``websocket`` block (named
    again: two slotted attrs classes cannot be joined by multiple inheritance)."""

    bind: Bind = Bind(ALL_INTERFACES, 8084)
    websocket: WebSocketOptions = attrs.field(factory=WebSocketOptions)


#: The listener kinds that serve TLS (``ssl_options``, certificate identity).
TLS_KINDS = ("ssl", "wss")


@attrs.define(slots=True, frozen=True, kw_only=True)
class ListenersConfig:
    """Listeners by kind, then by name; the id of a listener is ``kind:name``."""

    tcp: dict[str, TcpListenerConfig] = attrs.field(factory=dict)
    ssl: dict[str, SslListenerConfig] = attrs.field(factory=dict)
    ws: dict[str, WsListenerConfig] = attrs.field(factory=dict)
    wss: dict[str, WssListenerConfig] = attrs.field(factory=dict)


@attrs.define(slots=True, frozen=True, kw_only=True)
class SysTopicsConfig:
    #: How often the $SYS/broker/... figures are published; 0s turns them off.
    sys_interval: float = attrs.field(default=10.0, metadata={"unit": "duration"},
                                      validator=v.ge(0))


#: Metadata of a field that is never read from the file (the structuring
#: hooks skip it, and naming it in the file is an unknown key).
INTERNAL = {"internal": True}


@attrs.define(slots=True, frozen=True, kw_only=True)
class NodeConfig:
    """This broker's place on disk (EMQX's ``node``)."""

    #: Where the broker keeps its data: the durable store (unless
    #: durable_sessions.data_dir says otherwise), the built-in user and rule
    #: database (auth.sqlite3) and the development PKI (certs/). Relative to
    #: the directory the broker runs in. None: chosen by bastionmq.data_dir.
    data_dir: str | None = None
    #: Processes serving the listeners (``bastionmq start --workers N``): a
    #: supervisor starts this many workers, each a node of a cluster on NATS
    #: that binds every listener with SO_REUSEPORT (docs/cluster.md). 1: one
    #: process, no cluster unless ``cluster`` says so.
    workers: int = attrs.field(default=1, validator=[v.ge(1), v.le(256)])
    #: The choice made for this configuration (load_config makes it once,
    #: so that every user of the configuration sees the same directory).
    chosen: DataDir | None = attrs.field(default=None, metadata=INTERNAL)

    @property
    def data(self) -> DataDir:
        """The data directory and why it is the one."""
        return self.chosen if self.chosen is not None else choose(self.data_dir)

    @property
    def directory(self) -> str:
        return self.data.path

    @property
    def auth_database(self) -> str:
        return os.path.join(self.directory, "auth.sqlite3")

    @property
    def pki_dir(self) -> str:
        """The development PKI: made there on first start, and where
        ``bastionmq certs`` works by default."""
        return os.path.join(self.directory, "certs")


@attrs.define(slots=True, frozen=True, kw_only=True)
class DurableSessionsConfig:
    """Persistence (EMQX's ``durable_sessions``): sessions that outlive their
    connection, their queued and in-flight QoS 1/2 messages, inbound QoS 2
    state, held-back wills, connected clients' wills (published after a
    crash) and retained messages survive a restart or a crash. Off, all of
    that lives in memory only."""

    enable: bool = False
    #: The folder of the store (sessions.sqlite3 in it), relative to the
    #: directory the broker runs in. None: node.data_dir.
    data_dir: str | None = None
    #: A batch of changes is committed at most this long after its first
    #: change; acknowledgements that promise storage wait for its commit.
    commit_interval: float = attrs.field(default=0.005, metadata={"unit": "duration"},
                                         validator=[v.ge(0), v.le(1.0)])
    #: ...or as soon as it holds this many changes.
    batch_size: int = attrs.field(default=1000, validator=[v.ge(1), v.le(1_000_000)])
    #: full: a commit is on the disk itself before it is acknowledged (it
    #: survives a power cut); normal: it is handed to the operating system
    #: (it survives a crash or kill of the broker, not of the machine).
    synchronous: str = attrs.field(default="full", validator=v.in_(("full", "normal")))

    @property
    def database(self) -> str:
        # None only in a Config built by hand and not yet resolved
        # (resolve_data_dir): the node's default then.
        folder = self.data_dir if self.data_dir is not None else choose(None).path
        return os.path.join(folder, "sessions.sqlite3")


@attrs.define(slots=True, frozen=True, kw_only=True)
class Config:
    """The whole configuration; ``Config()`` is the built-in defaults."""

    node: NodeConfig = attrs.field(factory=NodeConfig)
    mqtt: MqttSettings = attrs.field(factory=MqttSettings)
    listeners: ListenersConfig = attrs.field(factory=ListenersConfig)
    #: Off unless set: anonymous access is always an explicit decision.
    allow_anonymous: bool = False
    #: A client refused because no authenticator knows its username gets the
    #: answer of a wrong password (0x86 / 4), not 0x87 / 5: refusals do not
    #: tell which usernames exist.
    hide_unknown_users: bool = True
    log: LogConfig = attrs.field(factory=LogConfig)
    sys_topics: SysTopicsConfig = attrs.field(factory=SysTopicsConfig)
    crl_cache: CrlCacheConfig = attrs.field(factory=CrlCacheConfig)
    psk_authentication: PskConfig = attrs.field(factory=PskConfig)
    #: The authentication chain, asked in order (listeners may have their own).
    authentication: tuple[AuthenticatorConfig, ...] = ()
    authn_ban: AuthnBanConfig = attrs.field(factory=AuthnBanConfig)
    authorization: AuthorizationConfig = attrs.field(factory=AuthorizationConfig)
    durable_sessions: DurableSessionsConfig = attrs.field(factory=DurableSessionsConfig)
    #: The operations listener: metrics and health over HTTP.
    http_api: HttpApiConfig = attrs.field(factory=HttpApiConfig)
    #: Running as one node of several, on NATS.
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)

    def enabled_listeners(self) -> list[tuple[str, str, TcpListenerConfig]]:
        """(kind, name, block) of every enabled listener: tcp, ssl, ws, then wss."""
        listeners = self.listeners
        return [(kind, name, block)
                for kind, blocks in (("tcp", listeners.tcp), ("ssl", listeners.ssl),
                                     ("ws", listeners.ws), ("wss", listeners.wss))
                for name, block in blocks.items() if block.enable]

    def peer_cert_identity_of(self, listener: TcpListenerConfig) -> tuple[str, str, str]:
        """(username source, client id source, mode) on a TLS listener (ssl,
        wss): its
        own settings where it has them, else the mqtt block's. A tcp or ws
        listener (whose clients have a certificate only through a load
        balancer's PROXY protocol header) has the mqtt block's."""
        mqtt = self.mqtt
        return (_inherit(getattr(listener, "peer_cert_as_username", None),
                         mqtt.peer_cert_as_username),
                _inherit(getattr(listener, "peer_cert_as_clientid", None),
                         mqtt.peer_cert_as_clientid),
                _inherit(getattr(listener, "peer_cert_identity", None), mqtt.peer_cert_identity))

    def authentication_of(self, listener: TcpListenerConfig) -> tuple[AuthenticatorConfig, ...] | None:
        """A listener's chain: its own, else the top-level one; None when
        neither is configured."""
        if listener.authentication is not None:
            return listener.authentication
        return self.authentication or None

    def builtin_authenticator(self, mechanism: str) -> AuthenticatorConfig | None:
        """The first configured authenticator of ``mechanism`` on the built-in
        database (its hashing, user id type and iterations apply to users
        added by the CLI and the API)."""
        entries = list(self.authentication)
        for _, _, block in self.enabled_listeners():
            entries += block.authentication or ()
        for entry in entries:
            if entry.mechanism == mechanism and entry.backend in (None, "built_in_database"):
                return entry
        return None

    def anonymous_allowed(self, listener: TcpListenerConfig) -> bool:
        """Whether ``listener`` lets clients connect without credentials."""
        if listener.allow_anonymous is None:
            return self.allow_anonymous
        return listener.allow_anonymous


def _inherit(own: Any, inherited: Any) -> Any:
    return inherited if own is None else own


# --------------------------------------------------------------------------
# Structuring


class _Invalid(ValueError):
    """A value was rejected; the message is written for an operator."""


_Parse = Callable[[Any], Any]
_Format = Callable[[Any], str]


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{show_value(raw)} is not an integer")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and re.fullmatch(r"[+-]?\d+", raw.strip()):
        return int(raw)
    raise ValueError(f"{show_value(raw)} is not an integer")


def _parse_float(raw: Any) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            pass
    raise ValueError(f"{show_value(raw)} is not a number")


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise ValueError(f"{show_value(raw)} is not a boolean (true or false)")


def _parse_optional_bool(raw: Any) -> bool | None:
    if raw is None:
        return None
    return _parse_bool(raw)


def _parse_str(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    raise ValueError(f"{show_value(raw)} is not a string")


def _parse_str_list(raw: Any) -> tuple[str, ...]:
    """A list of strings, or one string of comma-separated items (as EMQX
    takes ``ciphers``)."""
    if isinstance(raw, str):
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return tuple(raw)
    raise ValueError(f"{show_value(raw)} is not a list of strings")


def _parse_optional_str(raw: Any) -> str | None:
    return None if raw is None else _parse_str(raw)


def _limit_parser(none_word: str) -> _Parse:
    """An integer, or ``none_word`` (infinity, disabled) read as None."""
    def parse(raw: Any) -> int | None:
        if isinstance(raw, str) and raw.strip() == none_word:
            return None
        try:
            return _parse_int(raw)
        except ValueError:
            raise ValueError(f"{show_value(raw)} is not an integer or {none_word}") from None
    return parse


def _size_or(none_word: str) -> _Parse:
    """A size, or ``none_word`` (infinity) read as None."""
    def parse(raw: Any) -> int | None:
        if isinstance(raw, str) and raw.strip() == none_word:
            return None
        try:
            return parse_size(raw)
        except ValueError as exc:
            raise ValueError(f"{exc}, or {none_word}") from None
    return parse


_PARSERS: dict[Any, _Parse] = {
    int: _parse_int,
    float: _parse_float,
    bool: _parse_bool,
    bool | None: _parse_optional_bool,
    str: _parse_str,
    str | None: _parse_optional_str,
    tuple[str, ...]: _parse_str_list,
    Bind: Bind.parse,
}


def _bounds(validator: Any) -> tuple[list[tuple[str, Any]], tuple[Any, ...] | None]:
    """The numeric bounds and allowed choices an attrs validator enforces."""
    bounds: list[tuple[str, Any]] = []
    choices: tuple[Any, ...] | None = None
    pending = [validator]
    while pending:
        current = pending.pop()
        if hasattr(current, "_validators"):  # and_(...) and validator lists
            pending.extend(current._validators)
        elif hasattr(current, "validator"):  # optional(...)
            pending.append(current.validator)
        elif hasattr(current, "compare_op") and hasattr(current, "bound"):
            bounds.append((current.compare_op, current.bound))
        elif hasattr(current, "options"):
            choices = tuple(current.options)
    return bounds, choices


def _describe_bounds(bounds: Sequence[tuple[str, Any]], fmt: _Format) -> str:
    lower = [(op, bound) for op, bound in bounds if op in (">=", ">")]
    upper = [(op, bound) for op, bound in bounds if op in ("<=", "<")]
    low = max(lower, key=lambda item: item[1]) if lower else None
    high = min(upper, key=lambda item: item[1]) if upper else None
    if low and high and low[0] == ">=" and high[0] == "<=":
        return f"{fmt(low[1])} to {fmt(high[1])}"
    phrases = []
    if low:
        phrases.append(f"{fmt(low[1])} or more" if low[0] == ">=" else f"more than {fmt(low[1])}")
    if high:
        phrases.append(f"{fmt(high[1])} or less" if high[0] == "<=" else f"less than {fmt(high[1])}")
    return " and ".join(phrases)


def _check(field: attrs.Attribute, value: Any, raw: Any, fmt: _Format) -> None:
    """Run the field's attrs validator, turning its failure into a message."""
    if field.validator is None or (value is None and field.metadata.get("none_word")):
        return
    try:
        field.validator(None, field, value)
    except (ValueError, TypeError) as exc:
        bounds, choices = _bounds(field.validator)
        if choices is not None:
            allowed = ", ".join(str(choice) for choice in choices)
            raise _Invalid(f"{show_value(raw)} is not one of: {allowed}") from None
        if bounds:
            allowed = _describe_bounds(bounds, fmt)
            if field.metadata.get("none_word"):
                allowed += f", or {field.metadata['none_word']}"
            raise _Invalid(f"{show_value(raw)} is out of range (allowed: {allowed})") from None
        raise _Invalid(f"{show_value(raw)} is not allowed ({exc})") from None


def _field_hook(converter: cattrs.Converter, field: attrs.Attribute,
                field_type: Any) -> Callable[[Any, Any], Any]:
    unit = field.metadata.get("unit")
    fmt: _Format = str
    parse: _Parse
    if unit == "size" and field.metadata.get("none_word"):
        parse, fmt = _size_or(field.metadata["none_word"]), format_size
    elif unit == "size":
        parse, fmt = parse_size, format_size
    elif unit == "duration":
        parse, fmt = parse_duration, format_duration
    elif field.metadata.get("none_word"):
        parse = _limit_parser(field.metadata["none_word"])
    elif field_type in _PARSERS:
        parse = _PARSERS[field_type]
    elif typing.get_origin(field_type) is dict:
        parse = _mapping_parser(converter, typing.get_args(field_type)[1])
    else:
        def parse(raw: Any) -> Any:
            return converter.structure(raw, field_type)

    def structure(raw: Any, _type: Any = None) -> Any:
        try:
            value = parse(raw)
        except _Invalid:
            raise
        except ValueError as exc:
            # The parsers' ValueErrors are written for operators; keep the
            # text and drop the traceback.
            raise _Invalid(str(exc)) from None
        _check(field, value, raw, fmt)
        return value

    return structure


def _mapping_parser(converter: cattrs.Converter, value_type: Any) -> _Parse:
    """Named blocks (``listeners.tcp.<name>``): every entry is checked."""

    def parse(raw: Any) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise _Invalid(f"{show_value(raw)} is not a block of named entries ({{ name {{ ... }} }})")
        result: dict[str, Any] = {}
        errors: list[Exception] = []
        for name, item in raw.items():
            try:
                if not _NAME_RE.fullmatch(name):
                    raise _Invalid(f"{name!r} is not a valid name (letters, digits, '_' and '-' only)")
                result[name] = converter.structure(item, value_type)
            except (_Invalid, BaseValidationError) as exc:
                exc.add_note(IterableValidationNote(f"Structuring entry {name!r}", name, value_type))
                errors.append(exc)
        if errors:
            raise IterableValidationError("While structuring named entries", errors, dict)
        return result

    return parse


def _class_hook(converter: cattrs.Converter, cls: type) -> Callable[[Any, Any], Any]:
    hints = typing.get_type_hints(cls)
    overrides = {
        field.name: override(omit=True) if field.metadata.get("internal") else
        override(struct_hook=_field_hook(converter, field, hints[field.name]))
        for field in attrs.fields(cls)
    }
    inner: Callable[[Mapping[str, Any], Any], Any] = make_dict_structure_fn(
        cls, converter, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True,
        # mypy matches **overrides against every _cattrs_* flag as well (it cannot know the
        # keys are field names); naming those flags would pin values left to cattrs here.
        **overrides)  # type: ignore[arg-type]

    def structure(raw: Any, _type: Any = None) -> Any:
        if not isinstance(raw, Mapping):
            raise _Invalid(f"{show_value(raw)} is not a block ({{ key = value ... }})")
        return inner(raw, cls)

    return structure


def _strict(parse: _Parse) -> Callable[[Any, Any], Any]:
    def structure(raw: Any, _type: Any = None) -> Any:
        try:
            return parse(raw)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None

    return structure


@cache
def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    # Fields get their parsers through _field_hook; these registrations keep
    # containers of plain values (a list of strings, say) as strict, instead
    # of cattrs' default of calling str() or int() on whatever was given.
    for plain_type in (int, float, bool, str, Bind):
        converter.register_structure_hook(plain_type, _strict(_PARSERS[plain_type]))
    converter.register_structure_hook_factory(
        lambda cls: attrs.has(cls) and cls is not Bind,
        lambda cls: _class_hook(converter, cls))
    return converter


@attrs.define(slots=True, frozen=True)
class _Problem:
    path: tuple[str, ...]
    message: str
    unknown_key: bool = False


def _collect(exc: BaseException, path: tuple[str, ...], out: list[_Problem]) -> None:
    """Flatten cattrs' tree of errors into problems with key paths."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [field.name for field in attrs.fields(exc.cl) if not field.metadata.get("internal")]
        for key in sorted(exc.extra_fields):
            hint = difflib.get_close_matches(key, known, n=1)
            if hint:
                message = f"unknown key (did you mean {hint[0]}?)"
            else:
                message = f"unknown key (known keys: {', '.join(known)})"
            out.append(_Problem((*path, key), message, unknown_key=True))
    elif isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            _collect(sub, path + _segment(sub), out)
    elif isinstance(exc, _Invalid):
        out.append(_Problem(path, str(exc)))
    elif isinstance(exc, KeyError):
        out.append(_Problem(path, "missing: this key is required"))
    else:
        # A validator across fields, or anything else attrs raised on construction.
        out.append(_Problem(path, f"invalid: {exc}"))


def _segment(exc: BaseException) -> tuple[str, ...]:
    for note in reversed(getattr(exc, "__notes__", ())):
        if isinstance(note, AttributeValidationNote):
            return (note.name,)
        if isinstance(note, IterableValidationNote):
            return (str(note.index),)
    return ()


# --------------------------------------------------------------------------
# Reading


def _plain(value: Any) -> Any:
    """pyhocon's tree as plain dicts and lists, so later steps need not know it."""
    if isinstance(value, ConfigTree):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, NoneValue):
        return None
    return value


def _parse_hocon(text: str, source: str, basedir: str) -> dict[str, Any]:
    try:
        tree = ConfigFactory.parse_string(text, basedir=basedir)
    except ParseBaseException as exc:
        # pyparsing's message lists the whole grammar when many tokens were
        # possible; only what it found is useful to an operator then.
        message = exc.msg
        if len(message) > 80:
            found = getattr(exc, "found", None)
            message = f"unexpected {found}" if found else "unexpected input"
        raise ConfigError(
            [(source, f"line {exc.lineno}, col {exc.col}: syntax error: {message}")],
            source=source) from None
    except ConfigException as exc:
        raise ConfigError([(source, f"syntax error: {exc}")], source=source) from None
    except OSError as exc:  # a required include is missing
        raise ConfigError([(source, f"cannot read an included file: {exc}")],
                          source=source) from None
    if not isinstance(tree, ConfigTree):
        raise ConfigError(
            [(source, "the file must hold keys and values, not a list")], source=source)
    return _plain(tree)


def _read(path: str | os.PathLike[str]) -> str:
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([(source, f"cannot read the config file: {reason}")],
                          source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([(source, f"the config file is not UTF-8 text: {exc}")],
                          source=source) from None


def _env_value(text: str) -> Any:
    """An override read as a HOCON value, or as the plain string it is.

    Plain strings matter: ``0.0.0.0:9883`` or ``[::1]:1883`` are not all
    valid unquoted HOCON, and an operator should not have to quote them.
    """
    try:
        tree = ConfigFactory.parse_string(f"value = {text}")
    except Exception:  # any parse failure means "take it literally"
        return text
    if "value" not in tree:
        return text
    return _plain(tree["value"])


def _apply_env(tree: dict[str, Any], env: Mapping[str, str],
               problems: list[_Problem]) -> dict[tuple[str, ...], str]:
    """Apply ``BASTIONMQ_*`` overrides to ``tree``; return which variable set which path."""
    overrides: list[tuple[tuple[str, ...], str]] = []
    for name in env:
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        segments = tuple(part.lower() for part in name[len(ENV_PREFIX):].split(_ENV_SEPARATOR))
        if not all(segments):
            problems.append(_Problem(
                (name,), "not a valid override: key names are joined by a double "
                "underscore, e.g. BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND"))
            continue
        overrides.append((segments, name))
    # Shallow paths first, so BASTIONMQ_MQTT={...} does not undo BASTIONMQ_MQTT__X.
    overrides.sort(key=lambda item: (len(item[0]), item[1]))
    for segments, name in overrides:
        node = tree
        for segment in segments[:-1]:
            child = node.get(segment)
            if not isinstance(child, dict):
                child = node[segment] = {}
            node = child
        value = _env_value(env[name])
        if isinstance(value, dict) and isinstance(node.get(segments[-1]), dict):
            _merge(node[segments[-1]], value)
        else:
            node[segments[-1]] = value
    return {segments: name for segments, name in overrides}


def _merge(target: dict[str, Any], source: Mapping[str, Any]) -> None:
    # HOCON merges objects given twice; an override block does the same.
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _env_origin(problem: _Problem, overrides: Mapping[tuple[str, ...], str]) -> str:
    names = []
    for path, name in overrides.items():
        within = problem.path[:len(path)] == path
        # An unknown key is reported where it leaves the schema, above the
        # full path the variable named.
        above = problem.unknown_key and path[:len(problem.path)] == problem.path
        if within or above:
            names.append(name)
    return f" (set by {', '.join(sorted(names))})" if names else ""


def load_config(path: str | os.PathLike[str] | None = None, *, text: str | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration from a file, or from HOCON text, then apply
    ``BASTIONMQ_*`` environment overrides.

    With neither ``path`` nor ``text`` the built-in defaults are used.
    ``env=None`` reads ``os.environ``. Raises ConfigError listing every
    problem found, each with its key path.
    """
    if path is not None and text is not None:
        raise TypeError("load_config() takes a path or text, not both")
    if path is not None:
        source = os.fspath(path)
        tree = _parse_hocon(_read(path), source, os.path.dirname(os.path.abspath(source)))
    elif text is not None:
        source = "<text>"
        tree = _parse_hocon(text, source, os.getcwd())
    else:
        source, tree = "<defaults>", {}

    problems: list[_Problem] = []
    overrides = _apply_env(tree, os.environ if env is None else env, problems)
    config: Config | None = None
    try:
        config = _converter().structure(tree, Config)
    except (BaseValidationError, _Invalid) as exc:
        _collect(exc, (), problems)
    if problems or config is None:
        partial, unchecked = _salvage(tree, [problem.path for problem in problems])
        raise ConfigError(
            [(".".join(problem.path) or source, problem.message + _env_origin(problem, overrides))
             for problem in problems],
            source=source, unchecked=unchecked,
            partial=None if partial is None else resolve_data_dir(partial, tree))
    return resolve_data_dir(config, tree)


def _salvage(tree: dict[str, Any], paths: list[tuple[str, ...]]
             ) -> tuple[Config | None, list[str]]:
    """The configuration without the keys in error (their defaults instead),
    and the key paths removed for it. A key that cannot go alone (a required
    one) takes its block with it; an entry of a list is replaced by a
    disabled copy of a sound sibling, so that the others keep their indexes
    (their key paths). Errors of the config made then remove more."""
    tree = copy.deepcopy(tree)
    removed: list[str] = []
    for _ in range(8):  # each round removes at least one key; nesting is shallow
        cuts = [cut for cut in (_remove(tree, path, paths) for path in paths) if cut is not None]
        if not cuts:
            return None, removed
        removed += [".".join(cut) for cut in cuts]
        try:
            return _converter().structure(tree, Config), removed
        except (BaseValidationError, _Invalid) as exc:
            found: list[_Problem] = []
            _collect(exc, (), found)
            paths = [problem.path for problem in found]
    return None, removed


def _remove(tree: dict[str, Any], path: tuple[str, ...],
            in_error: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    while path:
        parent: Any = tree
        for segment in path[:-1]:
            if isinstance(parent, dict):
                parent = parent.get(segment)
            elif isinstance(parent, list) and segment.isdigit() and int(segment) < len(parent):
                parent = parent[int(segment)]
            else:
                parent = None
        last = path[-1]
        if isinstance(parent, dict) and last in parent:
            del parent[last]
            return path
        if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            depth = len(path) - 1
            bad = {error[depth] for error in in_error
                   if len(error) > depth and error[:depth] == path[:-1]}
            sound = [item for index, item in enumerate(parent)
                     if str(index) not in bad and isinstance(item, dict)]
            if sound:
                parent[int(last)] = {**copy.deepcopy(sound[0]), "enable": False}
                return path
        path = path[:-1]
    return None


def _given(tree: Mapping[str, Any] | None, path: Sequence[str]) -> bool:
    node: Any = tree
    for segment in path:
        if not isinstance(node, Mapping) or segment not in node:
            return False
        node = node[segment]
    return True


def resolve_data_dir(config: Config, tree: Mapping[str, Any] | None = None) -> Config:
    """``config`` with its data directory chosen (bastionmq.data_dir) and put
    where it is used: durable_sessions.data_dir when not set, and the
    certificate files of every ssl_options that were left at the development
    PKI's defaults, which move into data_dir/certs. ``tree`` is the file's
    contents, to tell a default from the same path written in the file (which
    stays as written); without it a value equal to the default is taken for
    one. load_config does this; a Config made by hand gets it when a Broker
    is made from it."""
    node = config.node
    chosen = choose(node.data_dir)
    defaults = dev_pki_files()
    moved = dev_pki_files(os.path.join(chosen.path, "certs"))

    def dev_pki(options: SslOptions | None, path: tuple[str, ...]) -> SslOptions | None:
        if options is None or moved == defaults:
            return options
        changes: dict[str, Any] = {
            key: new for key, default, new in zip(DEV_PKI_FILE_KEYS, defaults, moved)
            if getattr(options, key) == default and not _given(tree, (*path, key))}
        return attrs.evolve(options, **changes) if changes else options

    listeners = config.listeners
    tls_blocks = {kind: {name: attrs.evolve(block, ssl_options=dev_pki(
        block.ssl_options, ("listeners", kind, name, "ssl_options")))
        for name, block in getattr(listeners, kind).items()} for kind in TLS_KINDS}
    durable = config.durable_sessions
    return attrs.evolve(
        config, node=attrs.evolve(node, chosen=chosen),
        listeners=attrs.evolve(listeners, **tls_blocks),
        durable_sessions=durable if durable.data_dir is not None
        else attrs.evolve(durable, data_dir=chosen.path),
        http_api=attrs.evolve(config.http_api, ssl_options=dev_pki(
            config.http_api.ssl_options, ("http_api", "ssl_options"))))
