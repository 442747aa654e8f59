"""Mosquitto's ``password_file``, as ``mosquitto_passwd`` writes it.

One user a line, ``username:hash``, where the hash is one of

    $7$<iterations>$<salt>$<hash>   PBKDF2-HMAC-SHA512, 64-byte key; the
                                    default of Mosquitto 2.0 (101 iterations)
    $6$<salt>$<hash>                SHA-512 of password + salt; Mosquitto 1.x
                                    and ``mosquitto_passwd -H sha512``

with salt and hash in standard base64 (with padding). mosquitto_passwd makes
12-byte salts; Mosquitto 2.1 writes 64-byte ones, also accepted here. Lines
that start with ``#`` and blank lines are skipped; blanks around the username
and the hash are ignored, as Mosquitto does.

Mosquitto logs a line it cannot read and drops that user; here any such line
is an error naming the file and the line, so a typo never silently locks a
user out. Plain-text passwords must first be hashed with
``mosquitto_passwd -U``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from typing import Iterator, Mapping

import attrs

from bastionmq.auth.passwords import password_bytes

DEFAULT_ITERATIONS = 101
SALT_LENGTH = 12
_SALT_LENGTHS = (SALT_LENGTH, 64)
_HASH_LENGTH = 64
_MAX_ITERATIONS = 2**31 - 1
_MAX_FIELD = 65535


class PasswordFileError(ValueError):
    """A password file, or a line of one, that cannot be used."""


@attrs.define(slots=True, frozen=True)
class MosquittoHash:
    """One user's stored hash. ``iterations`` is None for ``$6$``."""

    salt: bytes
    digest: bytes
    iterations: int | None

    @classmethod
    def parse(cls, text: str) -> MosquittoHash:
        """Reads ``$7$...`` or ``$6$...``; raises ValueError saying what is wrong."""
        if text.startswith("$argon2id$"):
            raise ValueError("argon2id hashes (Mosquitto 2.1) are not supported: set the "
                             "password again with mosquitto_passwd -H sha512-pbkdf2")
        if not text.startswith("$"):
            raise ValueError("the password is not hashed: hash the file with "
                             "mosquitto_passwd -U")
        fields = text.split("$")[1:]
        if fields[0] == "7" and len(fields) == 4:
            iterations_text, salt_text, digest_text = fields[1:]
            if not (iterations_text.isascii() and iterations_text.isdigit()) \
                    or not 1 <= int(iterations_text) <= _MAX_ITERATIONS:
                raise ValueError(f"iterations {iterations_text!r} is not a whole number from "
                                 f"1 to {_MAX_ITERATIONS}")
            iterations: int | None = int(iterations_text)
        elif fields[0] == "6" and len(fields) == 3:
            salt_text, digest_text = fields[1:]
            iterations = None
        elif fields[0] in ("6", "7"):
            shape = "$6$salt$hash" if fields[0] == "6" else "$7$iterations$salt$hash"
            raise ValueError(f"expected {shape}")
        else:
            raise ValueError(f"unknown hash type ${fields[0]}$ (expected $7$ or $6$)")
        salt = _base64("salt", salt_text)
        if len(salt) not in _SALT_LENGTHS:
            raise ValueError(f"the salt is {len(salt)} bytes, not 12 (or 64)")
        digest = _base64("hash", digest_text)
        if len(digest) != _HASH_LENGTH:
            raise ValueError(f"the hash is {len(digest)} bytes, not {_HASH_LENGTH}")
        return cls(salt, digest, iterations)

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        if self.iterations is None:
            return f"$6${salt}${digest}"
        return f"$7${self.iterations}${salt}${digest}"

    def verify(self, password: str | bytes | None) -> bool:
        if password is None:
            return False
        secret = password_bytes(password)
        if b"\0" in secret:
            # Mosquitto reads the password as a C string and would check only
            # what precedes the NUL; refusing is the safe reading.
            return False
        return hmac.compare_digest(self._derive(secret), self.digest)

    def _derive(self, secret: bytes) -> bytes:
        if self.iterations is None:
            return hashlib.sha512(secret + self.salt).digest()
        return hashlib.pbkdf2_hmac("sha512", secret, self.salt, self.iterations, _HASH_LENGTH)


# Checked against when the user is unknown, so that a wrong user name costs
# as much time as a wrong password and does not reveal which users exist.
_NOBODY = MosquittoHash(bytes(SALT_LENGTH), bytes(_HASH_LENGTH), DEFAULT_ITERATIONS)


class MosquittoPasswords(Mapping[str, MosquittoHash]):
    """The users of a password file: username -> MosquittoHash."""

    def __init__(self, entries: Mapping[str, MosquittoHash]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, username: str) -> MosquittoHash:
        return self._entries[username]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, username: str | None, password: str | bytes | None) -> bool:
        """True only for a known user with the right password."""
        entry = self._entries.get(username) if username is not None else None
        if entry is None:
            _NOBODY.verify(password)
            return False
        return entry.verify(password)


def load_password_file(path: str | os.PathLike[str]) -> MosquittoPasswords:
    """Reads a Mosquitto password file; raises PasswordFileError naming the
    file and line of the first line it cannot use."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise PasswordFileError(f"{os.fspath(path)}: cannot read the password file: "
                                f"{exc.strerror}") from exc
    entries: dict[str, MosquittoHash] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{os.fspath(path)}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PasswordFileError(f"{where}: not UTF-8 text") from None
        # Mosquitto skips lines that start with '#' and lines without ':'.
        if line.startswith("#") or not line.strip():
            continue
        username, colon, hashed = line.partition(":")
        username, hashed = username.strip(), hashed.strip()
        if not colon:
            raise PasswordFileError(f"{where}: expected username:password-hash")
        if not username:
            raise PasswordFileError(f"{where}: the username is empty")
        if len(username.encode("utf-8")) > _MAX_FIELD:
            raise PasswordFileError(f"{where}: the username is longer than {_MAX_FIELD} bytes")
        if username in entries:
            raise PasswordFileError(f"{where}: user {username!r} is already defined on line "
                                    f"{lines[username]}")
        if not hashed:
            raise PasswordFileError(f"{where}: user {username!r} has no password hash")
        try:
            entries[username] = MosquittoHash.parse(hashed)
        except ValueError as exc:
            raise PasswordFileError(f"{where}: user {username!r}: {exc}") from None
        lines[username] = number
    return MosquittoPasswords(entries)


def hash_mosquitto(password: str | bytes, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A ``$7$`` hash of ``password`` with a new 12-byte salt, as
    ``mosquitto_passwd`` writes it; the part after ``username:``."""
    if type(iterations) is not int or not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iterations: {iterations!r} is not a whole number from 1 to "
                         f"{_MAX_ITERATIONS}")
    secret = password_bytes(password)
    if b"\0" in secret:
        raise ValueError("Mosquitto cannot check a password that contains a NUL character")
    salt = secrets.token_bytes(SALT_LENGTH)
    digest = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, _HASH_LENGTH)
    return MosquittoHash(salt, digest, iterations).encode()


def _base64(what: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {what} {text!r} is not base64") from None
