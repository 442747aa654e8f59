"""Mosquitto password files: files written by the real mosquitto_passwd are
read here, and files written here are accepted by a real mosquitto broker
(Debian's mosquitto package: mosquitto and mosquitto_passwd)."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess

import pytest

from mosquitto_peer import running_mosquitto, tool

from bastionmq.auth.mosquitto_passwd import (
    MosquittoHash, PasswordFileError, hash_mosquitto, load_password_file,
)

TIMEOUT = 10.0
PASSWORD = "s3cret pässword"


def mosquitto_passwd(*args: str) -> None:
    subprocess.run([tool("mosquitto_passwd"), *args], check=True, capture_output=True,
                   timeout=TIMEOUT)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- files written by mosquitto_passwd ---------------------------------------

def test_reads_mosquitto_passwd_default_pbkdf2(tmp_path):
    path = tmp_path / "passwords"
    mosquitto_passwd("-c", "-b", str(path), "alice", PASSWORD)
    mosquitto_passwd("-b", str(path), "bob", "other")
    passwords = load_password_file(path)
    assert sorted(passwords) == ["alice", "bob"]
    line = path.read_text().splitlines()[0]
    assert line.startswith("alice:$7$101$")
    entry = passwords["alice"]
    assert (entry.iterations, len(entry.salt)) == (101, 12)
    assert entry.encode() == line.partition(":")[2]
    assert passwords.verify("alice", PASSWORD)
    assert passwords.verify("alice", PASSWORD.encode())
    assert passwords.verify("bob", "other")
    assert not passwords.verify("alice", "other")
    assert not passwords.verify("alice", PASSWORD + " ")
    assert not passwords.verify("bob", PASSWORD)
    assert not passwords.verify("carol", PASSWORD)
    assert not passwords.verify(None, PASSWORD)
    assert not passwords.verify("alice", None)


def test_reads_mosquitto_passwd_sha512(tmp_path):
    path = tmp_path / "passwords"
    mosquitto_passwd("-H", "sha512", "-c", "-b", str(path), "alice", PASSWORD)
    assert path.read_text().startswith("alice:$6$")
    passwords = load_password_file(path)
    assert passwords["alice"].iterations is None
    assert passwords.verify("alice", PASSWORD)
    assert not passwords.verify("alice", "s3cret")


def test_reads_a_file_hashed_by_mosquitto_passwd_U(tmp_path):
    path = tmp_path / "passwords"
    path.write_text(f"alice:{PASSWORD}\nbob:other\n")
    with pytest.raises(PasswordFileError, match=r":1: user 'alice': the password is not hashed: "
                                                r"hash the file with mosquitto_passwd -U"):
        load_password_file(path)
    mosquitto_passwd("-U", str(path))
    passwords = load_password_file(path)
    assert passwords.verify("alice", PASSWORD)
    assert passwords.verify("bob", "other")
    assert not passwords.verify("bob", PASSWORD)


# --- the formats, computed independently -------------------------------------

def test_known_pbkdf2_and_sha512_hashes():
    salt = bytes(range(12))
    pbkdf2 = hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101, 64)
    entry = MosquittoHash.parse(f"$7$101${b64(salt)}${b64(pbkdf2)}")
    assert entry == MosquittoHash(salt, pbkdf2, 101)
    assert entry.verify("secret") and not entry.verify("secret2")
    sha512 = hashlib.sha512(b"secret" + salt).digest()
    entry = MosquittoHash.parse(f"$6${b64(salt)}${b64(sha512)}")
    assert entry == MosquittoHash(salt, sha512, None)
    assert entry.verify("secret") and not entry.verify("secret2")
    # Mosquitto 2.1 writes 64-byte salts.
    long_salt = bytes(64)
    digest = hashlib.pbkdf2_hmac("sha512", b"secret", long_salt, 2, 64)
    assert MosquittoHash.parse(f"$7$2${b64(long_salt)}${b64(digest)}").verify("secret")


def test_hash_mosquitto():
    text = hash_mosquitto(PASSWORD)
    match = re.fullmatch(r"\$7\$101\$([A-Za-z0-9+/]{16})\$([A-Za-z0-9+/]{86}==)", text)
    assert match
    salt, digest = (base64.b64decode(group) for group in match.groups())
    assert digest == hashlib.pbkdf2_hmac("sha512", PASSWORD.encode(), salt, 101, 64)
    assert hash_mosquitto(PASSWORD) != text
    assert hash_mosquitto("x", iterations=1000).startswith("$7$1000$")


@pytest.mark.parametrize("iterations", [0, -1, 2**31, True, "101"])
def test_hash_mosquitto_refuses_bad_iterations(iterations):
    with pytest.raises(ValueError, match="iterations"):
        hash_mosquitto("x", iterations=iterations)


def test_passwords_with_nul_are_refused():
    # Mosquitto would compare only what precedes the NUL.
    with pytest.raises(ValueError, match="NUL"):
        hash_mosquitto("a\0b")
    assert not MosquittoHash.parse(hash_mosquitto("a")).verify(b"a\0b")


def test_comments_blank_lines_blanks_and_crlf(tmp_path):
    path = tmp_path / "passwords"
    path.write_bytes(b"# users\n\n   \r\n  alice : " + hash_mosquitto("one").encode()
                     + b"  \r\nbob:" + hash_mosquitto("two", 5).encode())
    passwords = load_password_file(path)
    assert len(passwords) == 2
    assert passwords.verify("alice", "one") and passwords.verify("bob", "two")


SALT = b64(bytes(12))
DIGEST = b64(bytes(64))


@pytest.mark.parametrize("line, message", [
    ("alice", "expected username:password-hash"),
    (f":$7$101${SALT}${DIGEST}", "the username is empty"),
    ("alice:", "user 'alice' has no password hash"),
    ("alice: secret", "the password is not hashed"),
    (f"alice:$5${SALT}${DIGEST}", r"unknown hash type \$5\$"),
    (f"alice:$7${SALT}${DIGEST}", r"expected \$7\$iterations\$salt\$hash"),
    (f"alice:$6$101${SALT}${DIGEST}", r"expected \$6\$salt\$hash"),
    (f"alice:$7$0${SALT}${DIGEST}", "iterations '0' is not a whole number"),
    (f"alice:$7$x1${SALT}${DIGEST}", "iterations 'x1' is not a whole number"),
    (f"alice:$7$101$not*base64${DIGEST}", "the salt 'not\\*base64' is not base64"),
    (f"alice:$7$101${b64(bytes(16))}${DIGEST}", "the salt is 16 bytes, not 12"),
    (f"alice:$7$101${SALT}${b64(bytes(32))}", "the hash is 32 bytes, not 64"),
    (f"alice:$7$101${SALT}${DIGEST}:extra", "the hash .* is not base64"),
    ("alice:$argon2id$v=19$m=47104,t=1,p=1$c2FsdA$aGFzaA", "argon2id .* not supported"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "passwords"
    path.write_text(f"# users\nbob:{hash_mosquitto('two')}\n{line}\n")
    with pytest.raises(PasswordFileError, match=f"^{re.escape(str(path))}:3: .*{message}"):
        load_password_file(path)


def test_duplicate_users_and_bad_encoding_are_errors(tmp_path):
    path = tmp_path / "passwords"
    path.write_text(f"bob:{hash_mosquitto('one')}\nbob:{hash_mosquitto('two')}\n")
    with pytest.raises(PasswordFileError, match=r":2: user 'bob' is already defined on line 1"):
        load_password_file(path)
    path.write_bytes(b"b\xffb:" + hash_mosquitto("one").encode())
    with pytest.raises(PasswordFileError, match=":1: not UTF-8 text"):
        load_password_file(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(PasswordFileError, match=f"^{re.escape(str(path))}: cannot read"):
        load_password_file(path)


# --- files written here, checked by a real mosquitto -------------------------

@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    """A real mosquitto on a loopback port with a password file from hash_mosquitto."""
    directory = tmp_path_factory.mktemp("mosquitto")
    passwords = directory / "passwords"
    passwords.write_text(f"alice:{hash_mosquitto(PASSWORD)}\n"
                         f"bob:{hash_mosquitto('other', iterations=1000)}\n")
    with running_mosquitto(directory, f"allow_anonymous false\npassword_file {passwords}\n") \
            as port:
        yield port


def publish(port: int, username: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-u", username,
         "-P", password, "-t", "test", "-m", "hello"],
        capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("username, password", [("alice", PASSWORD), ("bob", "other")])
def test_mosquitto_accepts_our_hashes(mosquitto, username, password):
    accepted = publish(mosquitto, username, password)
    assert accepted.returncode == 0, accepted.stderr
    refused = publish(mosquitto, username, password + "x")
    assert refused.returncode != 0
    assert "not authorised" in refused.stderr
