"""The authentication chain over real sockets: Mosquitto password files
made by mosquitto_passwd, client certificates, per-listener chains."""

from __future__ import annotations

import subprocess
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from bastionmq.broker.codec import MQTT_3_1_1, MQTT_5
from bastionmq.pki import init_pki, issue_client
from cluster_switch import on_every_node
from startup import startup_error
from tls_helpers import ssl_listener
from mosquitto_peer import tool


def _password_chain(passwd: Path, anonymous: bool = False) -> str:
    return f"""
listeners.tcp.default {{ bind = "127.0.0.1:0" }}
allow_anonymous = {str(anonymous).lower()}
authentication = [ {{ mechanism = password_based, backend = password_file, path = "{passwd}" }} ]
"""


@pytest.mark.one_node("counts one node's authentications")
@pytest.mark.parametrize("version, refusal", [(MQTT_5, 0x86), (MQTT_3_1_1, 4)])
def test_a_mosquitto_password_file_works_unchanged(start_broker, raw_clients, passwd, version,
                                                   refusal):
    broker = start_broker(config=_password_chain(passwd))
    ok = raw_clients(broker.port, version)
    assert ok.connect("a", username="alice", password=b"wonderland").reason_code == 0
    wrong = raw_clients(broker.port, version)
    assert wrong.connect("b", username="bob", password=b"guess").reason_code == refusal
    stats = broker.broker.authn_stats
    assert broker.run(lambda: (stats.allowed, stats.denied)) == (1, 1)


@pytest.mark.parametrize("anonymous, unknown, nameless", [(False, 0x86, 0x87), (True, 0, 0)])
def test_unknown_users_pass_to_allow_anonymous(start_broker, raw_clients, passwd, anonymous,
                                               unknown, nameless):
    # Refused, an unknown user gets what a wrong password gets (0x86): the
    # answer does not tell whether "carol" exists.
    broker = start_broker(config=_password_chain(passwd, anonymous))
    client = raw_clients(broker.port, MQTT_5)
    assert client.connect("c", username="carol", password=b"x").reason_code == unknown
    without_name = raw_clients(broker.port, MQTT_5)
    assert without_name.connect("d").reason_code == nameless


@pytest.mark.parametrize("hide, version, unknown", [
    (True, MQTT_3_1_1, 4), (False, MQTT_3_1_1, 5), (True, MQTT_5, 0x86), (False, MQTT_5, 0x87)])
def test_unknown_and_wrong_password_get_the_same_answer(start_broker, raw_clients, passwd,
                                                        hide, version, unknown):
    broker = start_broker(config=_password_chain(passwd)
                          + f"hide_unknown_users = {str(hide).lower()}")
    wrong = raw_clients(broker.port, version)
    assert wrong.connect("a", username="alice", password=b"guess").reason_code == (
        4 if version == MQTT_3_1_1 else 0x86)
    stranger = raw_clients(broker.port, version)
    assert stranger.connect("b", username="mallory", password=b"guess").reason_code == unknown


def test_paho_with_username_and_password(start_broker, clients, passwd):
    broker = start_broker(config=_password_chain(passwd))
    client = clients(broker.port, client_id="paho", username="bob", password="builder",
                     version=paho.MQTTv5)
    assert client.reason_code == 0


def test_a_listener_chain_replaces_the_top_level_one_and_enable_authn(start_broker, raw_clients,
                                                                     passwd):
    broker = start_broker(config=_password_chain(passwd) + """
listeners.tcp.open { bind = "127.0.0.1:0", authentication = [], allow_anonymous = true }
listeners.tcp.trusted { bind = "127.0.0.1:0", enable_authn = false }
""")
    strict = raw_clients(broker.port, MQTT_5)
    assert strict.connect("s", username="alice", password=b"nope").reason_code == 0x86
    for listener in ("tcp:open", "tcp:trusted"):
        client = raw_clients(broker.port_of(listener), MQTT_5)
        assert client.connect("o", username="alice", password=b"nope").reason_code == 0


def test_a_bad_password_file_stops_start_up(tmp_path):
    bad = tmp_path / "passwd"
    bad.write_text("alice:$7$not-a-hash\n")
    where, what = startup_error(_password_chain(bad))
    assert where == "authentication.0"
    assert f"{bad}:1" in what


# mechanism = cert ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    issue_client(directory, "dev-1")
    return directory


def _tls(broker, pki: Path, cert: str | None, username: str | None):
    import ssl

    from bastionmq.broker.codec import Connect, Decoder, encode
    from tls_helpers import tls_socket
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    sock = tls_socket(broker.port_of("ssl:default"), context)
    sock.sendall(encode(Connect("c", MQTT_5, username=username), MQTT_5))
    return Decoder(MQTT_5).feed(sock.recv(4096))[0].reason_code


@pytest.mark.parametrize("must_match, cert, username, expected", [
    ("none", "dev-1", "anything", 0),
    ("none", None, "anything", 0x87),
    ("username", "dev-1", "dev-1", 0),
    ("username", "dev-1", "admin", 0x86),
])
def test_the_cert_mechanism(start_broker, pki, must_match, cert, username, expected):
    broker = start_broker(config=ssl_listener(
        pki, f"authentication = [ {{ mechanism = cert, must_match = {must_match} }} ]",
        verify="verify_peer"))
    assert _tls(broker, pki, cert, username) == expected


def test_with_a_chain_a_certificate_authenticates_only_through_cert(start_broker, pki, passwd):
    broker = start_broker(config=ssl_listener(
        pki, f'authentication = [ {{ mechanism = password_based, backend = password_file, '
             f'path = "{passwd}" }} ]', verify="verify_peer"))
    assert _tls(broker, pki, "dev-1", None) == 0x87


def _alice_guesses_and_is_banned(raw_clients, port: int, failures: int) -> None:
    """``failures`` wrong passwords for alice, each from a new client id; then
    even the right one is refused (0x8A), without being checked."""
    for attempt in range(failures):
        guesser = raw_clients(port, MQTT_5)
        assert guesser.connect(f"g{attempt}", username="alice",
                               password=b"guess").reason_code == 0x86
    banned = raw_clients(port, MQTT_5)
    assert banned.connect("g9", username="alice", password=b"wonderland").reason_code == 0x8A


@pytest.mark.one_node("automatic bans count one node's failures (docs/cluster.md, Not yet)")
def test_repeated_failures_ban_the_username_for_a_while(start_broker, raw_clients, passwd):
    broker = start_broker(config=_password_chain(passwd) + """
authn_ban { max_failures = 3, window = 1m, ban_time = 500ms }
""")
    _alice_guesses_and_is_banned(raw_clients, broker.port, 3)
    other = raw_clients(broker.port, MQTT_5)
    assert other.connect("o", username="bob", password=b"builder").reason_code == 0
    import time
    time.sleep(0.6)
    later = raw_clients(broker.port, MQTT_5)
    assert later.connect("g10", username="alice", password=b"wonderland").reason_code == 0


def test_reload_reads_the_password_file_again(start_broker, raw_clients, passwd):
    broker = start_broker(config=_password_chain(passwd))
    subprocess.run([tool("mosquitto_passwd"), "-b", str(passwd), "carol", "new"], check=True,
                   capture_output=True)
    refused = raw_clients(broker.port, MQTT_5)
    # Unknown until the reload (answered as a wrong password: hide_unknown_users).
    assert refused.connect("c1", username="carol", password=b"new").reason_code == 0x86
    on_every_node(broker, lambda node: node.reload())
    admitted = raw_clients(broker.port, MQTT_5)
    assert admitted.connect("c2", username="carol", password=b"new").reason_code == 0


@pytest.mark.one_node("automatic bans count one node's failures (docs/cluster.md, Not yet)")
def test_bans_are_per_listener(start_broker, raw_clients, passwd):
    broker = start_broker(config=_password_chain(passwd) + """
listeners.tcp.other { bind = "127.0.0.1:0" }
authn_ban { max_failures = 2, window = 1m, ban_time = 1h }
""")
    _alice_guesses_and_is_banned(raw_clients, broker.port, 2)
    elsewhere = raw_clients(broker.port_of("tcp:other"), MQTT_5)
    assert elsewhere.connect("a", username="alice", password=b"wonderland").reason_code == 0


@pytest.mark.one_node("automatic bans count one node's failures (docs/cluster.md, Not yet)")
def test_a_ban_never_locks_out_a_verified_certificate(start_broker, raw_clients, passwd, pki):
    # Failed logins with the device's client id (and username) ban them for
    # password clients; the device, proven by its certificate, still gets in.
    import ssl

    from conftest import RawClient
    from tls_helpers import tls_socket
    broker = start_broker(config=ssl_listener(
        pki, f'authentication = [ {{ mechanism = password_based, backend = password_file, '
             f'path = "{passwd}" }}, {{ mechanism = cert }} ]\n'
             'authn_ban { max_failures = 2, window = 1m, ban_time = 1h }\n'
             'listeners.tcp.default { bind = "127.0.0.1:0" }\n'
             'mqtt.peer_cert_as_username = cn',
        verify="verify_peer"))
    port = broker.port_of("ssl:default")
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    for attempt in range(2):
        guesser = RawClient(0, MQTT_5, sock=tls_socket(port, context))
        assert guesser.connect("dev-1", username="alice", password=b"guess").reason_code == 0x86
    refused = RawClient(0, MQTT_5, sock=tls_socket(port, context))
    assert refused.connect("dev-1", username="alice", password=b"wonderland").reason_code == 0x8A
    context.load_cert_chain(pki / "dev-1.pem", pki / "dev-1.key")
    device = RawClient(0, MQTT_5, sock=tls_socket(port, context))
    assert device.connect("dev-1").reason_code == 0
