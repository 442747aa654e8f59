"""OCSP on TLS listeners against a real responder (openssl ocsp on loopback):
client certificates asked about at the handshake and again while connected,
soft and hard failure, responses that must not be believed, the cache."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from bastionmq.listeners.ocsp import build_request
from bastionmq.pki import init_pki, issue_client
from bastionmq.config import ConfigError, load_config
from mosquitto_peer import stop
from startup import startup_error
from test_e2e_tls_revocation import MqttOverTls, _failures, _refused, _wait
from tls_helpers import ssl_listener

TIMEOUT = 10.0

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def write_index(pki: Path, index: Path) -> None:
    """openssl ca's index of every certificate the PKI's CA issued, revoked
    ones (those on its crl.pem) marked R. Replaced whole (a new inode) so
    that a running responder sees the change and reads it again."""
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    revoked = {entry.serial_number: entry.revocation_date_utc
               for entry in x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())}
    lines = []
    for path in sorted(pki.glob("*.pem")):
        if path.name in ("ca.pem", "crl.pem"):
            continue
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if cert.issuer != ca.subject:
            continue
        expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        serial = f"{cert.serial_number:X}"
        serial = serial if len(serial) % 2 == 0 else "0" + serial
        when = revoked.get(cert.serial_number)
        status, date = ("R", when.strftime("%y%m%d%H%M%SZ")) if when else ("V", "")
        lines.append(f"{status}\t{expiry}\t{date}\t{serial}\tunknown\t/CN={path.stem}\n")
    fresh = index.with_suffix(".new")
    fresh.write_text("".join(lines))
    os.replace(fresh, index)


class Responder:
    """``openssl ocsp`` answering for the PKI's CA, signed by ``signer``
    (a certificate and key in ``signer_dir``), behind a relay on loopback
    that counts requests and can be taken down (``down``)."""

    def __init__(self, pki: Path, workdir: Path, signer: str = "ca",
                 signer_dir: Path | None = None) -> None:
        self.pki = pki
        self.index = workdir / "index.txt"
        write_index(pki, self.index)
        signer_dir = signer_dir or pki
        self.process = subprocess.Popen(
            ["openssl", "ocsp", "-index", str(self.index), "-port", "0",
             "-rsigner", str(signer_dir / f"{signer}.pem"),
             "-rkey", str(signer_dir / f"{signer}.key"), "-CA", str(pki / "ca.pem"),
             "-nmin", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()  # "ACCEPT [::]:PORT PID=..."
        match = re.search(r"ACCEPT .*:(\d+)", line)
        if not match:  # not left running: no fixture holds it yet
            self.process.kill()
            self.process.wait(TIMEOUT)
            self.process.stdout.close()
        assert match, line
        self.backend = backend = f"http://127.0.0.1:{match[1]}/"
        self.requests = 0
        served = self

        class Relay(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                served.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(
                    backend, data=body, headers={"Content-Type": "application/ocsp-request"})
                with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                    data = answer.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self._up = True

    def update(self) -> None:
        """Tell the responder of the certificates issued (or revoked) since it
        started. It looks for a new index before it waits for a request, so
        the one it is waiting for would still be answered from the old one:
        a request of its own (not counted) moves it on."""
        write_index(self.pki, self.index)
        ca = x509.load_pem_x509_certificate((self.pki / "ca.pem").read_bytes())
        server = x509.load_pem_x509_certificate((self.pki / "server.pem").read_bytes())
        request = urllib.request.Request(
            self.backend, data=build_request(server, ca),
            headers={"Content-Type": "application/ocsp-request"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            answer.read()

    def revoke(self, name: str) -> None:
        """Revoke with ``bastionmq certs revoke`` (run as an operator runs
        it), then update the responder's index from the CA's records."""
        done = subprocess.run(
            [shutil.which("bastionmq") or "bastionmq", "certs", "revoke", "--dir", str(self.pki),
             str(self.pki / f"{name}.pem")], capture_output=True, text=True, timeout=TIMEOUT,
            cwd=self.pki)
        assert done.returncode == 0, done.stderr
        self.update()

    def down(self) -> None:
        if self._up:
            self._up = False
            self.server.shutdown()
            self.server.server_close()

    def close(self) -> None:
        self.down()
        stop(self.process)
        self.process.stdout.close()


@pytest.fixture
def pki(tmp_path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory)
    return directory


@pytest.fixture
def responder(pki, tmp_path):
    running = []

    def start(**options) -> Responder:
        workdir = tmp_path / f"responder{len(running)}"
        workdir.mkdir()
        running.append(Responder(pki, workdir, **options))
        return running[-1]

    yield start
    for one in running:
        one.close()


def _config(pki: Path, **ocsp: str) -> str:
    settings = {"enable_client_check": "true", **ocsp}
    block = ", ".join(f"{key} = {value}" for key, value in settings.items())
    return ssl_listener(pki, "allow_anonymous = true\n", verify="verify_peer",
                        fail_if_no_peer_cert="true", ocsp=f"{{ {block} }}")


def _good_connects_revoked_is_refused(start_broker, pki, ocsp):
    """Clients "good" and "bad" (revoked) of ``ocsp``'s responder: the first
    connects, the second is refused at the handshake; returns the broker."""
    issue_client(pki, "good", ocsp_url=ocsp.url)
    issue_client(pki, "bad", ocsp_url=ocsp.url)
    ocsp.revoke("bad")
    broker = start_broker(config=_config(pki))
    port = broker.port_of("ssl:default")
    assert MqttOverTls(port, pki, "good").connack.reason_code == 0
    _refused(port, pki, "bad")
    return broker


def test_good_connects_revoked_is_refused_and_counted(start_broker, pki, responder):
    broker = _good_connects_revoked_is_refused(start_broker, pki, responder())
    _wait(lambda: _failures(broker).get("client certificate revoked") == 1, _failures(broker))


@pytest.mark.one_node("each node fetches and caches for itself")
def test_answers_are_cached_until_next_update(start_broker, pki, responder):
    ocsp = responder()
    issue_client(pki, "good", ocsp_url=ocsp.url)
    ocsp.update()
    broker = start_broker(config=_config(pki))
    port = broker.port_of("ssl:default")
    for _ in range(3):
        assert MqttOverTls(port, pki, "good").connack.reason_code == 0
    assert ocsp.requests == 1


def test_a_refresh_disconnects_a_client_whose_certificate_was_revoked(
        start_broker, pki, responder):
    ocsp = responder()
    issue_client(pki, "later", ocsp_url=ocsp.url)
    issue_client(pki, "spared", ocsp_url=ocsp.url)
    ocsp.update()
    broker = start_broker(config=_config(pki, refresh="300ms"))
    port = broker.port_of("ssl:default")
    doomed = MqttOverTls(port, pki, "later")
    spared = MqttOverTls(port, pki, "spared")
    ocsp.revoke("later")
    doomed.sock.settimeout(TIMEOUT)
    disconnect = doomed.receive()
    assert (disconnect.reason_code, disconnect.properties["reason_string"]) == (
        0x98, "client certificate revoked")
    assert spared.ping()
    _refused(port, pki, "later")


def test_an_unreachable_responder_fails_hard_or_soft(start_broker, pki, responder):
    ocsp = responder()
    issue_client(pki, "good")  # names no responder: responder_url is used
    ocsp.down()
    hard = start_broker(config=_config(pki, responder_url=f'"{ocsp.url}"', timeout="2s"))
    _refused(hard.port_of("ssl:default"), pki, "good")
    _wait(lambda: _failures(hard).get("no OCSP answer for the client certificate") == 1,
          _failures(hard))
    soft = start_broker(config=_config(pki, responder_url=f'"{ocsp.url}"', timeout="2s",
                                       soft_fail="true"))
    assert MqttOverTls(soft.port_of("ssl:default"), pki, "good").connack.reason_code == 0


def test_a_certificate_naming_no_responder_is_refused_without_responder_url(
        start_broker, pki):
    issue_client(pki, "nowhere")
    broker = start_broker(config=_config(pki))
    _refused(broker.port_of("ssl:default"), pki, "nowhere")
    _wait(lambda: _failures(broker).get("no OCSP answer for the client certificate") == 1,
          _failures(broker))


def test_a_response_signed_by_a_wrong_key_is_refused(start_broker, pki, responder, tmp_path):
    other = tmp_path / "other"
    init_pki(other)  # another CA, whose key has no say about this CA's certificates
    ocsp = responder(signer="ca", signer_dir=other)
    issue_client(pki, "good", ocsp_url=ocsp.url)
    ocsp.update()
    broker = start_broker(config=_config(pki))
    _refused(broker.port_of("ssl:default"), pki, "good")
    _wait(lambda: _failures(broker).get("no OCSP answer for the client certificate") == 1,
          _failures(broker))
    assert ocsp.requests == 1


def test_a_delegated_responder_with_the_ocsp_signing_usage_is_believed(
        start_broker, pki, responder):
    issue_client(pki, "ocsp-signer", extended_key_usage=("OCSPSigning",))
    _good_connects_revoked_is_refused(start_broker, pki, responder(signer="ocsp-signer"))


def test_a_delegated_responder_without_the_ocsp_signing_usage_is_not(
        start_broker, pki, responder):
    issue_client(pki, "impostor")  # issued by the CA, but for client use only
    ocsp = responder(signer="impostor")
    issue_client(pki, "good", ocsp_url=ocsp.url)
    ocsp.update()
    broker = start_broker(config=_config(pki))
    _refused(broker.port_of("ssl:default"), pki, "good")


def test_client_check_needs_verify_peer(pki):
    with pytest.raises(ConfigError) as info:
        load_config(text=ssl_listener(pki, "", verify="verify_none",
                                      ocsp="{ enable_client_check = true }"), env={})
    assert info.value.errors == [("listeners.ssl.default.ssl_options",
                                  "invalid: ocsp.enable_client_check = true needs "
                                  "verify = verify_peer")]


# stapling ------------------------------------------------------------------------


def _s_client_status(port: int, pki: Path) -> str:
    """What ``openssl s_client -status`` says of the staple."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-status",
         "-CAfile", str(pki / "ca.pem"), "-cert", str(pki / "good.pem"),
         "-key", str(pki / "good.key")],
        input="", capture_output=True, text=True, timeout=TIMEOUT)
    return done.stdout


def _stapling(pki: Path, ocsp: Responder, **extra: str) -> str:
    settings = {"enable_stapling": "true", "responder_url": f'"{ocsp.url}"',
                "issuer_pem": f'"{pki / "ca.pem"}"', **extra}
    block = ", ".join(f"{key} = {value}" for key, value in settings.items())
    return ssl_listener(pki, "allow_anonymous = true\n", ocsp=f"{{ {block} }}")


def test_the_server_certificates_status_is_stapled(start_broker, pki, responder):
    issue_client(pki, "good")
    ocsp = responder()
    broker = start_broker(config=_stapling(pki, ocsp))
    listener = broker.broker.listeners["ssl:default"]
    _wait(lambda: broker.run(lambda: listener.staple) is not None, "nothing stapled")
    out = _s_client_status(broker.port_of("ssl:default"), pki)
    assert "OCSP Response Status: successful" in out, out
    assert "Cert Status: good" in out, out
    requests = ocsp.requests
    for _ in range(2):  # handshakes share the answer held
        assert "Cert Status: good" in _s_client_status(broker.port_of("ssl:default"), pki)
    assert ocsp.requests == requests


def test_nothing_is_stapled_while_the_responder_is_down(start_broker, pki, responder):
    issue_client(pki, "good")
    ocsp = responder()
    ocsp.down()
    broker = start_broker(config=_stapling(pki, ocsp, timeout="1s"))
    out = _s_client_status(broker.port_of("ssl:default"), pki)
    assert "OCSP response: no response sent" in out, out
    assert "Verify return code: 0 (ok)" in out, out


def test_stapling_names_its_missing_issuer(pki, tmp_path):
    where, what = startup_error(ssl_listener(
        pki, "", ocsp='{ enable_stapling = true, responder_url = "http://127.0.0.1:1/", '
                      f'issuer_pem = "{tmp_path / "missing.pem"}" }}'))
    assert where == "listeners.ssl.default.ssl_options.ocsp.issuer_pem"
    assert "missing.pem" in what
