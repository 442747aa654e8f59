"""What ``bastionmq certs`` prints after it has written something: commands
and settings for the listeners the configuration actually has (their hosts
and ports), and for ``revoke``, whether each TLS listener checks that list,
what to change where it does not, and whether a running broker has to
reload to see it."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from bastionmq.config import TLS_KINDS, Config, SslListenerConfig, WssListenerConfig
from bastionmq.listeners.settings import SslOptions
from bastionmq.units import format_duration

__all__ = ["client_hints", "revoke_hints", "server_hints"]

#: How to make a running broker read its files and configuration again.
RELOAD = "kill -HUP <broker pid> or `bastionmq ctl reload`"


def _tls_listeners(config: Config) -> list[tuple[str, str, SslListenerConfig]]:
    found = []
    for kind, name, block in config.enabled_listeners():
        if kind in TLS_KINDS:
            assert isinstance(block, SslListenerConfig)  # the block of an ssl or wss listener
            found.append((kind, name, block))
    return found


def connect_host(block: SslListenerConfig) -> str:
    """The name a client on this machine connects to: a listener on every
    interface is reached as localhost (a name the development server
    certificate carries), any other at the address it is bound to."""
    host = block.bind.host
    return "localhost" if host in ("0.0.0.0", "::") else host


def _port(block: SslListenerConfig) -> str:
    # Port 0 is chosen by the system at each start: nothing to print but a stand-in.
    return str(block.bind.port) if block.bind.port else "PORT"


def _label(kind: str, name: str, block: SslListenerConfig) -> str:
    return f"{kind}:{name} ({connect_host(block)}:{_port(block)})"


def _same_file(first: str | os.PathLike[str] | None, second: str | os.PathLike[str]) -> bool:
    return first is not None and os.path.realpath(first) == os.path.realpath(second)


def _ca_note(options: SslOptions, ca: Path) -> str:
    """A warning when the listener trusts another CA than this PKI's."""
    if options.verify != "verify_peer" or _same_file(options.cacertfile, ca):
        return ""
    return (f"\n    note: it verifies clients against {options.cacertfile}, not this PKI's CA "
            f"{ca}: certificates of this PKI are refused there")


def _no_tls_listener(source: str) -> str:
    return f"no ssl or wss listener is enabled in {source}"


def client_hints(config: Config, source: str, ca: Path, cert: Path, key: Path) -> list[str]:
    """How to connect with a new client certificate to each TLS listener."""
    listeners = _tls_listeners(config)
    if not listeners:
        return [f"{_no_tls_listener(source)}: add one whose ssl_options verify clients "
                f"against {ca} (verify = verify_peer, cacertfile)"]
    lines = ["try it:"]
    for kind, name, block in listeners:
        host, port = connect_host(block), _port(block)
        if kind == "ssl":
            command = ["mosquitto_pub", "-h", host, "-p", port, "--cafile", str(ca),
                       "--cert", str(cert), "--key", str(key), "-t", "test", "-m", "hello"]
            lines.append(f"  {shlex.join(command)}")
        else:
            path = block.websocket.mqtt_path if isinstance(block, WssListenerConfig) else "/mqtt"
            lines.append(f"  wss://{host}:{port}{path} ({kind}:{name}) with the same "
                         "certificate and key, trusting the CA above")
        note = _ca_note(block.ssl_options, ca)
        if note:
            lines.append(f"  {kind}:{name}:{note.strip()}")
    return lines


def server_hints(config: Config, source: str, ca: Path, cert: Path, key: Path,
                 hosts: tuple[str, ...]) -> list[str]:
    """How to serve a new server certificate, and check it, on each TLS listener."""
    listeners = _tls_listeners(config)
    names = ", ".join(f'"{host}"' for host in hosts)
    entry = f'{{ names = [{names}], certfile = "{cert}", keyfile = "{key}" }}'
    if not listeners:
        return [f"{_no_tls_listener(source)}; in one, serve it with ssl_options "
                f'{{ certfile = "{cert}", keyfile = "{key}" }}']
    lines = []
    for kind, name, block in listeners:
        key_path = f"listeners.{kind}.{name}.ssl_options"
        port = _port(block)
        lines += [
            f"{_label(kind, name, block)}: to serve it to clients asking for {', '.join(hosts)} "
            "(SNI), beside the listener's own certificate:",
            f"  {key_path}.server_names = [ {entry} ]",
            f'  or as its only certificate: {key_path} {{ certfile = "{cert}", '
            f'keyfile = "{key}" }}',
            f"  then {RELOAD} (no restart needed); check it with",
            f"  openssl s_client -connect {connect_host(block)}:{port} "
            f"-servername {shlex.quote(hosts[0])} -CAfile {shlex.quote(str(ca))} </dev/null",
        ]
    return lines


def revoke_hints(config: Config, source: str, crl: Path, ca: Path) -> list[str]:
    """For each TLS listener: whether it checks ``crl``, what to change where
    it does not, and whether a running broker must reload to see it."""
    listeners = _tls_listeners(config)
    quoted = f'"{crl}"'
    if not listeners:
        return [f"{_no_tls_listener(source)}: nothing checks this list yet; a listener does "
                f"with ssl_options {{ verify = verify_peer, enable_crl_check = true, "
                f"crlfile = {quoted} }}"]
    lines = []
    for kind, name, block in listeners:
        options = block.ssl_options
        key_path = f"listeners.{kind}.{name}.ssl_options"
        label = _label(kind, name, block)
        then = f"\n    then {RELOAD}: ssl_options changes apply without a restart"
        if options.verify != "verify_peer":
            line = (f"{label}: does not check it: it asks for no client certificate "
                    f"(verify = verify_none). To check it, set in {key_path}: "
                    f"verify = verify_peer, enable_crl_check = true, crlfile = {quoted}" + then)
        elif not options.enable_crl_check:
            line = (f"{label}: does not check it (enable_crl_check = false). To check it, set "
                    f"in {key_path}: enable_crl_check = true, crlfile = {quoted}" + then)
        elif not any(_same_file(path, crl) for path in options.crlfile):
            files = ", ".join(f'"{path}"' for path in (*options.crlfile, str(crl)))
            line = (f"{label}: checks CRLs, but not this file. To check it, set "
                    f"{key_path}.crlfile = [{files}]" + then)
        elif options.watch_interval > 0:
            line = (f"{label}: checks it. A running broker loads it within "
                    f"{format_duration(options.watch_interval)} by itself "
                    f"(ssl_options.watch_interval) and closes the connections of revoked "
                    f"certificates; {RELOAD} does it at once")
        else:
            line = (f"{label}: checks it, but a running broker must reload to see it "
                    f"(ssl_options.watch_interval = 0s): {RELOAD}; that also closes the "
                    "connections of revoked certificates")
        lines.append(line + _ca_note(options, ca))
    return lines
