"""The development PKI and ``bastionmq certs``: real files, real TLS handshakes, openssl."""

from __future__ import annotations

import socket
import ssl
import stat
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastionmq import pki
from bastionmq.cli import main
from mosquitto_peer import tool

TIMEOUT = 10.0
NOW = datetime.now(timezone.utc)


@pytest.fixture
def certs(tmp_path) -> Path:
    directory = tmp_path / "certs"
    pki.init_pki(directory)
    return directory


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_crl(directory: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((directory / pki.CRL).read_bytes())


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]):
    return cert.extensions.get_extension_for_class(kind).value


def expires_in(cert: x509.Certificate, expected: timedelta) -> bool:
    """Whether ``cert`` expires ``expected`` from now, give or take the test's run time."""
    return abs(cert.not_valid_after_utc - datetime.now(timezone.utc) - expected) < timedelta(
        minutes=1)


def serial_hex(serial: int) -> str:
    """A serial number as openssl prints it: upper-case hex in whole bytes."""
    digits = f"{serial:X}"
    return "0" * (len(digits) % 2) + digits


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("openssl"), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT)


def openssl_verify(directory: Path, cert: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return openssl("verify", *options, "-CAfile", directory / pki.CA_CERT, cert)


def handshake(directory: Path, server_hostname: str, server: pki.IssuedFiles | None = None,
              client: pki.IssuedFiles | None = None) -> dict:
    """A TLS handshake over a socket pair; returns the client certificate the server saw.

    The server sends a byte after its handshake, so a client certificate it
    refuses (checked after the client's side finished, in TLS 1.3) fails here too.
    """
    server = server or pki.IssuedFiles(directory / "server.pem", directory / "server.key")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server.cert, server.key)
    if client is not None:
        server_context.verify_mode = ssl.CERT_REQUIRED
        server_context.load_verify_locations(directory / pki.CA_CERT)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(directory / pki.CA_CERT)
    if client is not None:
        client_context.load_cert_chain(client.cert, client.key)

    seen: dict = {}
    server_errors: list[BaseException] = []

    def serve(sock: socket.socket) -> None:
        try:
            with server_context.wrap_socket(sock, server_side=True) as tls:
                seen.update(tls.getpeercert() or {})
                tls.sendall(b"!")
        except (OSError, ssl.SSLError) as exc:
            server_errors.append(exc)

    left, right = socket.socketpair()
    left.settimeout(TIMEOUT)
    right.settimeout(TIMEOUT)
    thread = threading.Thread(target=serve, args=(left,))
    thread.start()
    try:
        with client_context.wrap_socket(right, server_hostname=server_hostname) as tls:
            received = tls.recv(1)
    finally:
        right.close()
        thread.join(TIMEOUT)
        left.close()
    if server_errors:
        raise server_errors[0]
    assert received == b"!"
    return seen


# ------------------------------------------------------------------ init


def test_init_writes_ca_server_and_crl_with_private_keys_0600(tmp_path):
    directory = tmp_path / "new" / "certs"
    server = pki.init_pki(directory)

    assert server == pki.IssuedFiles(directory / "server.pem", directory / "server.key")
    assert sorted(path.name for path in directory.iterdir()) == [
        "ca.key", "ca.pem", "crl.pem", "server.key", "server.pem"]
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((directory / key).stat().st_mode) == 0o600
        assert (directory / key).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    ca = load(directory / "ca.pem")
    assert extension(ca, x509.BasicConstraints).ca
    usage = extension(ca, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > timedelta(days=3649)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)

    cert = load(server.cert)
    assert common_name(cert) == "localhost"
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert (extension(cert, x509.AuthorityKeyIdentifier).key_identifier
            == extension(ca, x509.SubjectKeyIdentifier).digest)
    cert.verify_directly_issued_by(ca)

    crl = load_crl(directory)
    assert len(crl) == 0
    assert crl.is_signature_valid(ca.public_key())
    assert timedelta(days=29) < crl.next_update_utc - NOW <= timedelta(days=31)


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", "::1"])
def test_the_server_certificate_completes_a_verified_handshake(certs, server_hostname):
    handshake(certs, server_hostname)


def test_the_server_certificate_is_refused_for_a_name_it_does_not_carry(certs):
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(certs, "mqtt.example.com")


def test_init_hosts_become_dns_and_ip_names_and_the_first_is_the_cn(tmp_path):
    server = pki.init_pki(tmp_path, hosts=["mqtt.example.com", "10.1.2.3", "localhost"])
    cert = load(server.cert)
    assert common_name(cert) == "mqtt.example.com"
    names = extension(cert, x509.SubjectAlternativeName)
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "mqtt.example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1", "::1", "10.1.2.3"]
    handshake(tmp_path, "mqtt.example.com")
    handshake(tmp_path, "10.1.2.3")


def test_openssl_verifies_the_server_and_a_client_for_their_purposes(certs):
    client = pki.issue_client(certs, "alice")
    for cert, purpose in ((certs / "server.pem", "sslserver"), (client.cert, "sslclient")):
        result = openssl_verify(certs, cert, "-purpose", purpose)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"{cert}: OK"
    # Purposes are not interchangeable: the EKU extensions are real.
    assert openssl_verify(certs, client.cert, "-purpose", "sslserver").returncode != 0


def test_init_refuses_to_replace_a_ca_unless_forced(certs):
    first = load(certs / "ca.pem")
    with pytest.raises(pki.PkiError, match=r"ca\.pem already exists"):
        pki.init_pki(certs)
    (certs / "ca.pem").unlink()
    with pytest.raises(pki.PkiError, match=r"ca\.key already exists"):
        pki.init_pki(certs)

    pki.init_pki(certs, force=True)
    assert load(certs / "ca.pem").serial_number != first.serial_number
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600
    handshake(certs, "localhost")


# ------------------------------------------------------------------ clients


def test_a_client_certificate_names_its_client_and_authenticates_it(certs):
    client = pki.issue_client(certs, "alice")
    assert client == pki.IssuedFiles(certs / "alice.pem", certs / "alice.key")
    assert stat.S_IMODE(client.key.stat().st_mode) == 0o600

    cert = load(client.cert)
    assert cert.subject.rfc4514_string() == "CN=alice"
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not extension(cert, x509.BasicConstraints).ca
    usage = extension(cert, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_encipherment
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.verify_directly_issued_by(load(certs / "ca.pem"))

    seen = handshake(certs, "localhost", client=client)
    assert seen["subject"] == ((("commonName", "alice"),),)


def test_client_validity_can_be_set_in_the_past_or_the_future(certs):
    expired = pki.issue_client(certs, "expired", not_before=NOW - timedelta(days=10),
                               not_after=NOW - timedelta(days=1))
    future = pki.issue_client(certs, "future", not_before=NOW + timedelta(days=1), days=5)
    one_day = pki.issue_client(certs, "short", days=1)

    cert = load(expired.cert)
    assert cert.not_valid_after_utc == (NOW - timedelta(days=1)).replace(microsecond=0)
    assert load(future.cert).not_valid_after_utc == (NOW + timedelta(days=6)).replace(
        microsecond=0)
    assert expires_in(load(one_day.cert), timedelta(days=1))

    assert "has expired" in openssl_verify(certs, expired.cert).stderr
    assert "not yet valid" in openssl_verify(certs, future.cert).stderr
    with pytest.raises(ssl.SSLError):
        handshake(certs, "localhost", client=expired)
    with pytest.raises(pki.PkiError, match="must be later"):
        pki.issue_client(certs, "backwards", not_before=NOW, not_after=NOW - timedelta(days=1))


@pytest.mark.parametrize("key_type,bits", [("rsa2048", 2048), ("rsa3072", 3072),
                                            ("rsa4096", 4096)])
def test_rsa_client_keys_have_their_size_and_allow_key_encipherment(certs, key_type, bits):
    client = pki.issue_client(certs, f"rsa-{bits}", key_type=key_type)
    key = load(client.cert).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == bits
    assert extension(load(client.cert), x509.KeyUsage).key_encipherment
    assert openssl_verify(certs, client.cert, "-purpose", "sslclient").returncode == 0


def test_subject_parts_alternative_names_and_key_purposes_are_as_asked(certs):
    client = pki.issue_client(
        certs, "device-7", extra_subject={"OU": "sensors", "O": "Acme", "C": "DE",
                                          "ST": "Berlin", "L": "Berlin"},
        extended_key_usage=["clientAuth", "emailProtection"],
        san_dns=["device-7.example"], san_uri=["urn:device:7"],
        san_email=["ops@example.com"], san_ip=["192.0.2.7"])
    cert = load(client.cert)
    assert cert.subject.rfc4514_string() == "CN=device-7,OU=sensors,O=Acme,L=Berlin,ST=Berlin,C=DE"
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [
        ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION]
    names = extension(cert, x509.SubjectAlternativeName)
    assert names.get_values_for_type(x509.DNSName) == ["device-7.example"]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:device:7"]
    assert names.get_values_for_type(x509.RFC822Name) == ["ops@example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]

    bare = load(pki.issue_client(certs, "bare", extended_key_usage=()).cert)
    for kind in (x509.ExtendedKeyUsage, x509.SubjectAlternativeName):
        with pytest.raises(x509.ExtensionNotFound):
            bare.extensions.get_extension_for_class(kind)


def test_output_takes_any_common_name(certs, tmp_path):
    name = "Dr. Ünïcode, \"quoted\"+plus=/slash"
    files = pki.issue_client(certs, name, output=tmp_path / "odd" / "weird.name")
    assert files == pki.IssuedFiles(tmp_path / "odd" / "weird.name.pem",
                                    tmp_path / "odd" / "weird.name.key")
    assert common_name(load(files.cert)) == name
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["ca", "server", "crl", "CA", "../escape", "a/b", "a b", "",
                                  ".hidden", "tab\t"])
def test_names_that_are_not_safe_file_names_are_refused(certs, name):
    before = sorted(certs.iterdir())
    with pytest.raises(pki.PkiError, match="file name|reserved"):
        pki.issue_client(certs, name)
    with pytest.raises(pki.PkiError, match="file name|reserved"):
        pki.issue_server(certs, name, ["example.com"])
    assert sorted(certs.iterdir()) == before


@pytest.mark.parametrize("arguments,message", [
    ({"extended_key_usage": ["anyPurpose"]}, "unknown extended key usage anyPurpose"),
    ({"extra_subject": {"DC": "example"}}, "unknown subject attribute DC"),
    ({"extra_subject": {"C": "Germany"}}, "invalid subject"),
    ({"san_ip": ["not-an-ip"]}, "invalid IP address 'not-an-ip'"),
    ({"days": 0}, "days must be at least 1"),
])
def test_bad_client_requests_are_refused(certs, arguments, message):
    with pytest.raises(pki.PkiError, match=message):
        pki.issue_client(certs, "bob", **arguments)
    assert not (certs / "bob.key").exists()


def test_issuing_without_a_ca_names_the_missing_file(tmp_path):
    with pytest.raises(pki.PkiError, match=r"ca\.pem not found.*certs init"):
        pki.issue_client(tmp_path, "alice")


def test_a_further_server_certificate_serves_only_its_own_hosts(certs):
    other = pki.issue_server(certs, "broker-b", ["b.example.com", "10.9.8.7"])
    cert = load(other.cert)
    assert common_name(cert) == "b.example.com"
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    handshake(certs, "b.example.com", server=other)
    handshake(certs, "10.9.8.7", server=other)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(certs, "localhost", server=other)
    with pytest.raises(pki.PkiError, match="at least one host"):
        pki.issue_server(certs, "nobody", [])


# ------------------------------------------------------------------ revocation


def test_revoked_serials_accumulate_in_the_signed_crl(certs):
    alice = pki.issue_client(certs, "alice")
    bob = pki.issue_client(certs, "bob")
    assert pki.revoke(certs, alice.cert) == certs / pki.CRL
    pki.revoke(certs, bob.cert, reason="keyCompromise")
    pki.revoke(certs, bob.cert)  # a second time changes nothing

    crl = load_crl(certs)
    assert crl.is_signature_valid(load(certs / "ca.pem").public_key())
    serials = [entry.serial_number for entry in crl]
    assert serials == [load(alice.cert).serial_number, load(bob.cert).serial_number]
    bob_entry = crl.get_revoked_certificate_by_serial_number(serials[1])
    assert bob_entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise)
    assert timedelta(days=29) < crl.next_update_utc - NOW <= timedelta(days=31)

    text = openssl("crl", "-in", certs / pki.CRL, "-noout", "-text").stdout
    for serial in serials:
        assert f"Serial Number: {serial_hex(serial)}" in text
    assert "Key Compromise" in text


def test_openssl_crl_check_refuses_a_client_once_revoked(certs):
    alice = pki.issue_client(certs, "alice")
    crl_check = ("-crl_check", "-CRLfile", str(certs / pki.CRL))
    before = openssl_verify(certs, alice.cert, *crl_check)
    assert before.returncode == 0, before.stdout + before.stderr

    pki.revoke(certs, alice.cert)
    after = openssl_verify(certs, alice.cert, *crl_check)
    assert after.returncode != 0
    assert "certificate revoked" in after.stdout + after.stderr
    # The server certificate stays good against the same CRL.
    assert openssl_verify(certs, certs / "server.pem", *crl_check).returncode == 0


def test_revoke_refuses_a_certificate_from_another_ca(certs, tmp_path):
    stranger = pki.issue_client(pki.init_pki(tmp_path / "other").cert.parent, "stranger")
    crl = (certs / pki.CRL).read_bytes()
    with pytest.raises(pki.PkiError, match="not issued by the CA"):
        pki.revoke(certs, stranger.cert)
    with pytest.raises(pki.PkiError, match="unknown revocation reason"):
        pki.revoke(certs, certs / "server.pem", reason="boredom")
    assert (certs / pki.CRL).read_bytes() == crl


# ------------------------------------------------------------------ describe


def test_describe_shows_each_certificate_of_a_chain(certs, tmp_path):
    expired = pki.issue_client(certs, "old", not_before=NOW - timedelta(days=3),
                               not_after=NOW - timedelta(days=2), san_dns=["old.example"])
    chain = tmp_path / "chain.pem"
    chain.write_bytes(expired.cert.read_bytes() + (certs / "ca.pem").read_bytes())
    cert = load(expired.cert)

    text = pki.describe(chain)
    first, second = text.split("\n\n")
    assert first.startswith("certificate 1 of 2\nsubject:      CN=old\n")
    assert f"serial:       {serial_hex(cert.serial_number)}" in first
    assert "alt names:    DNS:old.example" in first
    assert "(EXPIRED)" in first
    assert f"sha256:       {cert.fingerprint(hashes.SHA256()).hex(':').upper()}" in first
    assert "key:          EC secp256r1 (256 bits)" in first
    assert "key purposes: clientAuth" in first
    assert "subject:      CN=bastionmq development CA,O=bastionmq development" in second
    assert "CA:           yes" in second
    assert "EXPIRED" not in second

    future = pki.issue_client(certs, "soon", not_before=NOW + timedelta(days=1))
    assert "(not yet valid)" in pki.describe(future.cert)


# ------------------------------------------------------------------ command line


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["certs", *map(str, args)])


def test_cli_init_client_show_and_revoke(tmp_path):
    directory = tmp_path / "pki"
    result = invoke("init", directory, "--host", "mqtt.example.com")
    assert result.exit_code == 0, result.output
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "crl.pem"):
        assert f"wrote {directory / name}" in result.stdout
    assert f"bastionmq certs client NAME --dir {directory}" in result.stdout
    handshake(directory, "mqtt.example.com")

    result = invoke("client", "alice", "--dir", directory, "--rsa", "2048", "--days", "30")
    assert result.exit_code == 0, result.output
    cert = load(directory / "alice.pem")
    assert cert.public_key().key_size == 2048
    assert expires_in(cert, timedelta(days=30))
    assert (f"mosquitto_pub -h localhost -p 8883 --cafile {directory / 'ca.pem'} "
            f"--cert {directory / 'alice.pem'} --key {directory / 'alice.key'}") in result.stdout

    result = invoke("server", "edge", "--host", "edge.example", "--dir", directory)
    assert result.exit_code == 0, result.output
    assert common_name(load(directory / "edge.pem")) == "edge.example"

    result = invoke("show", directory / "alice.pem")
    assert result.exit_code == 0, result.output
    assert "subject:      CN=alice" in result.stdout
    assert "key:          RSA 2048 bits" in result.stdout

    result = invoke("revoke", directory / "alice.pem", "--dir", directory)
    assert result.exit_code == 0, result.output
    assert str(directory / "crl.pem") in result.stdout
    assert [entry.serial_number for entry in load_crl(directory)] == [cert.serial_number]


def test_cli_init_defaults_to_data_certs_and_refuses_to_overwrite(tmp_path, monkeypatch):
    runner = CliRunner()
    # A project directory: node.data_dir is data/, the PKI data/certs/.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "bastionmq.conf").write_text("")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["certs", "init"])
    assert result.exit_code == 0, result.output
    assert Path("data/certs/ca.pem").is_file()
    assert "next: bastionmq certs client NAME\n" in result.stdout
    ca = Path("data/certs/ca.pem").read_bytes()

    result = runner.invoke(main, ["certs", "init"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: data/certs/ca.pem already exists; replacing the CA invalidates every "
        "certificate it signed (use --force to do it)\n")
    assert Path("data/certs/ca.pem").read_bytes() == ca

    result = runner.invoke(main, ["certs", "init", "--force"])
    assert result.exit_code == 0, result.output
    assert Path("data/certs/ca.pem").read_bytes() != ca


@pytest.mark.parametrize("args,message", [
    (["show", "{tmp}/missing.pem"], "cannot read {tmp}/missing.pem"),
    (["show", "{tmp}/certs/ca.key"], "{tmp}/certs/ca.key does not hold a PEM or DER certificate"),
    (["client", "../alice", "--dir", "{tmp}/certs"], "'../alice' cannot be used as a file name"),
    (["client", "alice", "--dir", "{tmp}/empty"], "{tmp}/empty/ca.pem not found"),
    (["revoke", "{tmp}/certs/server.pem", "--dir", "{tmp}/empty"], "{tmp}/empty/ca.pem not found"),
])
def test_cli_errors_are_one_line_without_a_traceback(certs, tmp_path, args, message):
    result = invoke(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {message.format(tmp=tmp_path)}")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_client_and_server_refuse_to_replace_without_force(certs):
    assert invoke("client", "sensor-7", "--dir", certs).exit_code == 0
    first = (certs / "sensor-7.pem").read_bytes()
    again = invoke("client", "sensor-7", "--dir", certs)
    assert again.exit_code == 1
    assert "sensor-7.pem exists already; --force replaces it" in again.output
    assert "bastionmq certs revoke" in again.output
    assert (certs / "sensor-7.pem").read_bytes() == first
    forced = invoke("client", "sensor-7", "--dir", certs, "--force")
    assert forced.exit_code == 0, forced.output
    assert (certs / "sensor-7.pem").read_bytes() != first
    assert invoke("server", "edge", "--host", "edge.example", "--dir", certs).exit_code == 0
    refused = invoke("server", "edge", "--host", "edge.example", "--dir", certs)
    assert refused.exit_code == 1 and "--force" in refused.output


def test_cli_defaults_to_the_data_dir_of_the_configuration(tmp_path, monkeypatch):
    """Outside a project directory the PKI goes where the broker's first
    start makes it: node.data_dir/certs, the per-user directory here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    certs = tmp_path / "xdg" / "bastionmq" / "certs"
    result = invoke("init")
    assert result.exit_code == 0, result.output
    assert f"wrote {certs / 'ca.pem'} (CA certificate)" in result.stdout
    assert invoke("client", "c1").exit_code == 0
    assert (certs / "c1.pem").is_file()
    assert not (tmp_path / "data").exists()


def hint_config(tmp_path: Path, pki_dir: Path) -> Path:
    """ssl listeners on ports other than 8883, one per way of (not) checking the CRL."""
    crl = pki_dir / "crl.pem"
    ca = pki_dir / "ca.pem"
    config = tmp_path / "hints.conf"
    config.write_text(f"""
listeners.ssl.plain {{ bind = "0.0.0.0:9883", ssl_options {{ certfile = "{pki_dir}/server.pem"
  keyfile = "{pki_dir}/server.key", verify = verify_peer, cacertfile = "{ca}" }} }}
listeners.ssl.watched {{ bind = "127.0.0.1:9884", ssl_options {{ certfile = "{pki_dir}/server.pem"
  keyfile = "{pki_dir}/server.key", verify = verify_peer, cacertfile = "{ca}"
  enable_crl_check = true, crlfile = "{crl}" }} }}
listeners.ssl.manual {{ bind = "127.0.0.1:9885", ssl_options {{ certfile = "{pki_dir}/server.pem"
  keyfile = "{pki_dir}/server.key", verify = verify_peer, cacertfile = "{ca}"
  enable_crl_check = true, crlfile = "{crl}", watch_interval = 0s }} }}
listeners.ssl.other {{ bind = "127.0.0.1:9886", ssl_options {{ certfile = "{pki_dir}/server.pem"
  keyfile = "{pki_dir}/server.key", verify = verify_peer, cacertfile = "{ca}"
  enable_crl_check = true, crlfile = "{tmp_path}/other.crl" }} }}
listeners.wss.open {{ bind = "0.0.0.0:9887", ssl_options {{ certfile = "{pki_dir}/server.pem"
  keyfile = "{pki_dir}/server.key" }} }}
""")
    return config


def test_revoke_says_which_listeners_check_the_crl_and_what_to_change(certs, tmp_path):
    config = hint_config(tmp_path, certs)
    assert invoke("client", "gone", "--dir", certs, "-c", config).exit_code == 0
    result = invoke("revoke", certs / "gone.pem", "--dir", certs, "-c", config)
    assert result.exit_code == 0, result.output
    crl = certs / "crl.pem"
    lines = result.stdout.splitlines()
    reload = "kill -HUP <broker pid> or `bastionmq ctl reload`"
    assert (f"localhost:9883): does not check it (enable_crl_check = false). To check it, set "
            f'in listeners.ssl.plain.ssl_options: enable_crl_check = true, crlfile = "{crl}"'
            ) in result.stdout
    assert f"    then {reload}: ssl_options changes apply without a restart" in lines
    assert ("ssl:watched (127.0.0.1:9884): checks it. A running broker loads it within 2s by "
            "itself (ssl_options.watch_interval)") in result.stdout
    assert ("ssl:manual (127.0.0.1:9885): checks it, but a running broker must reload to see "
            f"it (ssl_options.watch_interval = 0s): {reload}") in result.stdout
    assert ("ssl:other (127.0.0.1:9886): checks CRLs, but not this file. To check it, set "
            f'listeners.ssl.other.ssl_options.crlfile = ["{tmp_path}/other.crl", "{crl}"]'
            ) in result.stdout
    assert ("wss:open (localhost:9887): does not check it: it asks for no client certificate "
            "(verify = verify_none). To check it, set in listeners.wss.open.ssl_options: "
            f'verify = verify_peer, enable_crl_check = true, crlfile = "{crl}"') in result.stdout
    assert "8883" not in result.stdout


def test_client_and_server_hints_use_the_configured_hosts_and_ports(certs, tmp_path):
    config = hint_config(tmp_path, certs)
    client = invoke("client", "s9", "--dir", certs, "-c", config)
    assert client.exit_code == 0, client.output
    for host, port in (("localhost", 9883), ("127.0.0.1", 9884), ("127.0.0.1", 9885)):
        assert (f"mosquitto_pub -h {host} -p {port} --cafile {certs / 'ca.pem'} "
                f"--cert {certs / 's9.pem'} --key {certs / 's9.key'}") in client.stdout
    assert "wss://localhost:9887/mqtt (wss:open)" in client.stdout
    server = invoke("server", "edge", "--host", "edge.example", "--dir", certs, "-c", config)
    assert server.exit_code == 0, server.output
    assert ('listeners.ssl.plain.ssl_options.server_names = [ { names = ["edge.example"], '
            f'certfile = "{certs / "edge.pem"}", keyfile = "{certs / "edge.key"}" }} ]'
            ) in server.stdout
    assert (f"openssl s_client -connect 127.0.0.1:9884 -servername edge.example "
            f"-CAfile {certs / 'ca.pem'}") in server.stdout
    assert "8883" not in client.stdout + server.stdout


def test_revoke_without_a_tls_listener_says_nothing_checks_it(certs, tmp_path):
    config = tmp_path / "tcp.conf"
    config.write_text('listeners.tcp.default.bind = "127.0.0.1:1883"\n')
    assert invoke("client", "lone", "--dir", certs).exit_code == 0
    result = invoke("revoke", certs / "lone.pem", "--dir", certs, "-c", config)
    assert result.exit_code == 0, result.output
    assert f"no ssl or wss listener is enabled in {config}: nothing checks this list yet" \
        in result.stdout
