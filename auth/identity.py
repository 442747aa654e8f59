"""A client's identity from its TLS credentials: its verified certificate,
or the PSK identity whose key it proved.

``peer_cert_as_username`` and ``peer_cert_as_clientid`` (EMQX's names) say
which part of the certificate becomes the username and the client id:

    cn, dn           the subject's common name; the whole subject (RFC 4514)
    crt              the certificate as PEM text
    pem              base64 of the DER encoding (EMQX's meaning)
    md5, sha256      fingerprints of the DER encoding, lowercase hex
    san_dns[:N] ...  the N-th (from 0) subject alternative name of a type:
                     san_dns, san_uri, san_email, san_ip
    spiffe_id        the URI SAN that starts with spiffe://

In ``replace`` mode the certificate's value replaces whatever the client sent,
so a device cannot claim another identity. In ``enforce`` mode a client that
sent a different value is refused (CONNACK 0x85 for the client id, 0x86 for
the username). A client without a certificate keeps what it sent: on
listeners that must know every client, set fail_if_no_peer_cert.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import ssl
from typing import Any, Mapping

import attrs

from bastionmq.broker.logtext import shown
from bastionmq.broker.ports import AuthRequest, AuthResult, PeerCertificate
from bastionmq.broker.properties import Reason

log = logging.getLogger("bastionmq.auth")

_SANS = {"san_dns": "san_dns", "san_uri": "san_uri", "san_email": "san_email",
         "san_ip": "san_ip"}


class NoIdentity(ValueError):
    """The certificate has no usable value for the configured source."""


def certificate_value(certificate: PeerCertificate, source: str) -> str:
    """The identity ``source`` names in ``certificate``; raises NoIdentity."""
    if source in ("crt", "pem", "md5", "sha256") and not certificate.der:
        # Verified by a load balancer, which passed on its common name only.
        raise NoIdentity(f"the certificate's {source} is not known (only its common name "
                         "was passed on)")
    if source == "cn":
        value = certificate.common_name
    elif source == "dn":
        value = certificate.subject
    elif source == "crt":
        return ssl.DER_cert_to_PEM_cert(certificate.der)
    elif source == "pem":
        return base64.b64encode(certificate.der).decode("ascii")
    elif source == "md5":
        return hashlib.md5(certificate.der, usedforsecurity=False).hexdigest()
    elif source == "sha256":
        value = certificate.sha256
    elif source == "spiffe_id":
        value = next((uri for uri in certificate.san_uri if uri.startswith("spiffe://")), None)
    else:
        kind, _, index = source.partition(":")
        values = getattr(certificate, _SANS[kind])
        position = int(index or 0)
        value = values[position] if position < len(values) else None
    if not value:
        raise NoIdentity(f"the certificate has no {source}")
    # Subject fields and SANs are chosen by whoever requested the certificate;
    # control characters in them could forge log lines or bend templates.
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise NoIdentity(f"the certificate's {source} holds control characters")
    return value


@attrs.define(slots=True, frozen=True)
class IdentityRule:
    """One listener's mapping."""

    username: str = "disabled"
    clientid: str = "disabled"
    mode: str = "replace"

    @property
    def active(self) -> bool:
        return self.username != "disabled" or self.clientid != "disabled"


class PeerIdentity:
    """The broker's IdentityPolicy for TLS listeners: a client that proved a
    PSK identity is that user; otherwise each listener's certificate rule."""

    def __init__(self, rules: Mapping[str, IdentityRule]) -> None:
        self._rules = {listener: rule for listener, rule in rules.items() if rule.active}

    def apply(self, request: AuthRequest) -> AuthRequest | AuthResult:
        peer = request.peer
        if peer.psk_identity is not None:
            # The client holds this identity's key: it is that user (as
            # Mosquitto's use_identity_as_username does for PSK).
            return attrs.evolve(request, username=peer.psk_identity)
        rule = self._rules.get(peer.listener)
        certificate = peer.certificate
        if rule is None or certificate is None:
            return request
        changes: dict[str, Any] = {}
        for field, source, refusal in (
                ("username", rule.username, Reason.BAD_USER_NAME_OR_PASSWORD),
                ("client_id", rule.clientid, Reason.CLIENT_IDENTIFIER_NOT_VALID)):
            if source == "disabled":
                continue
            sent = getattr(request, field)
            try:
                value = certificate_value(certificate, source)
            except NoIdentity as exc:
                log.info("refusing client %s from %s on %s: %s (%s for its %s)",
                         shown(request.client_id), peer.host, peer.listener, exc, source, field)
                return AuthResult(refusal)
            if rule.mode == "enforce" and sent and sent != value:
                log.info("refusing client %s from %s on %s: its %s %s is not its "
                         "certificate's %s %s", shown(request.client_id), peer.host,
                         peer.listener, field, shown(sent), source, shown(value))
                return AuthResult(refusal)
            if sent and sent != value:
                log.debug("client %r on %s: %s %r replaced by the certificate's %s %r",
                          request.client_id, peer.listener, field, sent, source, value)
            changes[field] = value
        return attrs.evolve(request, **changes)
