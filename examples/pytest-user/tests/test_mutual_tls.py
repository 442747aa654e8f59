"""Mutual TLS: each device has a certificate, its CN is its username, and
the ACL gives each device its own topics only."""

import ssl

import pytest

ACL = """
{allow, all, publish, ["devices/${username}/#"]}.
{allow, {username, "dashboard"}, subscribe, ["devices/#"]}.
"""


@pytest.fixture
def broker(mqtt_broker_factory, mqtt_pki, tmp_path):
    acl = tmp_path / "acl.conf"
    acl.write_text(ACL)
    # verify_peer, fail_if_no_peer_cert and the CRL checked: ssl_listener's defaults.
    return mqtt_broker_factory(mqtt_pki.ssl_listener() + f"""
        mqtt.peer_cert_as_username = cn
        authorization {{
          no_match = deny
          sources = [ {{ type = file, path = "{acl}" }} ]
        }}
    """)


def test_a_device_publishes_only_under_its_own_name(broker, mqtt_pki, client):
    dashboard = client(broker.client_args(), tls=mqtt_pki.client("dashboard").context)
    assert dashboard.subscribe("devices/#") == [1]

    # Whatever client id it sends, the certificate says who it is.
    device = client(broker.client_args(), tls=mqtt_pki.client("sensor-1").context,
                    client_id="sensor-2")
    device.publish("devices/sensor-2/temperature", b"spoofed")  # denied
    device.publish("devices/sensor-1/temperature", b"19.0")

    # Sent after the denied one on the same connection: had that one been
    # delivered, it would have come first.
    assert dashboard.messages.get(timeout=10) == ("devices/sensor-1/temperature", b"19.0")


def test_a_device_may_not_read_the_others(broker, mqtt_pki, client):
    device = client(broker.client_args(), tls=mqtt_pki.client("sensor-1").context)
    assert device.subscribe("devices/#") == [0x87]  # not authorized


def test_a_revoked_certificate_no_longer_connects(broker, mqtt_pki, client):
    stolen = mqtt_pki.client("sensor-9")
    mqtt_pki.revoke(stolen)
    broker.reload_tls()  # rather than wait for the listener's file check
    # TLS 1.3: the client may finish its side of the handshake and hear of
    # the refusal only when it reads.
    try:
        refused = client(broker.client_args(), tls=stolen.context).connack != 0
    except (ssl.SSLError, OSError):
        refused = True
    assert refused
