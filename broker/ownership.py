"""Who a session belongs to, and the client facts kept with it.

A session is bound to the identity that made it: its username, and the
certificate (or TLS-PSK identity) the listener verified, when there is one.
Another identity presenting the same client id does not get it (see
``BrokerCore.session_refused``).

Durable sessions and wills keep the facts authorization needs (listener,
address, superuser flag, certificate) as one JSON record, so that a will
published after a restart is authorized as its client would have been.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Callable

from .ports import CertificateFacts, ClientInfo, PeerCertificate, PeerInfo

#: Where a client restored without its facts (a store written before they were
#: kept) was last connected: unknown.
RESTORED_PEER = PeerInfo(listener="restored")


def owner_of(client: ClientInfo) -> str:
    """The identity a session made by ``client`` belongs to."""
    peer = client.peer
    certificate = peer.certificate
    if certificate is not None:
        subject = certificate.subject
        # None: a load balancer verified it and passed on its common name only.
        proof = ("cert:" + subject) if subject is not None else \
            f"cert-cn:{certificate.common_name}"
    elif peer.psk_identity is not None:
        proof = "psk:" + peer.psk_identity
    else:
        proof = None
    # Interned: the sessions of one identity (every anonymous client, say)
    # share one string.
    return sys.intern(json.dumps([client.username, proof]))


def same_owner(owner: str | None, username: str | None, client: ClientInfo) -> bool:
    """Whether ``client`` is who a session belongs to. ``owner`` None: only
    the username is known (a store written before owners were kept)."""
    if owner is None:
        return username == client.username
    return owner == owner_of(client)


def client_record(client: ClientInfo) -> str:
    """The facts of ``client`` a durable session or will keeps."""
    peer = client.peer
    return json.dumps({
        "owner": owner_of(client),
        "listener": peer.listener,
        "address": list(peer.address) if peer.address else None,
        "superuser": client.superuser,
        "tls": peer.tls,
        "certificate": (base64.b64encode(peer.certificate.der).decode()
                        if peer.certificate is not None and peer.certificate.der else None),
        # A certificate known by its common name only (a load balancer's).
        "certificate_cn": (peer.certificate.common_name
                           if peer.certificate is not None and not peer.certificate.der
                           else None),
        "psk_identity": peer.psk_identity,
    })


def client_from_record(client_id: str, username: str | None, record: str | None,
                       parse: Callable[[bytes], CertificateFacts] | None
                       ) -> tuple[ClientInfo, str | None]:
    """The client a stored record describes, and its owner (None for a
    record without facts)."""
    if record is None:
        return ClientInfo(client_id=client_id, username=username, peer=RESTORED_PEER), None
    facts = json.loads(record)
    der = facts["certificate"]
    certificate = None
    if der is not None and parse is not None:
        certificate = PeerCertificate(base64.b64decode(der), parse)
    elif facts.get("certificate_cn") is not None:
        certificate = PeerCertificate.known(
            CertificateFacts(subject=None, common_name=facts["certificate_cn"]))
    address = facts["address"]
    peer = PeerInfo(listener=facts["listener"], address=tuple(address) if address else None,
                    tls=facts["tls"], certificate=certificate,
                    psk_identity=facts["psk_identity"])
    client = ClientInfo(client_id=client_id, username=username, peer=peer,
                        superuser=facts["superuser"])
    return client, facts["owner"]
