"""The settings of listeners, beside the code that uses them: the address to
listen on (``bind``), socket options
(``tcp_options``), TLS (``ssl_options``, ``crl_cache``, ``psk_authentication``)
and WebSocket (``websocket``), with EMQX's names and defaults.
bastionmq.config composes them into the listener blocks of the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

import attrs
from attrs import validators as v

from bastionmq.broker.settings import SIZE
from bastionmq.units import show_value


ALL_INTERFACES = "0.0.0.0"
_BIND_HINT = 'is not HOST:PORT (e.g. "0.0.0.0:1883")'
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@attrs.define(slots=True, frozen=True)
class Bind:
    """An address to listen on. The host is kept without IPv6 brackets."""

    host: str
    #: 0 asks the system for a free port (used by tests and embedding).
    port: int = attrs.field(validator=[v.ge(0), v.le(65535)])

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, value: str | int) -> Bind:
        """Read ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or a bare port.

        A bare port (integer or digits) and ``:PORT`` listen on all IPv4
        interfaces, as in EMQX. Raises ValueError with a message for an
        operator.
        """
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{show_value(value)} {_BIND_HINT}")
        if isinstance(value, int):
            return cls(ALL_INTERFACES, _checked_port(value, value))
        text = value.strip()
        if text.isdigit():
            return cls(ALL_INTERFACES, _checked_port(int(text), value))
        if text.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text)
            if not match:
                raise ValueError(f"{show_value(value)} {_BIND_HINT}")
            host = match[1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{show_value(value)} has an invalid IPv6 address: {host!r}") from None
            return cls(host, _checked_port(int(match[2]), value))
        host, separator, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(
                f"{show_value(value)} {_BIND_HINT}; an IPv6 address goes in brackets, "
                'e.g. "[::1]:1883"')
        if not separator or not port.isdigit():
            raise ValueError(f"{show_value(value)} {_BIND_HINT}")
        if not host:
            host = ALL_INTERFACES
        elif not _valid_host(host):
            raise ValueError(f"{show_value(value)} has an invalid host: {host!r}")
        return cls(host, _checked_port(int(port), value))


def _checked_port(port: int, given: Any) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"{show_value(given)} is out of range (allowed port: 0 to 65535)")
    return port


def _valid_host(host: str) -> bool:
    # All-numeric dotted names must be real IPv4 addresses: "999.1.1.1" is a
    # typo, not a host name.
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME_RE.fullmatch(host))


@attrs.define(slots=True, frozen=True, kw_only=True)
class TcpOptions:
    """Socket options of a listener (EMQX ``tcp_options``)."""

    #: Pending connections the kernel queues before accept().
    backlog: int = attrs.field(default=1024, validator=[v.ge(1), v.le(65535)])
    #: TCP_NODELAY: send small packets at once instead of batching them.
    nodelay: bool = True
    #: Write buffer level above which a client's transport is full: QoS 1/2
    #: messages to it are queued, QoS 0 hold their publisher back (dropped
    #: once the client is a slow subscriber).
    high_watermark: int = attrs.field(default=1024 * 1024, metadata=SIZE, validator=v.ge(1))


#: TLS versions by EMQX's names, newest first.
TLS_VERSIONS = ("tlsv1.3", "tlsv1.2", "tlsv1.1", "tlsv1")
#: The development PKI ``bastionmq certs init`` writes, and the broker makes
#: on first start when these defaults are configured and missing. The
#: configuration moves these defaults into node.data_dir/certs
#: (bastionmq.config.resolve_data_dir); this is where they are written
#: relative to a project directory.
DEV_PKI_DIR = "data/certs"
#: The ssl_options keys whose defaults are the development PKI's files.
DEV_PKI_FILE_KEYS = ("cacertfile", "certfile", "keyfile")


def dev_pki_files(pki_dir: str = DEV_PKI_DIR) -> tuple[str, str, str]:
    """cacertfile, certfile and keyfile of the development PKI in ``pki_dir``."""
    return (f"{pki_dir}/ca.pem", f"{pki_dir}/server.pem", f"{pki_dir}/server.key")


def _tls_versions(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("at least one version is needed")
    unknown = [version for version in value if version not in TLS_VERSIONS]
    if unknown:
        raise ValueError(f"unknown version {unknown[0]!r}; allowed: {', '.join(TLS_VERSIONS)}")


_EKU_NAMES = ("clientAuth", "serverAuth", "codeSigning", "emailProtection", "timeStamping",
              "OCSPSigning")


def _eku(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and value not in _EKU_NAMES and \
            not re.fullmatch(r"\d+(\.\d+)+", value):
        raise ValueError(f"must be one of {', '.join(_EKU_NAMES)} or a dotted OID")


_DEV_PKI_FILES = dev_pki_files()


@attrs.define(slots=True, frozen=True, kw_only=True)
class SniCertificate:
    """A server certificate for the host names a client asks for by SNI."""

    names: tuple[str, ...] = attrs.field(validator=v.min_len(1))
    certfile: str
    keyfile: str
    password: str | None = attrs.field(default=None, repr=False)


def _http_url(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise ValueError('must be an http:// or https:// URL (e.g. "http://ocsp.example.com")')


@attrs.define(slots=True, frozen=True, kw_only=True)
class OcspConfig:
    """A TLS listener's ``ssl_options.ocsp``: client certificates checked
    with their CA's OCSP responder, and the server certificate's status
    stapled to the handshake."""

    #: Ask the responder about each client certificate before its first MQTT byte.
    enable_client_check: bool = False
    #: The responder asked; unset: the one a certificate names (its
    #: authority information access). For stapling, the server certificate's.
    responder_url: str | None = attrs.field(default=None, validator=_http_url)
    #: Time allowed for one request to the responder.
    timeout: float = attrs.field(default=15.0, metadata={"unit": "duration"},
                                 validator=v.gt(0))
    #: How often the certificates of connected clients are asked about again.
    refresh: float = attrs.field(default=300.0, metadata={"unit": "duration"},
                                 validator=v.gt(0))
    #: Answers held (until their nextUpdate), at most.
    cache_capacity: int = attrs.field(default=1000, validator=v.ge(1))
    #: When the responder cannot be reached or answers "unknown": false
    #: refuses the client (hard fail), true lets it in with a warning.
    soft_fail: bool = False
    #: Staple the responder's answer about the server certificate to handshakes.
    enable_stapling: bool = False
    #: The CA certificate (PEM) that issued the server certificate, for stapling.
    issuer_pem: str | None = None
    #: How often the stapled answer is fetched again.
    refresh_interval: float = attrs.field(default=300.0, metadata={"unit": "duration"},
                                          validator=v.gt(0))

    def __attrs_post_init__(self) -> None:
        if self.enable_stapling and not self.issuer_pem:
            raise ValueError("enable_stapling = true needs issuer_pem (the CA certificate "
                             "that issued certfile)")


@attrs.define(slots=True, frozen=True, kw_only=True)
class SslOptions:
    """A TLS listener's ``ssl_options``, with EMQX's names and defaults.

    Relative paths are relative to the directory the broker runs in.
    """

    #: CA certificates that client certificates must chain to (PEM, several allowed).
    cacertfile: str | None = _DEV_PKI_FILES[0]
    #: The server certificate, optionally followed by its intermediate CAs (PEM).
    certfile: str = _DEV_PKI_FILES[1]
    keyfile: str = _DEV_PKI_FILES[2]
    #: Pass phrase of an encrypted keyfile.
    password: str | None = attrs.field(default=None, repr=False)
    #: verify_peer asks clients for a certificate and checks any they send;
    #: verify_none asks for none.
    verify: str = attrs.field(default="verify_none", validator=v.in_(("verify_peer", "verify_none")))
    #: With verify_peer: refuse the handshake of a client without a certificate.
    fail_if_no_peer_cert: bool = False
    versions: tuple[str, ...] = attrs.field(default=("tlsv1.3", "tlsv1.2"), validator=_tls_versions)
    #: Cipher suites by OpenSSL or IANA name, TLS 1.2 and 1.3 alike; empty
    #: keeps OpenSSL's defaults.
    ciphers: tuple[str, ...] = ()
    #: Prefer the server's order of cipher suites to the client's.
    honor_cipher_order: bool = True
    #: Most intermediate certificates between a client certificate and a
    #: trusted CA (EMQX's depth).
    depth: int = attrs.field(default=10, validator=[v.ge(0), v.le(100)])
    #: A client that has not completed the handshake by then is dropped.
    handshake_timeout: float = attrs.field(default=15.0, metadata={"unit": "duration"},
                                           validator=v.gt(0))
    #: Whether clients may resume TLS sessions (session tickets).
    reuse_sessions: bool = True
    #: Check client certificates against CRLs: those in crlfile and those
    #: fetched from the certificates' distribution points (see crl_cache).
    enable_crl_check: bool = False
    #: CRL files (PEM, several CRLs per file allowed, or DER): one or a list.
    crlfile: tuple[str, ...] = ()
    #: Close a client's connection when its certificate's validity ends.
    enforce_cert_lifetime: bool = False
    #: Accept a chain that ends at any certificate in cacertfile, an
    #: intermediate CA included, not only at a self-signed root.
    partial_chain: bool = False
    #: An extended key usage client certificates must carry (clientAuth, or a
    #: dotted OID); unset accepts any certificate fit for client use.
    verify_peer_ext_key_usage: str | None = attrs.field(default=None, validator=_eku)
    #: Further server certificates, each chosen when a client asks for one of
    #: its names by SNI; other clients get certfile.
    server_names: tuple[SniCertificate, ...] = ()
    #: The PSK identity hint sent to clients (with psk_authentication).
    psk_hint: str | None = None
    #: How often certfile, keyfile, cacertfile and crlfile are checked for
    #: changes, which are then loaded without a restart (also on SIGHUP); 0s
    #: checks only on SIGHUP.
    watch_interval: float = attrs.field(default=2.0, metadata={"unit": "duration"},
                                        validator=v.ge(0))
    #: OCSP: client certificate checks and stapling.
    ocsp: OcspConfig = attrs.field(factory=OcspConfig)

    def awaits_dev_pki(self, pki_dir: str = DEV_PKI_DIR) -> bool:
        """Whether these options name the files of the development PKI in
        ``pki_dir`` (node.data_dir/certs) and none of them exists yet: the
        first start makes that PKI."""
        files = (self.cacertfile, self.certfile, self.keyfile)
        return files == dev_pki_files(pki_dir) and not any(os.path.exists(path) for path in files)

    def __attrs_post_init__(self) -> None:
        if self.fail_if_no_peer_cert and self.verify != "verify_peer":
            raise ValueError("fail_if_no_peer_cert = true needs verify = verify_peer")
        if self.enable_crl_check and self.verify != "verify_peer":
            raise ValueError("enable_crl_check = true needs verify = verify_peer")
        if self.ocsp.enable_client_check and self.verify != "verify_peer":
            raise ValueError("ocsp.enable_client_check = true needs verify = verify_peer")
        if self.verify == "verify_peer" and not self.cacertfile:
            raise ValueError("verify = verify_peer needs a cacertfile to verify clients against")


#: What a WebSocket client may name in Sec-WebSocket-Protocol (EMQX's default).
WS_SUBPROTOCOLS = ("mqtt", "mqtt-v3", "mqtt-v3.1.1", "mqtt-v5")


def _url_path(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value.startswith("/") or any(c in value for c in "?# ") or not value.isascii():
        raise ValueError('must be a URL path starting with "/" (e.g. "/mqtt")')


def _networks(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network "
                             '(e.g. "10.0.0.5", "10.0.0.0/8", "::1")') from None


#: The default of a listener's proxy_protocol_trusted: any address.
ANY_ADDRESS = ("0.0.0.0/0", "::/0")


def proxy_sources(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    """Validates proxy_protocol_trusted: addresses or networks, at least one."""
    if not value:
        raise ValueError('at least one address or network is needed (any address: '
                         '["0.0.0.0/0", "::/0"], the default)')
    _networks(instance, attribute, value)


def _subprotocols(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("at least one subprotocol is needed (MQTT clients name mqtt)")


def _header_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value and not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError("must be an HTTP header name (or empty to ignore the header)")


def _required_header_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError("must be an HTTP header name")


#: How a reverse proxy writes the client certificate into its header:
#: xfcc, Envoy's X-Forwarded-Client-Cert (its Cert element); pem_escaped,
#: the URL-encoded PEM of nginx's $ssl_client_escaped_cert.
CLIENT_CERT_FORMATS = ("xfcc", "pem_escaped")


@attrs.define(slots=True, frozen=True, kw_only=True)
class ProxyClientCertOptions:
    """A WebSocket listener's ``websocket.proxy_client_cert`` block: the
    client certificate a TLS-terminating reverse proxy verified, forwarded
    in a header of the upgrade request (listeners.forwarded_cert)."""

    enable: bool = False
    #: The header holding the certificate.
    header: str = attrs.field(default="x-forwarded-client-cert",
                              validator=_required_header_name)
    format: str = attrs.field(default="xfcc", validator=v.in_(CLIENT_CERT_FORMATS))
    #: A header holding the proxy's verification result (nginx's
    #: $ssl_client_verify); the certificate counts only when it says
    #: SUCCESS. Empty: not read.
    verify_header: str = attrs.field(default="", validator=_header_name)
    #: The proxies (addresses or networks) whose header is believed: the
    #: address the request arrives from must be one of them. No default: a
    #: header is trivially forged by anyone else.
    trusted: tuple[str, ...] = attrs.field(default=(), validator=_networks)

    def __attrs_post_init__(self) -> None:
        if self.enable and not self.trusted:
            raise ValueError("enable = true needs trusted (the addresses or networks of the "
                             'proxies that set the header, e.g. ["10.0.0.5/32"]): anyone '
                             "else could forge it")


@attrs.define(slots=True, frozen=True, kw_only=True)
class WebSocketOptions:
    """A WebSocket listener's ``websocket`` block, with EMQX's names and defaults."""

    #: The URL path clients connect to (ws://host:8083/mqtt); other paths get 404.
    mqtt_path: str = attrs.field(default="/mqtt", validator=_url_path)
    #: multiple: a WebSocket message the broker sends may hold several MQTT
    #: packets (one message per write); single: one packet per message.
    #: Messages from clients may hold any number either way.
    mqtt_piggyback: str = attrs.field(default="multiple",
                                      validator=v.in_(("single", "multiple")))
    #: Refuse (HTTP 400) an upgrade that names no subprotocol.
    fail_if_no_subprotocol: bool = True
    #: Subprotocols accepted; the first the client names among them is echoed.
    supported_subprotocols: tuple[str, ...] = attrs.field(default=WS_SUBPROTOCOLS,
                                                          validator=_subprotocols)
    #: Refuse (HTTP 403) a browser whose Origin is not in allowed_origins.
    #: Not set: on for a listener that allows anonymous access, so that no
    #: web page can use its visitors' browsers to reach it.
    check_origin_enable: bool | None = None
    #: With check_origin_enable: whether a client sending no Origin (not a
    #: browser) is let in.
    allow_origin_absence: bool = True
    #: Origins allowed with check_origin_enable, e.g. "https://app.example.com";
    #: empty: pages served from this machine (localhost, 127.0.0.1, [::1]).
    allowed_origins: tuple[str, ...] = ()
    #: Headers a reverse proxy puts the client's address and port in; read
    #: only from trusted_proxies. Empty ignores the header.
    proxy_address_header: str = attrs.field(default="x-forwarded-for", validator=_header_name)
    proxy_port_header: str = attrs.field(default="x-forwarded-port", validator=_header_name)
    #: Addresses or networks (CIDR) of the proxies whose headers are believed;
    #: empty believes none.
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), validator=_networks)
    #: Largest frame payload accepted (inflated, with compress); a larger one
    #: closes the connection with 1009. None (infinity in the file): no limit.
    max_frame_size: int | None = attrs.field(
        default=None, metadata={"unit": "size", "none_word": "infinity"},
        validator=v.optional(v.ge(1)))
    #: permessage-deflate, for clients that offer it.
    compress: bool = False
    #: The client certificate a TLS-terminating reverse proxy forwards.
    proxy_client_cert: ProxyClientCertOptions = attrs.field(factory=ProxyClientCertOptions)


@attrs.define(slots=True, frozen=True, kw_only=True)
class CrlCacheConfig:
    """CRLs fetched from distribution points (EMQX ``crl_cache``)."""

    #: How often fetched CRLs are fetched again.
    refresh_interval: float = attrs.field(default=900.0, metadata={"unit": "duration"},
                                          validator=v.gt(0))
    #: Time allowed for one fetch.
    http_timeout: float = attrs.field(default=15.0, metadata={"unit": "duration"},
                                      validator=v.gt(0))
    #: Issuers whose CRLs are held per listener, at most.
    capacity: int = attrs.field(default=100, validator=v.ge(1))
    #: When no current CRL can be had for a client certificate's issuer:
    #: false refuses the client (hard fail), true lets it in with a warning.
    soft_fail: bool = False


@attrs.define(slots=True, frozen=True, kw_only=True)
class PskConfig:
    """TLS-PSK identities (EMQX ``psk_authentication``), served on TLS
    listeners whose ``ciphers`` include PSK suites."""

    enable: bool = False
    #: Lines of identity, separator, key in hex; # starts a comment.
    init_file: str | None = None
    separator: str = attrs.field(default=":", validator=v.min_len(1))

    def __attrs_post_init__(self) -> None:
        if self.enable and not self.init_file:
            raise ValueError("enable = true needs an init_file of identities and keys")
