"""The management API: JSON under ``/api/v1/``, with EMQX's names where EMQX
has them (clients, subscriptions, banned, publish...).

Every endpoint is one row of ENDPOINTS; the routes, the role each needs
(reading: viewer; changing: admin) and the OpenAPI document served at
``/api/v1/openapi.json`` are all made from that table, so they cannot
disagree. Lists are paged: ``page`` (from 1) and ``limit`` (at most 1000),
answered as ``{"data": [...], "meta": {"page", "limit", "count"}}``.
Errors are ``{"code": "NOT_FOUND", "message": "..."}`` with the HTTP status.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Iterator, Mapping

import attrs
from aiohttp import web

from bastionmq.auth.builtin_db import (
    ACTIONS, BAN_KINDS, PERMISSIONS, WHO_TYPES, AclRule, AlreadyExists,
    AuthDatabaseError, Ban, NotFound, UserRecord,
)
from bastionmq.auth.passwords import PasswordHash

from .keys import ADMIN, REQUEST_KEY, VIEWER

log = logging.getLogger("bastionmq.ops")

PREFIX = "/api/v1"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@attrs.define(slots=True, frozen=True)
class Endpoint:
    method: str
    #: aiohttp's form: ``{name}`` for a path segment, ``{name:.+}`` for a rest
    #: of path (a topic with slashes).
    path: str
    #: The ManagementApi method that serves it.
    handler: str
    summary: str
    tag: str
    #: Query parameters: (name, JSON type, description).
    query: tuple[tuple[str, str, str], ...] = ()
    #: The JSON Schema of the request body.
    body: Mapping[str, Any] | None = None

    @property
    def role(self) -> str:
        return VIEWER if self.method == "GET" else ADMIN


_PAGING = (("page", "integer", "Page number, from 1."),
           ("limit", "integer", f"Items per page (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})."))


def _object(required: Iterable[str], **properties: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties,
            "additionalProperties": False}


_STRING = {"type": "string"}
_BOOLEAN = {"type": "boolean"}
_QOS = {"type": "integer", "enum": [0, 1, 2]}

ENDPOINTS = (
    Endpoint("GET", "/clients", "list_clients", "Clients (connected, and offline sessions)",
             "clients", (*_PAGING,
                         ("listener", "string", "Only clients of this listener (tcp:default)."),
                         ("username", "string", "Only clients with this username."),
                         ("clientid_prefix", "string", "Only client ids starting with this."),
                         ("cert_subject", "string",
                          "Only clients whose certificate subject contains this."),
                         ("connected", "boolean", "Only connected (true) or offline (false)."))),
    Endpoint("GET", "/clients/{clientid}", "get_client",
             "One client: its connection, TLS, certificate, subscriptions, queue", "clients"),
    Endpoint("DELETE", "/clients/{clientid}", "kick_client",
             "Kick a client: disconnect it (5.0: reason 0x98) and end its session", "clients"),
    Endpoint("GET", "/clients/{clientid}/subscriptions", "client_subscriptions",
             "A client's subscriptions", "clients"),
    Endpoint("GET", "/subscriptions", "list_subscriptions", "Subscriptions of every session",
             "subscriptions", (*_PAGING,
                               ("clientid", "string", "Only this client's."),
                               ("topic", "string", "Only this filter (exactly)."),
                               ("share_group", "string", "Only this shared group's."))),
    Endpoint("GET", "/retained", "list_retained", "Retained messages (without payloads)",
             "retained", (*_PAGING, ("topic", "string",
                                     "A topic filter the topics match (default #)."))),
    Endpoint("GET", "/retained/{topic:.+}", "get_retained",
             "One retained message, its payload in base64", "retained"),
    Endpoint("DELETE", "/retained/{topic:.+}", "delete_retained",
             "Delete a retained message (subscribers are not told)", "retained"),
    Endpoint("POST", "/publish", "publish", "Publish a message as the broker", "publish",
             body=_object(
                 ["topic"], topic=_STRING, payload=_STRING,
                 payload_encoding={"type": "string", "enum": ["plain", "base64"]},
                 qos=_QOS, retain=_BOOLEAN,
                 properties={"type": "object", "description":
                             "MQTT 5 properties: message_expiry_interval, content_type, "
                             "response_topic, payload_format_indicator, "
                             "user_property (object of strings)"})),
    Endpoint("GET", "/banned", "list_banned", "The operator's bans", "banned", _PAGING),
    Endpoint("POST", "/banned", "add_banned",
             "Ban a client id, username or peer address (connected ones are disconnected)",
             "banned", body=_object(
                 ["as", "who"], who=_STRING, reason=_STRING,
                 until={"type": "number", "description": "Unix time; absent: until removed"},
                 **{"as": {"type": "string", "enum": list(BAN_KINDS)}})),
    Endpoint("DELETE", "/banned/{as}/{who}", "delete_banned", "Lift a ban", "banned"),
    Endpoint("GET", "/users", "list_users", "Users of the built-in database", "users", _PAGING),
    Endpoint("POST", "/users", "add_user", "Add a user", "users", body=_object(
        ["user_id", "password"], user_id=_STRING, password=_STRING, is_superuser=_BOOLEAN,
        user_id_type={"type": "string", "enum": ["username", "clientid"]})),
    Endpoint("PUT", "/users/{user_id}", "change_user", "Set a user's password", "users",
             (("user_id_type", "string", "username (default) or clientid"),),
             body=_object(["password"], password=_STRING)),
    Endpoint("DELETE", "/users/{user_id}", "delete_user", "Delete a user", "users",
             (("user_id_type", "string", "username (default) or clientid"),)),
    Endpoint("GET", "/authorization/rules", "list_rules",
             "Authorization rules of the built-in database, in the order they are tried",
             "authorization", (*_PAGING, ("who_type", "string", "clientid, username or all"),
                               ("who", "string", "Only this client id's or username's."))),
    Endpoint("POST", "/authorization/rules", "add_rule", "Add a rule", "authorization",
             body=_object(
                 ["who_type", "permission", "action", "topic"],
                 who_type={"type": "string", "enum": list(WHO_TYPES)}, who=_STRING,
                 permission={"type": "string", "enum": list(PERMISSIONS)},
                 action={"type": "string", "enum": list(ACTIONS)}, topic=_STRING,
                 qos={"type": "array", "items": _QOS}, retain=_BOOLEAN,
                 position={"type": "integer", "minimum": 1})),
    Endpoint("DELETE", "/authorization/rules/{id}", "delete_rule", "Delete a rule",
             "authorization"),
    Endpoint("POST", "/reload", "reload",
             "Reload the configuration file, TLS material, password files and ACLs",
             "node"),
    Endpoint("GET", "/listeners", "list_listeners", "Listeners, with their live TLS policy",
             "node"),
    Endpoint("GET", "/stats", "stats", "The node's figures", "node"),
    Endpoint("GET", "/cluster", "cluster", "The nodes of the cluster and this node's "
             "connection to NATS (docs/cluster.md)", "node"),
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _not_found(what: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", what)


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BAD_REQUEST", message)


def _isotime(unix: float | None) -> str | None:
    if unix is None:
        return None
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat()


class ManagementApi:
    """Serves ENDPOINTS for ``broker`` (the embedding API's Broker)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    def routes(self) -> Iterator[tuple[Endpoint, Callable[[web.Request], Awaitable[web.Response]]]]:
        for endpoint in ENDPOINTS:
            yield endpoint, self._wrap(endpoint, getattr(self, endpoint.handler))

    def _wrap(self, endpoint: Endpoint, handler: Callable[[web.Request], Awaitable[Any]]
              ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            if self.broker.core is None:
                return error_response(503, "NOT_RUNNING", "the broker is not started")
            try:
                answer = await handler(request)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message)
            except NotFound as exc:
                return error_response(404, "NOT_FOUND", str(exc))
            except AlreadyExists as exc:
                return error_response(409, "ALREADY_EXISTS", str(exc))
            except (AuthDatabaseError, ValueError) as exc:
                return error_response(400, "BAD_REQUEST", str(exc))
            if endpoint.role == ADMIN:
                log.info("management API: %s %s by key %s", request.method, request.path,
                         REQUEST_KEY.get())
            if isinstance(answer, web.Response):
                return answer
            return web.json_response(answer, status=201 if endpoint.method == "POST" else 200)
        return serve

    # ------------------------------------------------------------ helpers

    @property
    def core(self) -> Any:
        return self.broker.core

    @property
    def database(self) -> Any:
        database = self.broker.database
        if database is None:
            raise ApiError(503, "NO_DATABASE", "the built-in database is not open")
        return database

    def _session(self, client_id: str) -> Any:
        session = self.core.sessions.get(client_id)
        if session is None:
            raise _not_found(f"no client {client_id!r}")
        return session

    async def _json(self, request: web.Request, endpoint_name: str) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad_request(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        schema = next(e.body for e in ENDPOINTS if e.handler == endpoint_name)
        assert schema is not None  # every endpoint that reads a body declares it
        known = schema["properties"]
        unknown = sorted(set(body) - set(known))
        if unknown:
            raise _bad_request(f"unknown field(s): {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        missing = [name for name in schema["required"] if name not in body]
        if missing:
            raise _bad_request(f"missing field(s): {', '.join(missing)}")
        return body

    # ------------------------------------------------------------ clients

    def _client_view(self, session: Any, detail: bool = False) -> dict[str, Any]:
        connection = session.connection
        client = session.client
        view: dict[str, Any] = {
            "clientid": session.client_id,
            "username": client.username if client is not None else None,
            "connected": connection is not None,
            "expiry_interval": session.expiry_interval,
            "subscriptions_cnt": len(session.subscriptions),
            "mqueue_len": len(session.queue) if session.queue else 0,
            "inflight_cnt": len(session.inflight) if session.inflight else 0,
        }
        peer = connection.peer if connection is not None else (
            client.peer if client is not None else None)
        if peer is not None:
            view["listener"] = peer.listener
            view["ip_address"] = peer.address[0] if peer.address else None
            view["port"] = peer.address[1] if peer.address else None
        if connection is not None:
            view["proto_ver"] = connection.version
            view["keepalive"] = connection.keepalive
            view["connected_at"] = _isotime(connection.connected_at)
        else:
            offline_since = session.offline_since
            view["disconnected_at"] = None if offline_since is None else _isotime(
                time.time() - (self.core.loop.time() - offline_since))
        if peer is not None and peer.tls:
            view["tls"] = {"version": peer.tls_version, "cipher": peer.cipher,
                           "sni": peer.sni, "psk_identity": peer.psk_identity}
        certificate = peer.certificate if peer is not None else None
        if certificate is not None:
            view["cert"] = {
                "subject": certificate.subject, "common_name": certificate.common_name,
                "issuer": certificate.issuer if detail else None,
                "serial": (format(certificate.serial, "x")
                           if detail and certificate.serial is not None else None),
                "sha256": certificate.sha256 if detail else None,
                # None for a certificate a load balancer verified (CN only).
                "not_after": (certificate.not_after.isoformat()
                              if certificate.not_after is not None else None),
            }
            if not detail:
                view["cert"] = {k: v for k, v in view["cert"].items() if v is not None}
        if detail:
            view["subscriptions"] = self._subscriptions_of(session)
        return view

    async def list_clients(self, request: web.Request) -> dict[str, Any]:
        query = request.query
        listener = query.get("listener")
        username = query.get("username")
        prefix = query.get("clientid_prefix", "")
        subject = query.get("cert_subject")
        connected = _optional_bool(query, "connected")
        found = []
        for client_id in sorted(self.core.sessions):
            session = self.core.sessions[client_id]
            if not client_id.startswith(prefix):
                continue
            if connected is not None and (session.connection is not None) != connected:
                continue
            client = session.client
            peer = session.connection.peer if session.connection is not None else (
                client.peer if client is not None else None)
            if listener is not None and (peer is None or peer.listener != listener):
                continue
            if username is not None and (client is None or client.username != username):
                continue
            if subject is not None and (peer is None or peer.certificate is None
                                        or subject not in (peer.certificate.subject or "")):
                continue
            found.append(session)
        return _page(request, found, self._client_view)

    async def get_client(self, request: web.Request) -> dict[str, Any]:
        return self._client_view(self._session(request.match_info["clientid"]), detail=True)

    async def kick_client(self, request: web.Request) -> web.Response:
        session = self._session(request.match_info["clientid"])
        self.broker.kick(session.client_id, f"kicked through the management API by key "
                                            f"{REQUEST_KEY.get()}")
        return web.Response(status=204)

    def _subscriptions_of(self, session: Any) -> list[dict[str, Any]]:
        found = []
        for topic_filter, entry in session.subscriptions.items():
            options = entry.options
            found.append({"clientid": session.client_id, "topic": topic_filter,
                          "qos": options.qos, "nl": int(options.no_local),
                          "rap": int(options.retain_as_published),
                          "rh": options.retain_handling,
                          "subscription_id": entry.identifier})
        return found

    async def client_subscriptions(self, request: web.Request) -> list[dict[str, Any]]:
        return self._subscriptions_of(self._session(request.match_info["clientid"]))

    async def list_subscriptions(self, request: web.Request) -> dict[str, Any]:
        query = request.query
        client_id = query.get("clientid")
        topic = query.get("topic")
        group = query.get("share_group")
        sessions = self.core.sessions
        chosen = ([sessions[client_id]] if client_id in sessions else []) if client_id else [
            sessions[key] for key in sorted(sessions)]
        found = [subscription for session in chosen
                 for subscription in self._subscriptions_of(session)
                 if (topic is None or subscription["topic"] == topic)
                 and (group is None or subscription["topic"].startswith(f"$share/{group}/"))]
        return _page(request, found, lambda item: item)

    # ------------------------------------------------------------ retained

    def _retained_view(self, message: Any, payload: bool = False) -> dict[str, Any]:
        view = {"topic": message.topic, "qos": message.qos,
                "payload_size": len(message.payload)}
        if payload:
            view["payload"] = base64.b64encode(message.payload).decode()
        return view

    async def list_retained(self, request: web.Request) -> dict[str, Any]:
        topic_filter = request.query.get("topic", "#")
        try:
            messages = self.core.retained.match(topic_filter)
        except ValueError as exc:
            raise _bad_request(f"topic {topic_filter!r}: {exc}") from None
        messages.sort(key=lambda message: message.topic)
        return _page(request, messages, self._retained_view)

    def _retained(self, request: web.Request) -> Any:
        topic = request.match_info["topic"]
        message = self.core.retained.get(topic)
        if message is None:
            raise _not_found(f"no retained message on {topic!r}")
        return message

    async def get_retained(self, request: web.Request) -> dict[str, Any]:
        return self._retained_view(self._retained(request), payload=True)

    async def delete_retained(self, request: web.Request) -> web.Response:
        self.core.forget_retained(self._retained(request).topic)
        if self.broker.store is not None:
            await self.broker.store.committed()
        return web.Response(status=204)

    # ------------------------------------------------------------ publish

    async def publish(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request, "publish")
        payload = body.get("payload", "")
        if not isinstance(payload, str):
            raise _bad_request("payload must be a string (plain text, or base64)")
        encoding = body.get("payload_encoding", "plain")
        if encoding == "base64":
            try:
                data = base64.b64decode(payload, validate=True)
            except binascii.Error as exc:
                raise _bad_request(f"payload is not base64: {exc}") from None
        elif encoding == "plain":
            data = payload.encode("utf-8")
        else:
            raise _bad_request("payload_encoding must be plain or base64")
        matched = await self.broker.publish(
            _typed(body, "topic", str), data, _typed(body, "qos", int, 0),
            _typed(body, "retain", bool, False), _properties(body.get("properties")))
        return {"matched": matched}

    # ------------------------------------------------------------ banned

    async def list_banned(self, request: web.Request) -> dict[str, Any]:
        return _page(request, list(self.broker.bans), _ban_view)

    async def add_banned(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request, "add_banned")
        until = body.get("until")
        if until is not None and (not isinstance(until, (int, float)) or isinstance(until, bool)
                                  or until <= time.time()):
            raise _bad_request("until must be a Unix time in the future")
        ban = Ban(_typed(body, "as", str), _typed(body, "who", str),
                  _typed(body, "reason", str, ""), REQUEST_KEY.get(), 0.0, until)
        return _ban_view(await self.broker.ban(ban))

    async def delete_banned(self, request: web.Request) -> web.Response:
        await self.broker.unban(request.match_info["as"], request.match_info["who"])
        return web.Response(status=204)

    # ------------------------------------------------------------ users

    async def list_users(self, request: web.Request) -> dict[str, Any]:
        users = await self.database.list_users()
        return _page(request, users, _user_view)

    def _password_hashing(self) -> PasswordHash:
        configured = self.broker.config.builtin_authenticator("password_based")
        return configured.password_hash_algorithm if configured is not None else PasswordHash()

    async def add_user(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request, "add_user")
        configured = self.broker.config.builtin_authenticator("password_based")
        user_id_type = _typed(body, "user_id_type", str,
                              configured.user_id_type if configured is not None else "username")
        user = await self.database.add_user(
            _typed(body, "user_id", str), _password(body), self._password_hashing(),
            user_id_type, _typed(body, "is_superuser", bool, False))
        return _user_view(user)

    async def change_user(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request, "change_user")
        user_id = request.match_info["user_id"]
        user_id_type = request.query.get("user_id_type", "username")
        await self.database.set_password(user_id, _password(body), user_id_type,
                                          self._password_hashing())
        user = await self.database.get_user(user_id, user_id_type)
        return _user_view(user)

    async def delete_user(self, request: web.Request) -> web.Response:
        await self.database.delete_user(request.match_info["user_id"],
                                        request.query.get("user_id_type", "username"))
        return web.Response(status=204)

    # ------------------------------------------------------------ rules

    async def list_rules(self, request: web.Request) -> dict[str, Any]:
        rules = await self.database.list_rules(request.query.get("who_type"),
                                               request.query.get("who"))
        return _page(request, rules, _rule_view)

    async def add_rule(self, request: web.Request) -> dict[str, Any]:
        body = await self._json(request, "add_rule")
        who_type = _typed(body, "who_type", str)
        who = _typed(body, "who", str, None)
        if (who is None) != (who_type == "all"):
            raise _bad_request("who names the client id or username; none for who_type all")
        qos = body.get("qos")
        if qos is not None and (not isinstance(qos, list)
                                or not all(level in (0, 1, 2) for level in qos)):
            raise _bad_request("qos must be a list of levels 0, 1, 2")
        rule = await self.database.add_rule(
            who_type, who, _typed(body, "permission", str), _typed(body, "action", str),
            _typed(body, "topic", str), qos=qos, retain=_typed(body, "retain", bool, None),
            position=_typed(body, "position", int, None))
        self.broker.rules_changed()
        return _rule_view(rule)

    async def delete_rule(self, request: web.Request) -> web.Response:
        try:
            rule_id = int(request.match_info["id"])
        except ValueError:
            raise _bad_request("a rule id is a number") from None
        await self.database.delete_rule(rule_id)
        self.broker.rules_changed()
        return web.Response(status=204)

    # ------------------------------------------------------------ node

    async def reload(self, request: web.Request) -> dict[str, Any]:
        report = await self.broker.reload_config(f"management API key {REQUEST_KEY.get()}")
        return report.as_json()

    async def list_listeners(self, request: web.Request) -> list[dict[str, Any]]:
        return [_listener_view(listener)
                for _, listener in sorted(self.broker.listeners.items())]

    async def stats(self, request: web.Request) -> dict[str, Any]:
        core = self.core
        sessions = core.sessions.values()
        connected = sum(1 for session in sessions if session.connection is not None)
        figures = attrs.asdict(core.stats)
        figures["connacks"] = {str(code): count for code, count in figures["connacks"].items()}
        return {
            "connections": len(core.connections),
            "sessions": {"connected": connected, "offline": len(core.sessions) - connected},
            "subscriptions": core.subscription_count(),
            "shared_groups": len(core.groups),
            "retained": len(core.retained),
            "queued": sum(len(s.queue) for s in sessions if s.queue),
            "inflight": sum(len(s.inflight) for s in sessions if s.inflight),
            "banned": len(self.broker.bans),
            "counters": figures,
        }

    async def cluster(self, request: web.Request) -> dict[str, Any]:
        bus = self.broker.bus
        if bus is None:
            return {"enabled": False}
        return {"enabled": True, **bus.status()}



# ---------------------------------------------------------------- views


def error_response(status: int, code: str, message: str) -> web.Response:
    """The API's error answer; a 401 says how to authenticate."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


def _optional_bool(query: Mapping[str, str], name: str) -> bool | None:
    value = query.get(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise _bad_request(f"{name} must be true or false")
    return value == "true"


def _page(request: web.Request, items: list[Any], view: Callable[[Any], Any]) -> dict[str, Any]:
    try:
        page = int(request.query.get("page", 1))
        limit = int(request.query.get("limit", DEFAULT_LIMIT))
    except ValueError:
        raise _bad_request("page and limit are whole numbers") from None
    if page < 1 or not 1 <= limit <= MAX_LIMIT:
        raise _bad_request(f"page is from 1, limit from 1 to {MAX_LIMIT}")
    start = (page - 1) * limit
    return {"data": [view(item) for item in items[start:start + limit]],
            "meta": {"page": page, "limit": limit, "count": len(items)}}


_MISSING = object()


def _typed(body: Mapping[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is None):
        if default is _MISSING:
            raise _bad_request(f"missing field: {name}")
        return default
    # bool is an int in Python; JSON keeps them apart, and so does the API.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad_request(f"{name} must be a {kind.__name__}, not {value!r}")
    return value


def _password(body: Mapping[str, Any]) -> str:
    password = _typed(body, "password", str)
    if not password:
        raise _bad_request("the password must not be empty")
    return password


_PROPERTY_TYPES = {"message_expiry_interval": int, "content_type": str, "response_topic": str,
                   "payload_format_indicator": int, "correlation_data": str}


def _properties(given: Any) -> dict[str, Any] | None:
    if given is None:
        return None
    if not isinstance(given, dict):
        raise _bad_request("properties must be an object")
    properties: dict[str, Any] = {}
    for name, value in given.items():
        if name == "user_property":
            if not isinstance(value, dict) or not all(
                    isinstance(v, str) for v in value.values()):
                raise _bad_request("user_property must be an object of strings")
            properties["user_property"] = list(value.items())
        elif name in _PROPERTY_TYPES:
            properties[name] = _typed(given, name, _PROPERTY_TYPES[name])
            if name == "correlation_data":
                properties[name] = value.encode("utf-8")
        else:
            raise _bad_request(f"unknown property {name!r}; known: user_property, "
                               f"{', '.join(sorted(_PROPERTY_TYPES))}")
    return properties


def _ban_view(ban: Ban) -> dict[str, Any]:
    return {"as": ban.kind, "who": ban.value, "reason": ban.reason, "by": ban.by,
            "at": _isotime(ban.created_at), "until": _isotime(ban.until)}


def _user_view(user: UserRecord) -> dict[str, Any]:
    return {"user_id": user.user_id, "user_id_type": user.user_id_type,
            "is_superuser": user.is_superuser, "algorithm": user.algorithm.name}


def _rule_view(rule: AclRule) -> dict[str, Any]:
    return {"id": rule.id, "who_type": rule.who_type, "who": rule.who,
            "position": rule.position, "permission": rule.permission, "action": rule.action,
            "topic": rule.topic, "qos": None if rule.qos is None else list(rule.qos),
            "retain": rule.retain}


def _listener_view(listener: Any) -> dict[str, Any]:
    host, port = listener.address if listener.address else (listener.host, listener.port)
    view: dict[str, Any] = {
        "id": listener.id, "type": listener.kind, "bind": f"{host}:{port}",
        "running": listener.accepting, "current_connections": listener.connection_count,
        "max_connections": listener.max_connections,
        "proxy_protocol": getattr(listener, "proxy", None) is not None,
    }
    options = getattr(listener, "options", None)
    material = getattr(listener, "material", None)
    if material is not None and options is not None:
        view["ssl_options"] = {
            "verify": options.verify, "fail_if_no_peer_cert": options.fail_if_no_peer_cert,
            "versions": list(options.versions), "ciphers": list(options.ciphers),
            "enable_crl_check": options.enable_crl_check,
            "handshake_timeout": options.handshake_timeout,
            "certificates": [{"role": role, "subject": subject, "not_after": _isotime(when)}
                             for role, subject, when in material.certificates],
        }
    return view

