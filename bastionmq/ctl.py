"""``bastionmq ctl``: operate a running broker through its management API.

The address comes from the configuration's ``http_api`` (or ``--url``), the
key from ``--api-key`` or ``BASTIONMQ_API_KEY``; over HTTPS the server is
checked against ``http_api.ssl_options.cacertfile`` (or ``--cacert``), and
``--cert``/``--key`` present a client certificate where the API asks for
one. ``api-key create`` is the exception: it writes the key into the
built-in database directly, since no key exists yet to ask the API with.
"""

from __future__ import annotations

import datetime
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import attrs
import click

from bastionmq.auth import builtin_db
from bastionmq.config import Config
from bastionmq.ops.keys import key_hash, new_key

TIMEOUT = 30.0


@attrs.define(slots=True)
class ApiClient:
    url: str
    key: str | None
    context: ssl.SSLContext | None
    as_json: bool

    def call(self, method: str, path: str, query: dict[str, Any] | None = None,
             body: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer; an error answer leaves through click."""
        query = {name: value for name, value in (query or {}).items() if value is not None}
        url = self.url.rstrip("/") + "/api/v1" + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=self.context) as answer:
                text = answer.read()
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    message = json.loads(exc.read()).get("message", exc.reason)
                except ValueError:
                    message = exc.reason
            raise click.ClickException(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise click.ClickException(f"cannot reach the management API at {self.url}: "
                                       f"{reason}") from None
        return json.loads(text) if text else None

    def done(self, method: str, path: str, message: str) -> None:
        """Make a call that answers nothing, and say what it did."""
        self.call(method, path)
        if not self.as_json:
            click.echo(message)

    def show(self, answer: Any, columns: Sequence[str] = ()) -> None:
        """``answer`` as JSON with --json, else as a table (lists) or key: value lines."""
        if self.as_json:
            click.echo(json.dumps(answer, indent=2, sort_keys=True))
            return
        if isinstance(answer, dict) and "data" in answer and "meta" in answer:
            meta = answer["meta"]
            _table(answer["data"], columns)
            if meta["count"] > len(answer["data"]):
                click.echo(f"(page {meta['page']}: {len(answer['data'])} of {meta['count']}; "
                           "--page N for more)")
            return
        if isinstance(answer, list):
            _table(answer, columns)
            return
        for name, value in (answer or {}).items():
            click.echo(f"{name}: {_cell(value)}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    columns = list(columns) or list(rows[0])
    cells = [[column.upper() for column in columns]]
    for row in rows:
        cells.append([_cell(_dig(row, column)) for column in columns])
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    for line in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _dig(row: dict[str, Any], column: str) -> Any:
    value: Any = row
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _client_context(config: Config, url: str, cacert: str | None, cert: str | None,
                    key: str | None) -> ssl.SSLContext | None:
    if not url.startswith("https:"):
        return None
    options = config.http_api.ssl_options
    cafile = cacert or (options.cacertfile if options is not None else None)
    context = ssl.create_default_context(cafile=cafile)
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise click.ClickException(f"--cert/--key: {exc}") from None
    return context


def _default_url(config: Config) -> str:
    api = config.http_api
    host = api.bind.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if api.ssl_options is not None else "http"
    if scheme == "https" and host in ("127.0.0.1", "[::1]"):
        host = "localhost"  # the name the development server certificate carries
    return f"{scheme}://{host}:{api.bind.port}"


def _paging(command: Any) -> Any:
    command = click.option("--limit", type=int, help="Items per page (default 100).")(command)
    return click.option("--page", type=int, help="Page, from 1.")(command)


def ctl_group(load: Any, config_option: Any, database_action: Any) -> click.Group:
    """The ``ctl`` command group; ``load``, ``config_option`` and
    ``database_action`` are the CLI's own (bastionmq.cli)."""

    @click.group()
    @config_option
    @click.option("--url", metavar="URL",
                  help="The operations listener (default: from http_api in the config).")
    @click.option("--api-key", envvar="BASTIONMQ_API_KEY", metavar="KEY",
                  help="An API key (default: $BASTIONMQ_API_KEY).")
    @click.option("--cacert", type=click.Path(dir_okay=False), metavar="FILE",
                  help="CA to check an HTTPS API with (default: http_api.ssl_options.cacertfile).")
    @click.option("--cert", type=click.Path(dir_okay=False), metavar="FILE",
                  help="Client certificate, where the API asks for one.")
    @click.option("--key", type=click.Path(dir_okay=False), metavar="FILE",
                  help="The client certificate's private key.")
    @click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
    @click.pass_context
    def ctl(context: click.Context, config_file: str | None, url: str | None,
            api_key: str | None, cacert: str | None, cert: str | None, key: str | None,
            as_json: bool) -> None:
        """Operate a running broker through its management API."""
        config, _ = load(config_file)
        context.obj = config
        if context.invoked_subcommand == "api-key":
            return
        url = url or _default_url(config)
        context.obj = ApiClient(url, api_key, _client_context(config, url, cacert, cert, key),
                                as_json)

    # ---------------------------------------------------------- API keys

    @ctl.group("api-key")
    def api_key() -> None:
        """Keys of the management API, in the built-in database."""

    @api_key.command("create")
    @click.argument("name")
    @click.option("--role", type=click.Choice(builtin_db.API_ROLES), default="viewer",
                  show_default=True, help="admin changes things; viewer only reads.")
    @click.pass_obj
    def api_key_create(config: Config, name: str, role: str) -> None:
        """Make a key and print it (once: only its hash is kept)."""
        secret = new_key()

        async def create(db: builtin_db.AuthDatabase) -> None:
            await db.add_api_key(name, role, key_hash(secret))
        database_action(config, create)
        click.echo(secret)
        click.echo(f"API key {name!r} ({role}) created; it is shown only now. Use it as "
                   "BASTIONMQ_API_KEY or 'Authorization: Bearer KEY'.", err=True)

    @api_key.command("list")
    @click.pass_obj
    def api_key_list(config: Config) -> None:
        """The keys' names and roles."""
        async def listed(db: builtin_db.AuthDatabase) -> list:
            return await db.list_api_keys()
        keys = database_action(config, listed)
        _table([{"name": k.name, "role": k.role,
                 "created": _iso(k.created_at)} for k in keys], ("name", "role", "created"))

    @api_key.command("delete")
    @click.argument("name")
    @click.pass_obj
    def api_key_delete(config: Config, name: str) -> None:
        """Delete a key: requests with it are refused at once."""
        async def delete(db: builtin_db.AuthDatabase) -> None:
            await db.delete_api_key(name)
        database_action(config, delete)
        click.echo(f"deleted API key {name!r}")

    # ---------------------------------------------------------- clients

    @ctl.group()
    def clients() -> None:
        """Connected clients and offline sessions."""

    @clients.command("list")
    @click.option("--listener", metavar="ID", help="Only this listener's (ssl:default).")
    @click.option("--username", metavar="U")
    @click.option("--clientid-prefix", metavar="P")
    @click.option("--cert-subject", metavar="S", help="Certificate subject containing S.")
    @_paging
    @click.pass_obj
    def clients_list(api: ApiClient, listener: str | None, username: str | None,
                     clientid_prefix: str | None, cert_subject: str | None,
                     page: int | None, limit: int | None) -> None:
        api.show(api.call("GET", "/clients", {
            "listener": listener, "username": username, "clientid_prefix": clientid_prefix,
            "cert_subject": cert_subject, "page": page, "limit": limit}),
            ("clientid", "username", "connected", "listener", "ip_address", "proto_ver",
             "tls.version", "cert.subject", "subscriptions_cnt", "mqueue_len"))

    @clients.command("show")
    @click.argument("clientid")
    @click.pass_obj
    def clients_show(api: ApiClient, clientid: str) -> None:
        api.show(api.call("GET", f"/clients/{_segment(clientid)}"))

    @clients.command("kick")
    @click.argument("clientid")
    @click.pass_obj
    def clients_kick(api: ApiClient, clientid: str) -> None:
        """Disconnect a client and end its session."""
        api.done("DELETE", f"/clients/{_segment(clientid)}", f"kicked {clientid}")

    @ctl.command()
    @click.option("--clientid", metavar="C")
    @click.option("--topic", metavar="FILTER")
    @click.option("--share-group", metavar="G")
    @_paging
    @click.pass_obj
    def subscriptions(api: ApiClient, clientid: str | None, topic: str | None,
                      share_group: str | None, page: int | None, limit: int | None) -> None:
        """Subscriptions of every session."""
        api.show(api.call("GET", "/subscriptions", {
            "clientid": clientid, "topic": topic, "share_group": share_group,
            "page": page, "limit": limit}), ("clientid", "topic", "qos", "nl", "rap", "rh"))

    # ---------------------------------------------------------- retained

    @ctl.group()
    def retained() -> None:
        """Retained messages."""

    @retained.command("list")
    @click.option("--topic", metavar="FILTER", help="Topics matching this filter (default #).")
    @_paging
    @click.pass_obj
    def retained_list(api: ApiClient, topic: str | None, page: int | None,
                      limit: int | None) -> None:
        api.show(api.call("GET", "/retained", {"topic": topic, "page": page, "limit": limit}),
                 ("topic", "qos", "payload_size"))

    @retained.command("show")
    @click.argument("topic")
    @click.pass_obj
    def retained_show(api: ApiClient, topic: str) -> None:
        api.show(api.call("GET", f"/retained/{_segment(topic, '/')}"))

    @retained.command("delete")
    @click.argument("topic")
    @click.pass_obj
    def retained_delete(api: ApiClient, topic: str) -> None:
        api.done("DELETE", f"/retained/{_segment(topic, '/')}", f"deleted the retained message of {topic}")

    @ctl.command()
    @click.argument("topic")
    @click.argument("payload")
    @click.option("--qos", type=click.IntRange(0, 2), default=0)
    @click.option("--retain", is_flag=True)
    @click.pass_obj
    def publish(api: ApiClient, topic: str, payload: str, qos: int, retain: bool) -> None:
        """Publish a message as the broker."""
        api.show(api.call("POST", "/publish", body={"topic": topic, "payload": payload,
                                                    "qos": qos, "retain": retain}))

    # ---------------------------------------------------------- banned

    @ctl.group()
    def banned() -> None:
        """The operator's bans."""

    @banned.command("list")
    @click.pass_obj
    def banned_list(api: ApiClient) -> None:
        api.show(api.call("GET", "/banned", {"limit": 1000}),
                 ("as", "who", "reason", "by", "until"))

    @banned.command("add")
    @click.argument("kind", type=click.Choice(builtin_db.BAN_KINDS))
    @click.argument("who")
    @click.option("--reason", default="")
    @click.option("--until", type=float, metavar="UNIX_TIME", help="Default: until lifted.")
    @click.pass_obj
    def banned_add(api: ApiClient, kind: str, who: str, reason: str,
                   until: float | None) -> None:
        """Ban a client id, username or peer address."""
        body: dict[str, Any] = {"as": kind, "who": who, "reason": reason}
        if until is not None:
            body["until"] = until
        api.show(api.call("POST", "/banned", body=body))

    @banned.command("delete")
    @click.argument("kind", type=click.Choice(builtin_db.BAN_KINDS))
    @click.argument("who")
    @click.pass_obj
    def banned_delete(api: ApiClient, kind: str, who: str) -> None:
        api.done("DELETE", f"/banned/{kind}/{_segment(who)}", f"lifted the ban of {kind} {who}")

    # ---------------------------------------------------------- users, rules

    @ctl.group()
    def users() -> None:
        """Users of the built-in database (through the API)."""

    @users.command("list")
    @click.pass_obj
    def users_list(api: ApiClient) -> None:
        api.show(api.call("GET", "/users", {"limit": 1000}),
                 ("user_id", "user_id_type", "is_superuser", "algorithm"))

    @users.command("add")
    @click.argument("user_id")
    @click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
    @click.option("--superuser", is_flag=True)
    @click.pass_obj
    def users_add(api: ApiClient, user_id: str, password: str, superuser: bool) -> None:
        api.show(api.call("POST", "/users", body={"user_id": user_id, "password": password,
                                                  "is_superuser": superuser}))

    @users.command("delete")
    @click.argument("user_id")
    @click.pass_obj
    def users_delete(api: ApiClient, user_id: str) -> None:
        api.done("DELETE", f"/users/{_segment(user_id)}", f"deleted user {user_id}")

    @ctl.group()
    def rules() -> None:
        """Authorization rules of the built-in database (through the API)."""

    @rules.command("list")
    @click.pass_obj
    def rules_list(api: ApiClient) -> None:
        api.show(api.call("GET", "/authorization/rules", {"limit": 1000}),
                 ("id", "who_type", "who", "position", "permission", "action", "topic"))

    @rules.command("add")
    @click.argument("permission", type=click.Choice(builtin_db.PERMISSIONS))
    @click.argument("action", type=click.Choice(builtin_db.ACTIONS))
    @click.argument("topic")
    @click.option("--username", metavar="U")
    @click.option("--clientid", metavar="C")
    @click.pass_obj
    def rules_add(api: ApiClient, permission: str, action: str, topic: str,
                  username: str | None, clientid: str | None) -> None:
        """Add a rule for a username, a client id, or (neither) every client."""
        if username and clientid:
            raise click.UsageError("a rule is for a --username or a --clientid, not both")
        who_type = "username" if username else "clientid" if clientid else "all"
        body: dict[str, Any] = {"who_type": who_type, "permission": permission, "action": action,
                "topic": topic}
        if username or clientid:
            body["who"] = username or clientid
        api.show(api.call("POST", "/authorization/rules", body=body))

    @rules.command("delete")
    @click.argument("rule_id", type=int)
    @click.pass_obj
    def rules_delete(api: ApiClient, rule_id: int) -> None:
        api.done("DELETE", f"/authorization/rules/{rule_id}", f"deleted rule {rule_id}")

    # ---------------------------------------------------------- node

    @ctl.command()
    @click.pass_obj
    def reload(api: ApiClient) -> None:
        """Reload the configuration file, TLS material, password files and ACLs."""
        report = api.call("POST", "/reload")
        if api.as_json:
            api.show(report)
            return
        for title, key in (("applied", "applied"), ("needs a restart", "restart_required"),
                           ("errors (nothing changed)", "errors")):
            if report[key]:
                click.echo(f"{title}:")
                for line in report[key]:
                    click.echo(f"  {line}")
        if not any(report.values()):
            click.echo("reloaded; no configuration key changed")
        if report["errors"]:
            raise click.exceptions.Exit(1)

    @ctl.command()
    @click.pass_obj
    def listeners(api: ApiClient) -> None:
        """Listeners, with their live TLS policy."""
        api.show(api.call("GET", "/listeners"),
                 ("id", "bind", "running", "current_connections", "max_connections",
                  "ssl_options.verify", "ssl_options.versions"))

    @ctl.command()
    @click.pass_obj
    def stats(api: ApiClient) -> None:
        """The node's figures."""
        api.show(api.call("GET", "/stats"))

    @ctl.group()
    def cluster() -> None:
        """The cluster of nodes on NATS (docs/cluster.md)."""

    @cluster.command("status")
    @click.pass_obj
    def cluster_status(api: ApiClient) -> None:
        """The nodes, their clients, and this node's connection to NATS."""
        answer = api.call("GET", "/cluster")
        if api.as_json or not answer.get("enabled"):
            api.show(answer)
            return
        nats = answer["nats"]
        state = "connected" if nats["connected"] else "NOT CONNECTED"
        click.echo(f"node {answer['node']}: {state} to NATS {nats['server'] or '-'} "
                   f"({nats['server_name'] or '?'}, nats-server {nats['version'] or '?'}"
                   f"{', TLS' if nats['tls'] else ''})")
        _table(answer["nodes"], ("node", "this", "clients", "connections", "sessions",
                                 "subscriptions"))

    return ctl


def _segment(value: str, safe: str = "") -> str:
    return urllib.parse.quote(value, safe=safe)


def _iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%SZ")
