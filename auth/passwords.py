"""Password hashing as EMQX does it: ``password_hash_algorithm``.

The stored pair (password_hash, salt) is what EMQX 5 keeps in its built-in
database and what its SQL, Redis and MongoDB backends expect to read, so
credentials move between EMQX and bastionmq unchanged:

    plain                   password_hash = the password itself; salt = ""
    md5 sha sha256 sha512   password_hash = lowercase hex digest of
                            salt + password (prefix), password + salt (suffix)
                            or the password alone (disable); salt = 32
                            lowercase hex characters, used as text
    pbkdf2                  password_hash = lowercase hex of
                            PBKDF2-HMAC(mac_fun, password, salt, iterations,
                            dk_length); salt as for the digests
    bcrypt                  password_hash = bcrypt's own string
                            ($2b$10$<salt><hash>); salt = the same string

Digests are compared with the stored value case-insensitively (an external
database may hold uppercase hex), plain passwords and bcrypt strings exactly;
every comparison is constant-time. bcrypt (and pbkdf2 with many iterations)
takes milliseconds: an authenticator on the event loop runs it in a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any

import attrs
import bcrypt

SIMPLE_NAMES = ("plain", "md5", "sha", "sha256", "sha512")
NAMES = SIMPLE_NAMES + ("bcrypt", "pbkdf2")
SALT_POSITIONS = ("prefix", "suffix", "disable")
MAC_FUNS = ("sha", "sha224", "sha256", "sha384", "sha512")
# EMQX's schema still names these, but refuses them since 5.8.3.
_RETIRED_MAC_FUNS = ("md4", "md5", "ripemd160")

SALT_ROUNDS_MIN = 5
SALT_ROUNDS_MAX = 10
MAX_DK_LENGTH = 2**32 - 1
#: A bcrypt string: $2a$, $2b$ or $2y$ (or $2x$), a two-digit cost, "$", and
#: 22 characters of salt and 31 of hash in bcrypt's base64.
_BCRYPT_STRING = re.compile(rb"\$2[abxy]\$\d\d\$[./A-Za-z0-9]{53}")

# bcrypt keys on the first 72 bytes of a password; the C implementations
# EMQX uses ignore the rest, the Python package refuses longer input.
_BCRYPT_KEY_BYTES = 72

_HASHLIB_NAMES = {"md5": "md5", "sha": "sha1", "sha224": "sha224", "sha256": "sha256",
                  "sha384": "sha384", "sha512": "sha512"}


def _one_of(choices: tuple[str, ...]):
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name}: {value!r} is not one of {', '.join(choices)}")
    return check


def _check_mac_fun(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value in _RETIRED_MAC_FUNS:
        raise ValueError(f"{attribute.name}: {value} is no longer supported (EMQX dropped md4, "
                         f"md5 and ripemd160 in 5.8.3); use one of {', '.join(MAC_FUNS)}")
    _one_of(MAC_FUNS)(_instance, attribute, value)


def _int_in(low: int, high: int, why: str = ""):
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and attribute.default is None:
            return
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"{attribute.name}: {value!r} is not an integer from {low} to "
                             f"{high}{why}")
    return check


@attrs.define(slots=True, frozen=True)
class PasswordHash:
    """EMQX's ``password_hash_algorithm``, with EMQX's defaults.

    ``salt_position`` applies to plain and the digests, ``salt_rounds`` to
    bcrypt, ``mac_fun``, ``iterations`` and ``dk_length`` to pbkdf2 (a
    ``dk_length`` of None means the digest size of ``mac_fun``). EMQX's
    configuration requires mac_fun and iterations for pbkdf2; the defaults
    here are those its Dashboard offers (sha256, 4096).
    """

    name: str = attrs.field(default="sha256", validator=_one_of(NAMES))
    salt_position: str = attrs.field(default="prefix", validator=_one_of(SALT_POSITIONS))
    salt_rounds: int = attrs.field(default=10, validator=_int_in(
        SALT_ROUNDS_MIN, SALT_ROUNDS_MAX, " (EMQX's range for bcrypt's cost factor)"))
    mac_fun: str = attrs.field(default="sha256", validator=_check_mac_fun)
    iterations: int = attrs.field(default=4096, validator=_int_in(1, 2**31 - 1))
    dk_length: int | None = attrs.field(default=None, validator=_int_in(1, MAX_DK_LENGTH))


def hash_password(password: str | bytes, algorithm: PasswordHash) -> tuple[str, str]:
    """(password_hash, salt) for a new credential, as EMQX would store them.

    A new random salt each call, except for plain and ``salt_position =
    disable``, which have none.
    """
    secret = password_bytes(password)
    name = algorithm.name
    if name == "bcrypt":
        hashed = bcrypt.hashpw(secret[:_BCRYPT_KEY_BYTES], bcrypt.gensalt(algorithm.salt_rounds))
        text = hashed.decode("ascii")
        return text, text
    if name == "plain":
        try:
            return secret.decode("utf-8"), ""
        except UnicodeDecodeError:
            raise ValueError("a plain password is stored as text: it must be UTF-8") from None
    if name == "pbkdf2":
        salt = _new_salt()
        return _pbkdf2_hex(secret, salt, algorithm), salt
    salt = "" if algorithm.salt_position == "disable" else _new_salt()
    return _digest_hex(name, _salted(secret, salt, algorithm.salt_position)), salt


def verify_password(password: str | bytes | None, password_hash: str, salt: str | None,
                    algorithm: PasswordHash) -> bool:
    """Whether ``password`` matches a stored (password_hash, salt) pair.

    A salt of None is the empty salt, as EMQX reads a missing salt column.
    False, never an exception, for a missing password or a stored value the
    algorithm cannot read (a malformed bcrypt string, say).
    """
    if password is None:
        return False
    salt = salt or ""
    secret = password_bytes(password)
    name = algorithm.name
    if name == "bcrypt":
        # The bcrypt string carries its own salt and cost; EMQX ignores the
        # salt column for bcrypt.
        stored = password_hash.encode("utf-8")
        # Checked before bcrypt sees it: some of its releases panic (an
        # exception outside Exception) on a truncated string.
        if _BCRYPT_STRING.fullmatch(stored) is None:
            return False
        try:
            computed = bcrypt.hashpw(secret[:_BCRYPT_KEY_BYTES], stored)
        except ValueError:
            return False
        return hmac.compare_digest(computed, stored)
    if name == "plain":
        computed = _salted(secret, salt, algorithm.salt_position)
        return hmac.compare_digest(computed, password_hash.encode("utf-8"))
    if name == "pbkdf2":
        hex_digest = _pbkdf2_hex(secret, salt, algorithm)
    else:
        hex_digest = _digest_hex(name, _salted(secret, salt, algorithm.salt_position))
    return hmac.compare_digest(hex_digest.encode("ascii"), password_hash.lower().encode("utf-8"))


def password_bytes(password: str | bytes) -> bytes:
    """A password as the bytes that are hashed: MQTT passwords are binary
    data; text is taken as UTF-8, as EMQX's REST API and Mosquitto's tools do."""
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def _new_salt() -> str:
    # EMQX: 16 random bytes written as 32 lowercase hex digits; the hex text,
    # not the bytes, is what gets hashed.
    return secrets.token_hex(16)


def _salted(secret: bytes, salt: str, position: str) -> bytes:
    if position == "prefix":
        return salt.encode("utf-8") + secret
    if position == "suffix":
        return secret + salt.encode("utf-8")
    return secret


def _digest_hex(name: str, data: bytes) -> str:
    return hashlib.new(_HASHLIB_NAMES[name], data).hexdigest()


def _pbkdf2_hex(secret: bytes, salt: str, algorithm: PasswordHash) -> str:
    return hashlib.pbkdf2_hmac(_HASHLIB_NAMES[algorithm.mac_fun], secret, salt.encode("utf-8"),
                               algorithm.iterations, algorithm.dk_length).hex()
