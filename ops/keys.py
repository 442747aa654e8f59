"""Management API keys: made here, shown once, stored as a hash.

A key is 256 random bits; a plain SHA-256 of it is what the built-in
database keeps (a slow password hash buys nothing against a guess of 256
bits, and would cost every request milliseconds).
"""

from __future__ import annotations

import contextvars
import hashlib
import secrets

#: Lets an operator (and a secret scanner) recognise a key in a file or a log.
PREFIX = "bmq_"

#: Roles, and what each may do: a viewer reads, an admin also changes.
ADMIN = "admin"
VIEWER = "viewer"


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


#: The name of the key the request being served came with (aiohttp serves
#: each request in a task of its own, so this is per request).
REQUEST_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("api_key", default="?")
