"""Settings of the protocol core, named as EMQX 5 names its ``mqtt`` keys.

bastionmq.config structures the ``mqtt { ... }`` block of the HOCON file
straight onto this class, so each setting is declared once. A field's
``metadata["unit"]`` tells the config loader how to read it: ``size`` takes
EMQX sizes ("1MB" = 1048576 bytes), ``duration`` takes EMQX durations ("15s",
"2h"; a bare number is milliseconds) and is stored in seconds.
"""

from __future__ import annotations

import attrs
import re

from attrs import validators as v

from .shared import STRATEGIES

SIZE = {"unit": "size"}
DURATION = {"unit": "duration"}
#: The config file may say "disabled" for None.
DISABLED = {"none_word": "disabled"}
#: The config file may say "infinity" for None (no limit).
INFINITY = {"none_word": "infinity"}

#: Where a client's identity may come from in its verified TLS certificate.
PEER_CERT_SOURCES = ("disabled", "cn", "dn", "crt", "pem", "md5", "sha256", "spiffe_id",
                     "san_dns", "san_uri", "san_email", "san_ip")
_PEER_CERT_SOURCE_RE = re.compile(
    r"disabled|cn|dn|crt|pem|md5|sha256|spiffe_id|san_(dns|uri|email|ip)(:\d{1,3})?")


def peer_cert_source(instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not _PEER_CERT_SOURCE_RE.fullmatch(value):
        raise ValueError(f"must be one of {', '.join(PEER_CERT_SOURCES)} "
                         "(a san_* may take an index: san_dns:1)")


#: The default of ``max_subscriptions``, declared with the field's type:
#: attrs' stubs take a field's type from its default, and an ``int`` one would
#: refuse the validator that also lets the field be None ("infinity").
_DEFAULT_MAX_SUBSCRIPTIONS: int | None = 10_000


class SettingError(ValueError):
    """A setting that cannot be used as given, raised where it is used
    (a listener's TLS files, an authenticator, an ACL source). ``key`` is its
    path below the block its user was given; ``top_level`` keys are paths
    from the top of the file. The caller, who knows where that block sits,
    makes the full key path with ``key_path``."""

    def __init__(self, key: str, message: str, *, top_level: bool = False) -> None:
        super().__init__(message)
        self.key = key
        self.top_level = top_level

    def key_path(self, block: str) -> str:
        return self.key if self.top_level else f"{block}.{self.key}"


#: The largest packet MQTT can express: a remaining length of 268,435,455
#: plus a five-byte fixed header.
MAX_PACKET_SIZE_LIMIT = 268_435_460


@attrs.define(slots=True, frozen=True, kw_only=True)
class MqttSettings:
    """Protocol limits and session behaviour shared by every listener."""

    #: Largest packet accepted from a client; larger ones close the connection
    #: (5.0: DISCONNECT 0x95).
    max_packet_size: int = attrs.field(
        default=1024 * 1024, metadata=SIZE,
        validator=[v.ge(16), v.le(MAX_PACKET_SIZE_LIMIT)])
    #: Largest packet accepted from a client that has not authenticated yet
    #: (its CONNECT, AUTH packets, anything sent before its CONNACK): what an
    #: unauthenticated client can make the broker read and decode is bounded.
    max_connect_size: int = attrs.field(
        default=64 * 1024, metadata=SIZE, validator=[v.ge(64), v.le(MAX_PACKET_SIZE_LIMIT)])
    #: User properties one packet (a PUBLISH, a CONNECT or its will) may carry;
    #: beyond it the packet is refused with 0x97 (quota exceeded). Each costs
    #: memory wherever the message is kept (queues, the retained store).
    max_user_properties: int = attrs.field(default=128, validator=[v.ge(0), v.le(65535)])
    #: Longest client identifier accepted (CONNACK 0x85 / 2 beyond it).
    max_clientid_len: int = attrs.field(default=256, validator=[v.ge(23), v.le(65535)])
    #: Most levels a topic name or filter may have.
    max_topic_levels: int = attrs.field(default=128, validator=[v.ge(1), v.le(65535)])
    #: A connection that has not completed CONNECT by then is closed.
    idle_timeout: float = attrs.field(default=15.0, metadata=DURATION, validator=v.gt(0))
    #: A client silent for keepalive x this is disconnected ([MQTT-3.1.2-24]: 1.5).
    keepalive_multiplier: float = attrs.field(default=1.5, validator=[v.ge(1.0), v.le(10.0)])
    #: QoS 1/2 messages sent to a client and not yet acknowledged, at most.
    max_inflight: int = attrs.field(default=32, validator=[v.ge(1), v.le(65535)])
    #: Messages queued per session while it is offline or its window is full;
    #: beyond it the oldest is dropped and counted. 0 means no limit.
    max_mqueue_len: int = attrs.field(default=1000, validator=v.ge(0))
    #: Publisher flow control: when routing a message puts an online
    #: subscriber's queue at this length, the publisher that sent it is not
    #: read further (acknowledgements excepted) until the queue is back at a
    #: quarter of it. At most half of ``max_mqueue_len`` is used, so that the
    #: queue bound is never what stops a subscriber that keeps up.
    mqueue_high_watermark: int = attrs.field(default=256, validator=[v.ge(4), v.le(1_000_000)])
    #: A subscriber that holds its publishers back for longer than this at a
    #: stretch (it reads slowly or not at all) stops holding them back: its
    #: own queue bound applies to it until it has drained again.
    slow_subscriber_timeout: float = attrs.field(default=5.0, metadata=DURATION, validator=v.gt(0))
    #: Whether QoS 0 messages are queued for an offline persistent session.
    mqueue_store_qos0: bool = True
    #: Highest QoS accepted from clients and granted to subscriptions (CONNACK
    #: Maximum QoS); a 5.0 PUBLISH above it is refused with 0x9B.
    max_qos_allowed: int = attrs.field(default=2, validator=v.in_((0, 1, 2)))
    #: Whether retained messages are supported (CONNACK Retain Available); when
    #: off, a PUBLISH or will with RETAIN 1 is refused with 0x9A.
    retain_available: bool = True
    #: Whether filters may hold wildcards (CONNACK Wildcard Subscription
    #: Available); when off, such a filter is refused in the SUBACK (0xA2).
    wildcard_subscription: bool = True
    #: Whether ``$share/{group}/{filter}`` subscriptions are served (CONNACK
    #: Shared Subscription Available); when off, such a filter is refused (0x9E).
    shared_subscription: bool = True
    #: How a shared subscription's group picks the member for each message.
    shared_subscription_strategy: str = attrs.field(
        default="round_robin", validator=v.in_(STRATEGIES))
    #: Subscriptions one session may hold; a SUBSCRIBE beyond it is refused
    #: for that filter with 0x97 (quota exceeded). None: no limit.
    max_subscriptions: int | None = attrs.field(
        default=_DEFAULT_MAX_SUBSCRIPTIONS, metadata=INFINITY, validator=v.optional(v.ge(1)))
    #: Topic aliases a 5.0 client may set up (CONNACK Topic Alias Maximum), and
    #: the most the broker sets up toward a client that accepts them. Each
    #: holds a topic name for the connection's life, so the bound is also a
    #: memory bound; 0 turns aliases off both ways.
    max_topic_alias: int = attrs.field(default=64, validator=[v.ge(0), v.le(65535)])
    #: Keep alive the broker imposes on 5.0 clients (CONNACK Server Keep Alive),
    #: in seconds; "disabled" uses what each client asks for.
    server_keepalive: int | None = attrs.field(
        default=None, metadata=DISABLED,
        validator=v.optional([v.ge(1), v.le(65535)]))
    #: The longest keep alive a client may have, in seconds (Mosquitto's
    #: max_keepalive); "disabled": any. A 5.0 client asking for more, or for
    #: 0, is given this one as Server Keep Alive; one asking for less keeps
    #: its own. server_keepalive, when set, imposes one value on every 5.0
    #: client instead.
    max_keepalive: int | None = attrs.field(
        default=None, metadata=DISABLED, validator=v.optional([v.ge(1), v.le(65535)]))
    #: With max_keepalive: refuse a 3.1.1 client asking for more (or 0) with
    #: CONNACK 2 (Mosquitto's behaviour); otherwise it is served with its own
    #: value and a warning is logged.
    max_keepalive_refuse_v3: bool = False
    #: Incoming QoS 2 messages waiting for PUBREL, at most, per client.
    max_awaiting_rel: int = attrs.field(default=100, validator=[v.ge(1), v.le(65535)])
    #: Take the username / client id from the client's verified certificate
    #: (cn, dn, crt, pem, md5, sha256, san_dns[:N], san_uri[:N], san_email[:N],
    #: san_ip[:N], spiffe_id) instead of what it sent; disabled keeps what it sent.
    peer_cert_as_username: str = attrs.field(default="disabled", validator=peer_cert_source)
    peer_cert_as_clientid: str = attrs.field(default="disabled", validator=peer_cert_source)
    #: A session belongs to the identity that made it (username, and the
    #: verified certificate or PSK identity). Another identity presenting its
    #: client id is refused (CONNACK 0x87 / 5), or with "clean" ends it and
    #: gets a new session.
    session_takeover_by_other_identity: str = attrs.field(
        default="refuse", validator=v.in_(("refuse", "clean")))
    #: Use the username (after peer_cert_as_username) as the client id, as
    #: EMQX's option of the same name does; a client without one keeps its own.
    use_username_as_clientid: bool = False
    #: replace: the certificate's value replaces what the client sent;
    #: enforce: a client that sent something else is refused (CONNACK 0x85 /
    #: 0x86), so a device's own configuration mistakes show.
    peer_cert_identity: str = attrs.field(default="replace", validator=v.in_(("replace", "enforce")))
    #: How long a session outlives its connection: the cap for a 5.0 client's
    #: Session Expiry Interval, and the expiry of a 3.1.1 session made with
    #: clean session = 0.
    session_expiry_interval: float = attrs.field(
        default=7200.0, metadata=DURATION, validator=v.ge(0))
