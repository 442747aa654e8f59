"""EMQX's password hashing: known answers from EMQX's own test suites and
documentation, new hashes recomputed independently with hashlib, and the
validation of ``password_hash_algorithm``."""

from __future__ import annotations

import hashlib
import re

import pytest

from bastionmq.auth.passwords import PasswordHash, hash_password, verify_password

HEX_SALT = re.compile(r"[0-9a-f]{32}")

# emqx/emqx apps/emqx_auth/test/emqx_authn/emqx_authn_password_hashing_SUITE.erl,
# hash_examples(): (password_hash, salt, password, algorithm).
EMQX_EXAMPLES = [
    ("plainsalt", "salt", "plain", PasswordHash("plain", salt_position="suffix")),
    ("1bc29b36f623ba82aaf6724fd3b16718", "salt", "md5", PasswordHash("md5", "disable")),
    ("c665d4c0a9e5498806b7d9fd0b417d272853660e", "salt", "sha", PasswordHash("sha", "prefix")),
    ("ac63a624e7074776d677dd61a003b8c803eb11db004d0ec6ae032a5d7c9c5caf", "salt", "sha256",
     PasswordHash("sha256", "prefix")),
    ("a1509ab67bfacbad020927b5ac9d91e9100a82e33a0ebb01459367ce921c0aa8"
     "157aa5652f94bc84fa3babc08283e44887d61c48bcf8ad7bcb3259ee7d0eafcd", "salt", "sha512",
     PasswordHash("sha512", "prefix")),
    ("$2b$12$wtY3h20mUjjmeaClpqZVveDWGlHzCGsvuThMlneGHA7wVeFYyns2u",
     "$2b$12$wtY3h20mUjjmeaClpqZVve", "bcrypt", PasswordHash("bcrypt", salt_rounds=10)),
    ("01dbee7f4a9e243e988b62c73cda935da05378b93244ec8f48a99e61ad799d86",
     "ATHENA.MIT.EDUraeburn", "password",
     PasswordHash("pbkdf2", mac_fun="sha", iterations=2, dk_length=32)),
    ("01dbee7f4a9e243e988b62c73cda935da05378b9", "ATHENA.MIT.EDUraeburn", "password",
     PasswordHash("pbkdf2", mac_fun="sha", iterations=2)),
    # emqx/emqx apps/emqx/test/emqx_passwd_SUITE.erl, t_hash
    ("67a1e09bb1f83f5007dc119c14d663aa", "salt", "password", PasswordHash("md5", "prefix")),
    ("59b3e8d637cf97edbe2384cf59cb7453dfe30789", "salt", "password",
     PasswordHash("sha", "prefix")),
    ("7a37b85c8918eac19a9089c0fa5a2ab4dce3f90528dcdeec108b23ddf3607b99", "salt", "password",
     PasswordHash("sha256", "suffix")),
    ("fa6a2185b3e0a9a85ef41ffb67ef3c1fb6f74980f8ebf970e4e72e353ed9537d"
     "593083c201dfd6e43e1c8a7aac2bc8dbb119c7dfb7d4b8f131111395bd70e97f", "salt", "password",
     PasswordHash("sha512", "suffix")),
    # EMQX's Redis and PostgreSQL authentication pages: user emqx_u.
    ("44edc2d57cde8d79c98145003e105b90a14f1460b79186ea9cfe83942fc5abb5", "slat_foo123", "public",
     PasswordHash("sha256", "suffix")),
]


@pytest.mark.parametrize("password_hash, salt, password, algorithm", EMQX_EXAMPLES)
def test_emqx_known_answers(password_hash, salt, password, algorithm):
    assert verify_password(password, password_hash, salt, algorithm)
    assert not verify_password("wrongpass", password_hash, salt, algorithm)


def test_digests_compare_case_insensitively_plain_passwords_exactly():
    # emqx_passwd_SUITE: "Case is ignored when comparing hashes."
    sha512 = PasswordHash("sha512", "suffix")
    stored = hashlib.sha512(b"passwordsalt").hexdigest()
    assert verify_password("password", stored.upper(), "salt", sha512)
    pbkdf2 = PasswordHash("pbkdf2", mac_fun="sha", iterations=2, dk_length=32)
    assert verify_password("password", EMQX_EXAMPLES[6][0].upper(), "ATHENA.MIT.EDUraeburn",
                           pbkdf2)
    plain = PasswordHash("plain", "disable")
    assert verify_password("Password", "Password", "", plain)
    assert not verify_password("password", "Password", "", plain)
    assert not verify_password("PASSWORD", "Password", "", plain)


def test_defaults_are_emqx_defaults():
    algorithm = PasswordHash()
    assert (algorithm.name, algorithm.salt_position) == ("sha256", "prefix")
    assert algorithm.salt_rounds == 10
    assert (algorithm.mac_fun, algorithm.iterations, algorithm.dk_length) == ("sha256", 4096, None)


@pytest.mark.parametrize("name, function", [
    ("md5", hashlib.md5), ("sha", hashlib.sha1), ("sha256", hashlib.sha256),
    ("sha512", hashlib.sha512)])
@pytest.mark.parametrize("position", ["prefix", "suffix", "disable"])
def test_new_digest_hashes(name, function, position):
    algorithm = PasswordHash(name, position)
    password_hash, salt = hash_password("pässword", algorithm)
    secret = "pässword".encode()
    if position == "disable":
        assert salt == ""
        assert password_hash == function(secret).hexdigest()
    else:
        assert HEX_SALT.fullmatch(salt)
        salted = salt.encode() + secret if position == "prefix" else secret + salt.encode()
        assert password_hash == function(salted).hexdigest()
    assert verify_password("pässword", password_hash, salt, algorithm)
    assert verify_password(secret, password_hash, salt, algorithm)
    assert not verify_password("password", password_hash, salt, algorithm)


@pytest.mark.parametrize("position", ["prefix", "suffix", "disable"])
def test_new_plain_passwords_are_stored_as_given(position):
    algorithm = PasswordHash("plain", position)
    assert hash_password("s3cret", algorithm) == ("s3cret", "")
    assert verify_password("s3cret", "s3cret", "", algorithm)
    with pytest.raises(ValueError, match="UTF-8"):
        hash_password(b"\xff", algorithm)


@pytest.mark.parametrize("mac_fun, size", [
    ("sha", 20), ("sha224", 28), ("sha256", 32), ("sha384", 48), ("sha512", 64)])
def test_new_pbkdf2_hashes(mac_fun, size):
    algorithm = PasswordHash("pbkdf2", mac_fun=mac_fun, iterations=10)
    password_hash, salt = hash_password("secret", algorithm)
    assert HEX_SALT.fullmatch(salt)
    hashlib_name = "sha1" if mac_fun == "sha" else mac_fun
    # The salt is used as the text EMQX stores, not as the bytes it spells.
    assert password_hash == hashlib.pbkdf2_hmac(hashlib_name, b"secret", salt.encode(), 10).hex()
    assert len(password_hash) == 2 * size
    assert verify_password("secret", password_hash, salt, algorithm)
    assert not verify_password("secreT", password_hash, salt, algorithm)


def test_pbkdf2_dk_length():
    algorithm = PasswordHash("pbkdf2", mac_fun="sha512", iterations=3, dk_length=20)
    password_hash, salt = hash_password("secret", algorithm)
    assert password_hash == hashlib.pbkdf2_hmac("sha512", b"secret", salt.encode(), 3, 20).hex()


def test_new_bcrypt_hashes_keep_the_salt_in_the_hash():
    algorithm = PasswordHash("bcrypt", salt_rounds=5)
    password_hash, salt = hash_password("secret", algorithm)
    assert password_hash == salt
    assert re.fullmatch(r"\$2b\$05\$[./A-Za-z0-9]{53}", password_hash)
    assert verify_password("secret", password_hash, "", algorithm)
    assert not verify_password("Secret", password_hash, salt, algorithm)
    # bcrypt keys on the first 72 bytes, as EMQX's bcrypt does.
    long_hash, _ = hash_password("x" * 72 + "tail", algorithm)
    assert verify_password("x" * 72 + "other tail", long_hash, "", algorithm)
    assert not verify_password("x" * 71, long_hash, "", algorithm)


def test_new_salts_differ():
    algorithm = PasswordHash("sha256", "suffix")
    assert hash_password("same", algorithm) != hash_password("same", algorithm)


@pytest.mark.parametrize("password_hash", ["", "not bcrypt", "$2b$05$short", "$2b$05$é" * 10])
def test_unreadable_bcrypt_hash_is_no_match(password_hash):
    assert not verify_password("secret", password_hash, password_hash, PasswordHash("bcrypt"))


def test_missing_password_is_no_match_and_missing_salt_is_empty():
    assert not verify_password(None, "", "", PasswordHash("plain", "disable"))
    stored = hashlib.sha256(b"secret").hexdigest()
    assert verify_password("secret", stored, None, PasswordHash("sha256", "suffix"))


@pytest.mark.parametrize("options, message", [
    ({"name": "sha1"},
     "name: 'sha1' is not one of plain, md5, sha, sha256, sha512, bcrypt, pbkdf2"),
    ({"salt_position": "both"}, "salt_position: 'both' is not one of prefix, suffix, disable"),
    ({"salt_rounds": 4}, "salt_rounds: 4 is not an integer from 5 to 10"),
    ({"salt_rounds": 11}, "salt_rounds: 11 is not an integer from 5 to 10"),
    ({"salt_rounds": True}, "salt_rounds: True is not an integer"),
    ({"mac_fun": "md5"}, "mac_fun: md5 is no longer supported .*5.8.3"),
    ({"mac_fun": "whirlpool"}, "mac_fun: 'whirlpool' is not one of sha, sha224, sha256"),
    ({"iterations": 0}, "iterations: 0 is not an integer from 1"),
    ({"iterations": "4096"}, "iterations: '4096' is not an integer"),
    ({"dk_length": 0}, "dk_length: 0 is not an integer from 1 to 4294967295"),
    ({"dk_length": 2**32}, "dk_length: 4294967296 is not an integer"),
])
def test_invalid_algorithms_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PasswordHash(**options)


def test_login_bans_forget_what_has_aged_out_at_no_cost_per_failure():
    from bastionmq.auth.ban import LoginBans
    from bastionmq.broker.ports import AuthRequest, PeerInfo
    now = [0.0]
    bans = LoginBans(max_failures=3, window=10, ban_time=60, clock=lambda: now[0])

    def request(name: str, listener: str = "tcp:default") -> AuthRequest:
        return AuthRequest(client_id=f"c-{name}", username=name, password=b"x",
                           peer=PeerInfo(listener=listener), protocol_level=5, properties={})

    for n in range(10_000):  # a flood of distinct names: each fails once
        bans.failed(request(f"user{n}"))
    assert len(bans._failures) == 20_000  # by client id and by username
    for _ in range(3):
        bans.failed(request("target"))
    assert bans.banned(request("target")) == ("clientid", "c-target")
    assert bans.banned(request("target", "ssl:default")) is None  # per listener
    now[0] = 11.0
    bans.failed(request("late"))
    assert set(bans._failures) == {("tcp:default", "clientid", "c-late"),
                                   ("tcp:default", "username", "late")}
    now[0] = 61.0
    assert bans.banned(request("target")) is None
    assert not bans._banned
