"""What ``bastionmq check-config`` says about each TLS listener: the policy
it will apply, in an operator's words, and the traps in its settings; and
about WebSocket listeners open to anonymous pages of any site."""

from __future__ import annotations


import attrs

from bastionmq.config import (
    TLS_KINDS, Config, SslListenerConfig, WsListenerConfig, WssListenerConfig,
)
from bastionmq.listeners.tls_context import (
    TlsSetupError, expiry_warnings, load_material, missing_files, ssl_options_path,
)



@attrs.define(slots=True)
class TlsReport:
    lines: list[str] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)
    #: (key path, message): what would stop the broker from starting.
    errors: list[tuple[str, str]] = attrs.field(factory=list)


def report(config: Config) -> TlsReport:
    result = TlsReport()
    for kind, name, block in config.enabled_listeners():
        if kind in TLS_KINDS:
            assert isinstance(block, SslListenerConfig)  # the block of an ssl or wss listener
            _describe(config, kind, name, block, result)
        if kind in ("ws", "wss"):
            assert isinstance(block, (WsListenerConfig, WssListenerConfig))
            if block.websocket.check_origin_enable is False and config.anonymous_allowed(block):
                result.warnings.append(
                    f"{kind}:{name}: anonymous access without an Origin check: any web page in "
                    "a browser that can reach the listener may use it "
                    "(websocket.check_origin_enable)")
    return result


def _describe(config: Config, kind: str, name: str, block: SslListenerConfig,
              result: TlsReport) -> None:
    options = block.ssl_options
    listener = f"{kind}:{name}"
    lines = result.lines
    lines.append(f"{listener} {block.bind}")
    lines.append(f"  versions: {', '.join(options.versions)}"
                 + (f"; ciphers: {', '.join(options.ciphers)}" if options.ciphers else ""))
    if options.verify == "verify_peer":
        demand = "required" if options.fail_if_no_peer_cert else "requested, optional"
        lines.append(f"  client certificates: {demand}, verified against {options.cacertfile}"
                     f" (depth {options.depth}"
                     + (", partial chains" if options.partial_chain else "")
                     + (f", extended key usage {options.verify_peer_ext_key_usage}"
                        if options.verify_peer_ext_key_usage else "") + ")")
    else:
        lines.append("  client certificates: not requested (verify_none)")
    username, clientid, mode = config.peer_cert_identity_of(block)
    if username == clientid == "disabled":
        lines.append("  identity: username and client id as the client sends them")
    else:
        lines.append(f"  identity ({mode}): username from {_source(username)}, "
                     f"client id from {_source(clientid)}")
    if options.enable_crl_check:
        files = ", ".join(options.crlfile) or "none"
        policy = "soft fail" if config.crl_cache.soft_fail else "hard fail"
        lines.append(f"  revocation: CRL files {files}; distribution points fetched "
                     f"(refresh {config.crl_cache.refresh_interval:g}s, {policy})")
    elif not options.ocsp.enable_client_check:
        lines.append("  revocation: not checked")
    ocsp = options.ocsp
    if ocsp.enable_client_check:
        responder = ocsp.responder_url or "the one each certificate names"
        policy = "soft fail" if ocsp.soft_fail else "hard fail"
        lines.append(f"  OCSP: client certificates checked with {responder} (answers held "
                     f"until their nextUpdate, at most {ocsp.cache_capacity}; connected "
                     f"clients checked again every {ocsp.refresh:g}s; {policy})")
    if ocsp.enable_stapling:
        lines.append(f"  OCSP stapling: the status of {options.certfile} from "
                     f"{ocsp.responder_url or 'the responder it names'}, fetched every "
                     f"{ocsp.refresh_interval:g}s")
    if config.psk_authentication.enable and any("PSK" in c for c in options.ciphers):
        lines.append(f"  PSK: served, identities from {config.psk_authentication.init_file}")
    if options.server_names:
        names = ", ".join(n for entry in options.server_names for n in entry.names)
        lines.append(f"  SNI certificates for: {names}")

    def warn(message: str) -> None:
        result.warnings.append(f"{listener}: {message}")

    if options.verify != "verify_peer" and (username != "disabled" or clientid != "disabled"):
        warn("certificate identity is configured but the listener does not verify client "
             "certificates (verify_none), so no client has one")
    legacy = [version for version in options.versions if version in ("tlsv1", "tlsv1.1")]
    if legacy:
        warn(f"{', '.join(legacy)} enabled: these versions are deprecated and weak")
    if options.verify == "verify_peer" and not options.fail_if_no_peer_cert and \
            config.anonymous_allowed(block):
        warn("clients without a certificate are let in anonymously "
             "(fail_if_no_peer_cert = false and allow_anonymous = true)")
    pki_dir = config.node.pki_dir
    if options.awaits_dev_pki(pki_dir):
        lines.append(f"  files: the development PKI, made on first start in {pki_dir}/")
        return
    where = ssl_options_path(kind, name)
    # Every missing file at once; loading stops at the first problem, so it
    # only runs when all of them are there.
    missing = missing_files(options, config.psk_authentication)
    for problem in missing:
        error = (problem.key_path(where), str(problem))
        if error not in result.errors:  # the PSK file is shared by every listener
            result.errors.append(error)
    if missing:
        return
    try:
        load_material(options, config.crl_cache, config.psk_authentication)
    except TlsSetupError as exc:
        result.errors.append((exc.key_path(where), str(exc)))
        return
    for line in expiry_warnings(options):
        warn(line)


def _source(source: str) -> str:
    return "what the client sends" if source == "disabled" else f"the certificate's {source}"
