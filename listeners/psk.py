"""TLS-PSK contexts, through sslpsk3: an optional extra (``pip install
'bastionmq[psk]'``), since it has no wheel for every Python and building it
needs a compiler and OpenSSL's headers. Imported only when a listener serves
PSK (listeners.tls_context.build_context)."""

from __future__ import annotations

import ssl

from sslpsk3 import SSLPSKContext


class PskContext(SSLPSKContext):
    """A context serving TLS-PSK. Its callbacks are set up once per
    connection by the listener: sslpsk3's own SSLObject would set them again
    on every do_handshake call, restarting a handshake that arrives in
    several reads."""

    sslobject_class = ssl.SSLObject
