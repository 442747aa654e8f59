"""The configuration file: what an operator writes and what they are told."""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path

import attrs
import pytest

from bastionmq.cluster.settings import ClusterConfig, NatsConfig, NatsTlsConfig
from bastionmq.broker.settings import MqttSettings
from bastionmq.auth.passwords import PasswordHash
from bastionmq.config import (
    AclSourceConfig,
    AuthenticatorConfig,
    AuthnBanConfig,
    AuthorizationConfig,
    AuthzCacheConfig,
    Bind,
    Config,
    ConfigError,
    CrlCacheConfig,
    OcspConfig,
    DurableSessionsConfig,
    ListenersConfig,
    LogConfig,
    LogFileConfig,
    NodeConfig,
    PskConfig,
    SniCertificate,
    SslListenerConfig,
    SslOptions,
    SysTopicsConfig,
    TcpListenerConfig,
    TcpOptions,
    WebSocketOptions,
    WsListenerConfig,
    WssListenerConfig,
    load_config,
    parse_duration,
    parse_size,
)
from bastionmq.ops.settings import HttpApiConfig

from bastionmq.config import resolve_data_dir
from bastionmq.data_dir import DataDir, choose

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "bastionmq.conf"
NO_ENV: dict[str, str] = {}


def errors_of(text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The errors for ``text`` as {key path: message}."""
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, env=NO_ENV if env is None else env)
    errors = dict(caught.value.errors)
    assert len(errors) == len(caught.value.errors), "one error per key path"
    return errors


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(text=text, env=NO_ENV if env is None else env)


# --------------------------------------------------------------------------
# Defaults and the shipped file


def test_no_file_gives_the_defaults() -> None:
    config = load_config(env=NO_ENV)
    # A loaded configuration has its data directory chosen (node.data_dir).
    assert config == resolve_data_dir(Config())
    assert config.mqtt == MqttSettings()
    assert config.allow_anonymous is False
    assert config.listeners.tcp == {}
    assert config.log.level == "info"


def test_empty_text_gives_the_defaults() -> None:
    assert load("") == resolve_data_dir(Config())
    assert load("# only a comment\n") == resolve_data_dir(Config())


def test_listener_defaults() -> None:
    listener = load("listeners.tcp.default {}").listeners.tcp["default"]
    assert listener == TcpListenerConfig()
    assert listener.enable is True
    assert listener.bind == Bind("0.0.0.0", 1883)
    assert listener.max_connections is None
    assert listener.allow_anonymous is None
    assert listener.tcp_options == TcpOptions(backlog=1024, nodelay=True, high_watermark=1048576)


def test_shipped_config_loads() -> None:
    config = load_config(SHIPPED, env=NO_ENV)
    assert config.mqtt == MqttSettings()
    assert config.log == LogConfig()


def test_shipped_config_opens_one_loopback_listener_with_explicit_anonymous_access() -> None:
    config = load_config(SHIPPED, env=NO_ENV)
    assert list(config.listeners.tcp) == ["default"]
    listener = config.listeners.tcp["default"]
    assert listener.enable is True
    assert listener.bind == Bind("127.0.0.1", 1883)
    assert ipaddress.ip_address(listener.bind.host).is_loopback
    assert listener.allow_anonymous is True
    assert config.allow_anonymous is False
    assert config.anonymous_allowed(listener) is True


def test_shipped_config_says_why_anonymous_access_is_on() -> None:
    text = SHIPPED.read_text()
    assert "mosquitto_sub" in text and "mosquitto_pub" in text
    assert re.search(r"(?m)^allow_anonymous = false$", text)


def test_defaults_shown_in_the_shipped_config_match_the_code() -> None:
    # "# key = value" lines show defaults; uncommented, they must change nothing.
    text = SHIPPED.read_text()
    shown = re.findall(r"(?m)^\s*# (\w+) = ", text)
    assert {"max_inflight", "session_expiry_interval", "high_watermark", "level"} <= set(shown)
    uncommented = re.sub(r"(?m)^(\s*)# (\w+ = .*)$", r"\1\2", text)
    assert load(uncommented) == load_config(SHIPPED, env=NO_ENV)


def test_shipped_config_shows_every_key() -> None:
    text = SHIPPED.read_text()
    for cls in (MqttSettings, TcpListenerConfig, TcpOptions, LogConfig, LogFileConfig,
                SysTopicsConfig, Config,
                SslListenerConfig, SslOptions, CrlCacheConfig, OcspConfig, PskConfig,
                SniCertificate,
                NodeConfig, AuthenticatorConfig, AuthorizationConfig, AuthzCacheConfig,
                AclSourceConfig, PasswordHash, AuthnBanConfig, WsListenerConfig,
                WebSocketOptions, WssListenerConfig, DurableSessionsConfig, HttpApiConfig):
        for field in attrs.fields(cls):
            if field.metadata.get("internal"):  # never read from the file
                continue
            assert re.search(rf"\b{field.name}\b", text), f"{cls.__name__}.{field.name}"


def test_reference_documents_every_key() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    for cls in (MqttSettings, TcpListenerConfig, TcpOptions, LogConfig, LogFileConfig,
                SysTopicsConfig, Config,
                ListenersConfig, SslListenerConfig, SslOptions, CrlCacheConfig, OcspConfig,
                PskConfig,
                SniCertificate, NodeConfig, AuthenticatorConfig, AuthorizationConfig,
                AuthzCacheConfig, AclSourceConfig, PasswordHash, AuthnBanConfig,
                WsListenerConfig, WebSocketOptions, WssListenerConfig, DurableSessionsConfig,
                HttpApiConfig, ClusterConfig, NatsConfig, NatsTlsConfig):
        for field in attrs.fields(cls):
            if field.metadata.get("internal"):  # never read from the file
                continue
            # As a key in code quotes: `max_inflight`, `tcp_options.backlog`, ...
            assert re.search(rf"`[\w.<>]*\b{field.name}\b[\w.<>]*`", text), (
                f"{cls.__name__}.{field.name}")
    assert "check-config" in text


# --------------------------------------------------------------------------
# Sizes and durations


@pytest.mark.parametrize(("given", "expected"), [
    (0, 0),
    (512, 512),
    ("512", 512),
    ("512B", 512),
    ("64KB", 65536),
    ("64kb", 65536),
    ("1MB", 1048576),
    ("1mb", 1048576),
    ("1 MB", 1048576),
    ("1GB", 1073741824),
])
def test_parse_size(given: int | str, expected: int) -> None:
    assert parse_size(given) == expected


@pytest.mark.parametrize("given", ["1XB", "MB", "1.5MB", "-1", -1, "", True, 1.5, "1TB"])
def test_parse_size_refuses(given: object) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(given)  # type: ignore[arg-type]


@pytest.mark.parametrize(("given", "expected"), [
    (0, 0.0),
    (1500, 1.5),
    ("1500", 1.5),
    ("100ms", 0.1),
    ("15s", 15.0),
    ("15S", 15.0),
    ("2m", 120.0),
    ("2h", 7200.0),
    ("1d", 86400.0),
    ("1w", 604800.0),
    ("1h30m", 5400.0),
    ("1m30s500ms", 90.5),
    (datetime.timedelta(milliseconds=250), 0.25),
])
def test_parse_duration(given: object, expected: float) -> None:
    assert parse_duration(given) == expected


@pytest.mark.parametrize("given", ["abc", "1.5s", "-1s", -1, "15 parsecs", "s", True, 1.5, ""])
def test_parse_duration_refuses(given: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(given)


@pytest.mark.parametrize(("written", "seconds"), [
    ("15s", 15.0),
    ('"15s"', 15.0),
    ("100ms", 0.1),
    ("1500", 1.5),
    ("2h", 7200.0),
    ("1d", 86400.0),
    ("1h30m", 5400.0),
    ("30 seconds", 30.0),
    ("2 minutes", 120.0),
])
def test_durations_in_the_file(written: str, seconds: float) -> None:
    # pyhocon turns some unquoted durations into timedelta-like objects of its
    # own; every spelling must arrive as the same number of seconds.
    assert load(f"mqtt.idle_timeout = {written}").mqtt.idle_timeout == seconds


def test_months_are_not_a_duration() -> None:
    errors = errors_of("mqtt.session_expiry_interval = 1 month")
    assert "is not a fixed duration" in errors["mqtt.session_expiry_interval"]


@pytest.mark.parametrize(("written", "size"), [
    ("64KB", 65536), ('"64KB"', 65536), ("1MB", 1048576), ("2048", 2048), ("1gb", 1 << 30),
])
def test_sizes_in_the_file(written: str, size: int) -> None:
    config = load(f"listeners.tcp.a.tcp_options.high_watermark = {written}")
    assert config.listeners.tcp["a"].tcp_options.high_watermark == size


def test_size_and_duration_errors_in_the_file() -> None:
    errors = errors_of("mqtt { max_packet_size = 1XB, idle_timeout = soon }")
    assert errors == {
        "mqtt.max_packet_size":
            "'1XB' is not a size (e.g. 1MB, 64KB, 512B; a bare integer is bytes)",
        "mqtt.idle_timeout":
            "'soon' is not a duration (e.g. 15s, 100ms, 2h, 1h30m; a bare integer is milliseconds)",
    }


# --------------------------------------------------------------------------
# Bind addresses


@pytest.mark.parametrize(("written", "bind", "shown"), [
    ('"127.0.0.1:1883"', Bind("127.0.0.1", 1883), "127.0.0.1:1883"),
    ('"0.0.0.0:8883"', Bind("0.0.0.0", 8883), "0.0.0.0:8883"),
    ('":1884"', Bind("0.0.0.0", 1884), "0.0.0.0:1884"),
    ("1885", Bind("0.0.0.0", 1885), "0.0.0.0:1885"),
    ('"1886"', Bind("0.0.0.0", 1886), "0.0.0.0:1886"),
    ('"[::1]:1883"', Bind("::1", 1883), "[::1]:1883"),
    ('"[::]:1883"', Bind("::", 1883), "[::]:1883"),
    ('"localhost:1883"', Bind("localhost", 1883), "localhost:1883"),
    ('"127.0.0.1:0"', Bind("127.0.0.1", 0), "127.0.0.1:0"),
    ("0", Bind("0.0.0.0", 0), "0.0.0.0:0"),
])
def test_bind_forms(written: str, bind: Bind, shown: str) -> None:
    parsed = load(f"listeners.tcp.a.bind = {written}").listeners.tcp["a"].bind
    assert parsed == bind
    assert str(parsed) == shown


@pytest.mark.parametrize(("written", "message"), [
    ('"1.2.3.4"', "'1.2.3.4' is not HOST:PORT (e.g. \"0.0.0.0:1883\")"),
    ('"host:"', "'host:' is not HOST:PORT (e.g. \"0.0.0.0:1883\")"),
    ('":abc"', "':abc' is not HOST:PORT (e.g. \"0.0.0.0:1883\")"),
    ('"::1:1883"', "'::1:1883' is not HOST:PORT (e.g. \"0.0.0.0:1883\"); "
                   "an IPv6 address goes in brackets, e.g. \"[::1]:1883\""),
    ('"[zz]:1883"', "'[zz]:1883' has an invalid IPv6 address: 'zz'"),
    ('"[::1]"', "'[::1]' is not HOST:PORT (e.g. \"0.0.0.0:1883\")"),
    ('"999.1.1.1:1883"', "'999.1.1.1:1883' has an invalid host: '999.1.1.1'"),
    ('"bad_host:1883"', "'bad_host:1883' has an invalid host: 'bad_host'"),
    ('"0.0.0.0:65536"', "'0.0.0.0:65536' is out of range (allowed port: 0 to 65535)"),
    ("70000", "70000 is out of range (allowed port: 0 to 65535)"),
    ("true", "true is not HOST:PORT (e.g. \"0.0.0.0:1883\")"),
])
def test_bad_binds(written: str, message: str) -> None:
    assert errors_of(f"listeners.tcp.default.bind = {written}") == {
        "listeners.tcp.default.bind": message}


def test_bind_parse_directly() -> None:
    assert Bind.parse("[fe80::1%eth0]:1883") == Bind("fe80::1%eth0", 1883)
    assert str(Bind("fe80::1%eth0", 1883)) == "[fe80::1%eth0]:1883"
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        Bind.parse("nowhere")
    with pytest.raises(ValueError):
        Bind("0.0.0.0", 70000)


# --------------------------------------------------------------------------
# Listeners


def test_max_connections_infinity_or_a_positive_integer() -> None:
    assert load("listeners.tcp.a.max_connections = infinity").listeners.tcp["a"].max_connections is None
    assert load('listeners.tcp.a.max_connections = "infinity"').listeners.tcp["a"].max_connections is None
    assert load("listeners.tcp.a.max_connections = 100").listeners.tcp["a"].max_connections == 100
    assert errors_of("listeners.tcp.a.max_connections = 0") == {
        "listeners.tcp.a.max_connections": "0 is out of range (allowed: 1 or more, or infinity)"}
    assert errors_of("listeners.tcp.a.max_connections = lots") == {
        "listeners.tcp.a.max_connections": "'lots' is not an integer or infinity"}


def test_several_listeners_and_anonymous_inheritance() -> None:
    config = load("""
        allow_anonymous = false
        listeners.tcp.public { bind = "0.0.0.0:1883" }
        listeners.tcp.local-1 { bind = "127.0.0.1:1884", allow_anonymous = true }
        listeners.tcp.off_2 { bind = 1885, enable = false, allow_anonymous = false }
    """)
    assert list(config.listeners.tcp) == ["public", "local-1", "off_2"]
    public, local, off = config.listeners.tcp.values()
    assert public.allow_anonymous is None
    assert config.anonymous_allowed(public) is False
    assert config.anonymous_allowed(local) is True
    assert off.enable is False
    everyone = load("allow_anonymous = true\nlisteners.tcp.a {}")
    assert everyone.anonymous_allowed(everyone.listeners.tcp["a"]) is True


def test_ws_listener_defaults_are_emqx_s() -> None:
    config = load("listeners.ws.default {}")
    listener = config.listeners.ws["default"]
    assert listener == WsListenerConfig()
    assert listener.bind == Bind("0.0.0.0", 8083)
    assert listener.tcp_options == TcpOptions()
    options = listener.websocket
    assert options == WebSocketOptions(
        mqtt_path="/mqtt", mqtt_piggyback="multiple", fail_if_no_subprotocol=True,
        supported_subprotocols=("mqtt", "mqtt-v3", "mqtt-v3.1.1", "mqtt-v5"),
        check_origin_enable=None, allow_origin_absence=True, allowed_origins=(),
        proxy_address_header="x-forwarded-for", proxy_port_header="x-forwarded-port",
        trusted_proxies=(), max_frame_size=None, compress=False)
    assert config.enabled_listeners() == [("ws", "default", listener)]


def test_wss_listener_takes_every_ssl_key_and_the_websocket_block() -> None:
    config = load("""
        listeners.wss.web {
          max_connections = 10
          peer_cert_as_username = cn
          ssl_options { verify = verify_peer, fail_if_no_peer_cert = true, crlfile = "crl.pem" }
          websocket { mqtt_path = "/ws", compress = true }
        }
    """)
    listener = config.listeners.wss["web"]
    assert WssListenerConfig().bind == Bind("0.0.0.0", 8084)
    assert listener.max_connections == 10
    assert listener.ssl_options == SslOptions(verify="verify_peer", fail_if_no_peer_cert=True,
                                              crlfile=("crl.pem",))
    assert listener.websocket == WebSocketOptions(mqtt_path="/ws", compress=True)
    assert config.peer_cert_identity_of(listener) == ("cn", "disabled", "replace")
    assert config.enabled_listeners() == [("wss", "web", listener)]
    assert errors_of("listeners.wss.web.ssl_options.verify = maybe").keys() == {
        "listeners.wss.web.ssl_options.verify"}


def test_shipped_config_serves_wss_with_the_ssl_listeners_pki() -> None:
    config = load_config(SHIPPED, env=NO_ENV)
    listener = config.listeners.wss["default"]
    assert listener.bind == Bind("0.0.0.0", 8084)
    assert listener.ssl_options == config.listeners.ssl["default"].ssl_options
    assert (listener.ssl_options.verify, listener.ssl_options.fail_if_no_peer_cert) == \
        ("verify_peer", True)
    assert config.anonymous_allowed(listener) is False
    assert listener.websocket == WebSocketOptions()


def test_ws_options_as_an_operator_writes_them() -> None:
    options = load("""
        listeners.ws.web {
          bind = "127.0.0.1:9001", allow_anonymous = true
          websocket {
            mqtt_path = "/broker/mqtt", mqtt_piggyback = single
            supported_subprotocols = "mqtt,  mqttv3.1"
            check_origin_enable = true, allowed_origins = ["https://app.example.com"]
            trusted_proxies = ["10.0.0.0/8", "::1"], max_frame_size = 64KB, compress = true
          }
        }
    """).listeners.ws["web"].websocket
    assert options.mqtt_path == "/broker/mqtt"
    assert options.mqtt_piggyback == "single"
    assert options.supported_subprotocols == ("mqtt", "mqttv3.1")
    assert options.allowed_origins == ("https://app.example.com",)
    assert options.trusted_proxies == ("10.0.0.0/8", "::1")
    assert options.max_frame_size == 65536
    assert load("listeners.ws.a.websocket.supported_subprotocols = [mqtt, mqtt-v5]") \
        .listeners.ws["a"].websocket.supported_subprotocols == ("mqtt", "mqtt-v5")
    assert load("listeners.ws.a.websocket.max_frame_size = infinity") \
        .listeners.ws["a"].websocket.max_frame_size is None


def test_ws_option_errors_name_their_key_path() -> None:
    prefix = "listeners.ws.a.websocket."
    assert errors_of("""listeners.ws.a.websocket {
        mqtt_path = mqtt, mqtt_piggyback = many, trusted_proxies = ["10.0.0.300"]
        max_frame_size = lots, supported_subprotocols = [], proxy_port_header = "x port"
        compres = true
    }""") == {
        prefix + "mqtt_path": "'mqtt' is not allowed (must be a URL path starting with \"/\" "
                              '(e.g. "/mqtt"))',
        prefix + "mqtt_piggyback": "'many' is not one of: single, multiple",
        prefix + "trusted_proxies": "['10.0.0.300'] is not allowed ('10.0.0.300' is not an IP "
                                    'address or network (e.g. "10.0.0.5", "10.0.0.0/8", "::1"))',
        prefix + "max_frame_size": "'lots' is not a size (e.g. 1MB, 64KB, 512B; a bare integer "
                                   "is bytes), or infinity",
        prefix + "supported_subprotocols": "[] is not allowed (at least one subprotocol is "
                                           "needed (MQTT clients name mqtt))",
        prefix + "proxy_port_header": "'x port' is not allowed (must be an HTTP header name "
                                      "(or empty to ignore the header))",
        prefix + "compres": "unknown key (did you mean compress?)",
    }
    assert errors_of("listeners.ws.a.websocket.max_frame_size = 0") == {
        prefix + "max_frame_size": "0 is out of range (allowed: 1B or more, or infinity)"}


def test_shipped_config_serves_websocket_on_loopback_only() -> None:
    config = load_config(SHIPPED, env=NO_ENV)
    listener = config.listeners.ws["default"]
    assert listener.bind == Bind("127.0.0.1", 8083)
    assert config.anonymous_allowed(listener) is True
    assert listener.websocket == WebSocketOptions()
    moved = load_config(SHIPPED, env={"BASTIONMQ_LISTENERS__WS__DEFAULT__BIND": "127.0.0.1:0"})
    assert moved.listeners.ws["default"].bind == Bind("127.0.0.1", 0)


def test_bad_listener_name() -> None:
    errors = errors_of('listeners.tcp { "bad name" { bind = 1883 } }')
    assert errors == {
        "listeners.tcp.bad name":
            "'bad name' is not a valid name (letters, digits, '_' and '-' only)"}


def test_listener_kind_not_known() -> None:
    assert errors_of("listeners.quic.default { bind = 14567 }") == {
        "listeners.quic": "unknown key (known keys: tcp, ssl, ws, wss)"}


def test_block_where_a_value_is_expected_and_the_reverse() -> None:
    errors = errors_of("mqtt = 5\nlisteners.tcp.a = \"x\"\nlog.level { x = 1 }")
    assert errors["mqtt"] == "5 is not a block ({ key = value ... })"
    assert errors["listeners.tcp.a"] == "'x' is not a block ({ key = value ... })"
    assert errors["log.level"] == "{'x': 1} is not a string"


# --------------------------------------------------------------------------
# Errors: unknown keys, types, ranges, all at once


def test_unknown_key_with_a_hint() -> None:
    assert errors_of("mqtt.max_inflite = 10") == {
        "mqtt.max_inflite": "unknown key (did you mean max_inflight?)"}


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    assert errors_of("zzz = 1") == {
        "zzz": "unknown key (known keys: node, mqtt, listeners, allow_anonymous, hide_unknown_users, log, sys_topics, crl_cache, psk_authentication, authentication, authn_ban, authorization, durable_sessions, http_api, cluster)"}


def test_unknown_key_deep_inside_a_listener() -> None:
    assert errors_of("listeners.tcp.default.tcp_options.nodealy = true") == {
        "listeners.tcp.default.tcp_options.nodealy": "unknown key (did you mean nodelay?)"}


@pytest.mark.parametrize(("line", "path", "message"), [
    ("mqtt.max_inflight = abc", "mqtt.max_inflight", "'abc' is not an integer"),
    ("mqtt.max_inflight = 1.5", "mqtt.max_inflight", "1.5 is not an integer"),
    ("mqtt.max_inflight = true", "mqtt.max_inflight", "true is not an integer"),
    ("mqtt.max_inflight = 15s", "mqtt.max_inflight", "15s is not an integer"),
    ("mqtt.keepalive_multiplier = abc", "mqtt.keepalive_multiplier", "'abc' is not a number"),
    ("mqtt.mqueue_store_qos0 = yes", "mqtt.mqueue_store_qos0", "'yes' is not a boolean (true or false)"),
    ("mqtt.mqueue_store_qos0 = 1", "mqtt.mqueue_store_qos0", "1 is not a boolean (true or false)"),
    ("allow_anonymous = null", "allow_anonymous", "null is not a boolean (true or false)"),
    ("log.level = 3", "log.level", "3 is not a string"),
    ("log.level = verbose", "log.level", "'verbose' is not one of: debug, info, warning, error"),
])
def test_type_errors(line: str, path: str, message: str) -> None:
    assert errors_of(line) == {path: message}


@pytest.mark.parametrize(("line", "path", "message"), [
    ("mqtt.max_inflight = 0", "mqtt.max_inflight", "0 is out of range (allowed: 1 to 65535)"),
    ("mqtt.max_inflight = 65536", "mqtt.max_inflight", "65536 is out of range (allowed: 1 to 65535)"),
    ("mqtt.max_clientid_len = 10", "mqtt.max_clientid_len", "10 is out of range (allowed: 23 to 65535)"),
    ("mqtt.max_mqueue_len = -1", "mqtt.max_mqueue_len", "-1 is out of range (allowed: 0 or more)"),
    ("mqtt.keepalive_multiplier = 0.5", "mqtt.keepalive_multiplier",
     "0.5 is out of range (allowed: 1.0 to 10.0)"),
    ("mqtt.max_packet_size = 8", "mqtt.max_packet_size", "8 is out of range (allowed: 16B to 268435460B)"),
    ("mqtt.max_packet_size = 1GB", "mqtt.max_packet_size",
     "'1GB' is out of range (allowed: 16B to 268435460B)"),
    ("mqtt.idle_timeout = 0s", "mqtt.idle_timeout", "0s is out of range (allowed: more than 0s)"),
    ("mqtt.idle_timeout = 0", "mqtt.idle_timeout", "0 is out of range (allowed: more than 0s)"),
    ("listeners.tcp.a.tcp_options.backlog = 0", "listeners.tcp.a.tcp_options.backlog",
     "0 is out of range (allowed: 1 to 65535)"),
    ("listeners.tcp.a.tcp_options.high_watermark = 0", "listeners.tcp.a.tcp_options.high_watermark",
     "0 is out of range (allowed: 1B or more)"),
])
def test_range_errors(line: str, path: str, message: str) -> None:
    assert errors_of(line) == {path: message}


def test_values_at_the_edges_of_their_range_are_accepted() -> None:
    config = load("""
        mqtt { max_inflight = 65535, max_clientid_len = 23, max_packet_size = 16B,
               keepalive_multiplier = 10, max_mqueue_len = 0, session_expiry_interval = 0 }
    """)
    assert config.mqtt.max_inflight == 65535
    assert config.mqtt.max_clientid_len == 23
    assert config.mqtt.max_packet_size == 16
    assert config.mqtt.keepalive_multiplier == 10.0
    assert config.mqtt.max_mqueue_len == 0
    assert config.mqtt.session_expiry_interval == 0.0


def test_lenient_spellings_of_numbers_and_booleans() -> None:
    config = load("""
        allow_anonymous = "true"
        mqtt { max_inflight = "64", mqueue_store_qos0 = "false", keepalive_multiplier = 2 }
    """)
    assert config.allow_anonymous is True
    assert config.mqtt.max_inflight == 64
    assert config.mqtt.mqueue_store_qos0 is False
    assert config.mqtt.keepalive_multiplier == 2.0


def test_every_error_is_reported_at_once() -> None:
    text = """
        allow_anonymous = maybe
        mqtt {
          max_inflite = 10
          max_inflight = 0
          max_packet_size = huge
          idle_timeout = never
        }
        listeners.tcp.default { bind = "1.2.3.4", max_connections = -5 }
        listeners.tcp.other { bind = "[::1]:99999", tcp_options.backlog = many }
        log.level = loud
    """
    errors = errors_of(text)
    assert errors == {
        "allow_anonymous": "'maybe' is not a boolean (true or false)",
        "mqtt.max_inflite": "unknown key (did you mean max_inflight?)",
        "mqtt.max_inflight": "0 is out of range (allowed: 1 to 65535)",
        "mqtt.max_packet_size": "'huge' is not a size (e.g. 1MB, 64KB, 512B; a bare integer is bytes)",
        "mqtt.idle_timeout":
            "'never' is not a duration (e.g. 15s, 100ms, 2h, 1h30m; a bare integer is milliseconds)",
        "listeners.tcp.default.bind": "'1.2.3.4' is not HOST:PORT (e.g. \"0.0.0.0:1883\")",
        "listeners.tcp.default.max_connections": "-5 is out of range (allowed: 1 or more, or infinity)",
        "listeners.tcp.other.bind": "'[::1]:99999' is out of range (allowed port: 0 to 65535)",
        "listeners.tcp.other.tcp_options.backlog": "'many' is not an integer",
        "log.level": "'loud' is not one of: debug, info, warning, error",
    }


def test_config_error_text_is_one_line_per_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load("mqtt.max_inflight = 0\nlisteners.tcp.default.bind = \"1.2.3.4\"")
    assert str(caught.value).splitlines() == [
        "mqtt.max_inflight: 0 is out of range (allowed: 1 to 65535)",
        "listeners.tcp.default.bind: '1.2.3.4' is not HOST:PORT (e.g. \"0.0.0.0:1883\")",
    ]
    assert caught.value.source == "<text>"


# --------------------------------------------------------------------------
# Environment overrides


def test_env_overrides_a_bind() -> None:
    config = load_config(SHIPPED, env={"BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND": "0.0.0.0:9883"})
    listener = config.listeners.tcp["default"]
    assert listener.bind == Bind("0.0.0.0", 9883)
    assert listener.allow_anonymous is True  # the rest of the block stays


@pytest.mark.parametrize(("value", "bind"), [
    ("[::1]:9883", Bind("::1", 9883)),
    ('"[::1]:9883"', Bind("::1", 9883)),
    ("9883", Bind("0.0.0.0", 9883)),
    ("localhost:9883", Bind("localhost", 9883)),
])
def test_env_bind_values_need_no_quoting(value: str, bind: Bind) -> None:
    config = load("", env={"BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND": value})
    assert config.listeners.tcp["default"].bind == bind


def test_env_values_are_hocon_values() -> None:
    config = load("mqtt.max_inflight = 10\nallow_anonymous = true", env={
        "BASTIONMQ_MQTT__MAX_INFLIGHT": "64",
        "BASTIONMQ_MQTT__IDLE_TIMEOUT": "30s",
        "BASTIONMQ_MQTT__MAX_PACKET_SIZE": "64KB",
        "BASTIONMQ_MQTT__KEEPALIVE_MULTIPLIER": "2.5",
        "BASTIONMQ_ALLOW_ANONYMOUS": "false",
        "BASTIONMQ_LOG__LEVEL": '"debug"',
        "BASTIONMQ_LISTENERS__TCP__LAN__MAX_CONNECTIONS": "infinity",
    })
    assert config.mqtt.max_inflight == 64
    assert config.mqtt.idle_timeout == 30.0
    assert config.mqtt.max_packet_size == 65536
    assert config.mqtt.keepalive_multiplier == 2.5
    assert config.allow_anonymous is False
    assert config.log.level == "debug"
    assert config.listeners.tcp["lan"] == TcpListenerConfig()


def test_env_block_merges_and_deeper_variables_win() -> None:
    config = load("mqtt.max_awaiting_rel = 7", env={
        "BASTIONMQ_MQTT": "{max_inflight = 5, max_topic_levels = 9}",
        "BASTIONMQ_MQTT__MAX_INFLIGHT": "6",
    })
    assert config.mqtt.max_inflight == 6
    assert config.mqtt.max_topic_levels == 9
    assert config.mqtt.max_awaiting_rel == 7


def test_env_unknown_key_names_the_variable() -> None:
    assert errors_of("", env={"BASTIONMQ_MQTT__MAX_INFLITE": "10"}) == {
        "mqtt.max_inflite":
            "unknown key (did you mean max_inflight?) (set by BASTIONMQ_MQTT__MAX_INFLITE)"}
    assert errors_of("", env={"BASTIONMQ_NOPE__DEEPER__STILL": "1"}) == {
        "nope": "unknown key (did you mean node?) (set by BASTIONMQ_NOPE__DEEPER__STILL)"}


def test_env_bad_value_names_the_variable() -> None:
    errors = errors_of("", env={
        "BASTIONMQ_MQTT__MAX_INFLIGHT": "abc",
        "BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND": "1.2.3.4",
    })
    assert errors == {
        "mqtt.max_inflight": "'abc' is not an integer (set by BASTIONMQ_MQTT__MAX_INFLIGHT)",
        "listeners.tcp.default.bind":
            "'1.2.3.4' is not HOST:PORT (e.g. \"0.0.0.0:1883\") "
            "(set by BASTIONMQ_LISTENERS__TCP__DEFAULT__BIND)",
    }


def test_errors_from_the_file_do_not_blame_the_environment() -> None:
    errors = errors_of("mqtt.max_inflight = 0", env={"BASTIONMQ_MQTT__MAX_AWAITING_REL": "5"})
    assert errors == {"mqtt.max_inflight": "0 is out of range (allowed: 1 to 65535)"}


def test_env_malformed_variable_name() -> None:
    errors = errors_of("", env={"BASTIONMQ_MQTT____MAX_INFLIGHT": "1"})
    assert list(errors) == ["BASTIONMQ_MQTT____MAX_INFLIGHT"]
    assert "double underscore" in errors["BASTIONMQ_MQTT____MAX_INFLIGHT"]


def test_env_ignores_other_variables() -> None:
    config = load("", env={"PATH": "/usr/bin", "bastionmq_mqtt__max_inflight": "0",
                           "OTHER_MQTT__MAX_INFLIGHT": "0"})
    assert config == resolve_data_dir(Config())


def test_env_none_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTIONMQ_MQTT__MAX_INFLIGHT", "77")
    assert load_config().mqtt.max_inflight == 77
    assert load_config(env={}).mqtt.max_inflight == 32


# --------------------------------------------------------------------------
# Reading files


def test_path_and_text_read_the_same(tmp_path: Path) -> None:
    text = 'listeners.tcp.default { bind = "127.0.0.1:1999" }\nmqtt.max_inflight = 3\n'
    conf = tmp_path / "bastionmq.conf"
    conf.write_text(text)
    assert load_config(conf, env=NO_ENV) == load_config(str(conf), env=NO_ENV) == load(text)


def test_path_and_text_together_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        load_config(tmp_path / "x.conf", text="", env=NO_ENV)


def test_includes_are_relative_to_the_including_file(tmp_path: Path) -> None:
    (tmp_path / "mqtt.conf").write_text("mqtt.max_inflight = 5\n")
    conf = tmp_path / "main.conf"
    conf.write_text('include "mqtt.conf"\nallow_anonymous = true\n')
    config = load_config(conf, env=NO_ENV)
    assert config.mqtt.max_inflight == 5
    assert config.allow_anonymous is True


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, env=NO_ENV)
    assert caught.value.errors == [
        (str(missing), "cannot read the config file: No such file or directory")]
    assert str(caught.value).startswith(str(missing))


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    conf = tmp_path / "latin1.conf"
    conf.write_bytes("log.level = \"d\xe9bug\"\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(conf, env=NO_ENV)
    where, message = caught.value.errors[0]
    assert where == str(conf)
    assert "not UTF-8" in message


def test_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "broken.conf"
    conf.write_text("mqtt {\n  max_inflight = 10\n  max_awaiting_rel = = 5\n}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(conf, env=NO_ENV)
    [(where, message)] = caught.value.errors
    assert where == str(conf)
    assert message.startswith("line 3, col ")
    assert "syntax error" in message
    assert len(message) < 200  # no grammar dump


def test_unclosed_block_is_a_syntax_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load("listeners.tcp.default {\n  bind = 1883\n")
    [(where, message)] = caught.value.errors
    assert where == "<text>"
    assert "line 3" in message and "syntax error" in message


def test_unquoted_ipv6_bind_is_a_syntax_error() -> None:
    with pytest.raises(ConfigError, match="syntax error"):
        load("listeners.tcp.default.bind = [::1]:1883")


def test_unresolved_substitution() -> None:
    with pytest.raises(ConfigError) as caught:
        load("mqtt.max_inflight = ${nowhere}")
    [(where, message)] = caught.value.errors
    assert where == "<text>"
    assert "${nowhere}" in message


def test_a_list_is_not_a_config() -> None:
    with pytest.raises(ConfigError, match="not a list"):
        load("[1, 2]")


def test_config_classes_are_frozen() -> None:
    config = Config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.allow_anonymous = True  # type: ignore[misc]


def test_server_keepalive_is_seconds_or_disabled() -> None:
    assert load("mqtt.server_keepalive = disabled").mqtt.server_keepalive is None
    assert load("mqtt.server_keepalive = 30").mqtt.server_keepalive == 30
    assert errors_of("mqtt.server_keepalive = 0") == {
        "mqtt.server_keepalive": "0 is out of range (allowed: 1 to 65535, or disabled)"}


def test_max_qos_allowed_choices() -> None:
    assert load("mqtt.max_qos_allowed = 1").mqtt.max_qos_allowed == 1
    assert errors_of("mqtt.max_qos_allowed = 3") == {
        "mqtt.max_qos_allowed": "3 is not one of: 0, 1, 2"}


# --------------------------------------------------------------------------
# node.data_dir: chosen when not configured (bastionmq.data_dir)


def test_a_configured_data_dir_always_wins(tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    (project / "etc").mkdir(parents=True)
    (project / "etc" / "bastionmq.conf").write_text("")
    monkeypatch.chdir(project)
    config = load('node.data_dir = "/srv/mqtt"')
    assert config.node.data == DataDir("/srv/mqtt", "node.data_dir", configured=True)
    assert config.node.auth_database == "/srv/mqtt/auth.sqlite3"
    assert config.durable_sessions.database == "/srv/mqtt/sessions.sqlite3"
    assert config.listeners.ssl == {}


@pytest.mark.parametrize("euid", [0, 1000])
def test_the_data_dir_rule(tmp_path, euid) -> None:
    project = tmp_path / "project"
    (project / "etc").mkdir(parents=True)
    (project / "etc" / "bastionmq.conf").write_text("")
    home = {"HOME": str(tmp_path / "home")}
    assert choose(None, cwd=str(project), env=home, euid=euid).path == "data"
    assert "etc/bastionmq.conf is in the working directory" in \
        choose(None, cwd=str(project), env=home, euid=euid).reason
    elsewhere = str(tmp_path)
    xdg = choose(None, cwd=elsewhere, env={**home, "XDG_DATA_HOME": str(tmp_path / "xdg")},
                 euid=euid)
    assert xdg.path == str(tmp_path / "xdg" / "bastionmq")
    # A relative XDG_DATA_HOME is invalid (XDG specification) and ignored.
    plain = choose(None, cwd=elsewhere, env={**home, "XDG_DATA_HOME": "rel"}, euid=euid)
    if euid == 0:
        assert plain == DataDir("/var/lib/bastionmq", "system default for root: no data_dir "
                                "configured and not run from a project directory")
    else:
        assert plain == DataDir(str(tmp_path / "home" / ".local" / "share" / "bastionmq"),
                                "per-user default: no data_dir configured and not run from a "
                                "project directory")
    assert plain.describe() == f"data_dir {plain.path} ({plain.reason})"


def test_the_development_pki_defaults_follow_the_data_dir_but_written_paths_stay() -> None:
    config = load("""
node.data_dir = "/srv/mqtt"
listeners.ssl.default { ssl_options { verify = verify_peer } }
listeners.wss.default { ssl_options { cacertfile = "data/certs/ca.pem" } }
http_api { ssl_options { keyfile = "k.pem" } }
durable_sessions { data_dir = "/srv/store" }
""")
    ssl = config.listeners.ssl["default"].ssl_options
    assert (ssl.cacertfile, ssl.certfile, ssl.keyfile) == (
        "/srv/mqtt/certs/ca.pem", "/srv/mqtt/certs/server.pem", "/srv/mqtt/certs/server.key")
    assert config.node.pki_dir == "/srv/mqtt/certs"
    assert ssl.awaits_dev_pki(config.node.pki_dir)
    wss = config.listeners.wss["default"].ssl_options
    assert (wss.cacertfile, wss.certfile) == ("data/certs/ca.pem", "/srv/mqtt/certs/server.pem")
    api = config.http_api.ssl_options
    assert api is not None and (api.certfile, api.keyfile) == ("/srv/mqtt/certs/server.pem",
                                                               "k.pem")
    assert config.durable_sessions.database == "/srv/store/sessions.sqlite3"


def test_the_choice_is_not_a_key_of_the_file() -> None:
    assert errors_of("node.chosen = x") == {"node.chosen": "unknown key (known keys: data_dir, workers)"}


def test_an_invalid_file_still_gives_the_rest_for_checking_its_files() -> None:
    with pytest.raises(ConfigError) as caught:
        load("""
mqtt.max_inflight = 0
authentication = [
  { mechanism = password_based, backend = password_file, path = "/a" }
  { mechanism = bogus }
  { mechanism = password_based, backend = password_file, path = "/c" }
]
""")
    error = caught.value
    assert [where for where, _ in error.errors] == ["mqtt.max_inflight",
                                                    "authentication.1.mechanism"]
    partial = error.partial
    assert partial is not None
    assert partial.mqtt.max_inflight == MqttSettings().max_inflight
    # The broken entry is disabled in place: its siblings keep their indexes.
    assert [(entry.enable, entry.path) for entry in partial.authentication] == [
        (True, "/a"), (False, "/a"), (True, "/c")]
    assert "authentication.1" in error.unchecked
