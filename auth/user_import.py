"""Users imported from a file, as EMQX's ``import_users`` reads them: CSV
with a header line, or a JSON array of objects (by the file's extension).
What the fields mean, and how strictly they are checked, is told in
auth/builtin_db.py, which imports the users this module reads."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import attrs


class UserFileError(ValueError):
    """An import file that cannot be read as users; the message names the
    file and the line (CSV) or entry (JSON)."""


@attrs.define(slots=True, frozen=True)
class ImportUser:
    """One entry of an import file; exactly one of password_hash and password."""

    user_id: str
    is_superuser: bool = False
    password_hash: str | None = attrs.field(default=None, repr=False)
    salt: str = attrs.field(default="", repr=False)
    password: str | None = attrs.field(default=None, repr=False)


_IMPORT_FIELDS = ("user_id", "password_hash", "salt", "is_superuser", "password")
_PASSWORD_TYPES = ("hash", "plain")


def parse_user_file(source: str, data: bytes, password_type: str | None = None
                    ) -> list[ImportUser]:
    """The users of an EMQX import file, read by its extension (.csv, .json).
    Raises UserFileError naming ``source`` and the line or entry."""
    if password_type not in (None, *_PASSWORD_TYPES):
        raise ValueError(f"password type {password_type!r} is not hash or plain")
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte order mark is no field name
    except UnicodeDecodeError:
        raise UserFileError(f"{source}: not UTF-8 text") from None
    extension = os.path.splitext(source)[1].lower()
    if extension == ".csv":
        entries = _csv_entries(source, text)
    elif extension == ".json":
        entries = _json_entries(source, text)
    else:
        raise UserFileError(f"{source}: unknown file type {extension or '(none)'!r}; "
                            "EMQX's user files are .csv or .json")
    users: list[ImportUser] = []
    seen: dict[str, str] = {}
    for where, fields in entries:
        user = _import_user(f"{source}: {where}", fields, password_type)
        if user.user_id in seen:
            raise UserFileError(f"{source}: {where}: user_id {user.user_id!r} is given "
                                f"again (first at {seen[user.user_id]})")
        seen[user.user_id] = where
        users.append(user)
    if not users:
        raise UserFileError(f"{source}: no users in the file")
    return users


def _csv_entries(source: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
    header = reader.fieldnames or []
    unknown = [name for name in header if name not in _IMPORT_FIELDS]
    if unknown:
        raise UserFileError(f"{source}: line 1: unknown column {unknown[0]!r} (known: "
                            f"{', '.join(_IMPORT_FIELDS)})")
    entries = []
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if "\0extra" in row:
                raise UserFileError(f"{source}: {where}: more fields than the header names")
            if not any(row.values()):
                continue  # a blank line
            # EMQX reads CSV with empty fields as absent ones.
            entries.append((where, {key: value for key, value in row.items() if value}))
    except csv.Error as exc:
        raise UserFileError(f"{source}: line {reader.line_num}: {exc}") from None
    return entries


def _json_entries(source: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserFileError(f"{source}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise UserFileError(f"{source}: the file must hold a JSON array of users")
    entries = []
    for index, item in enumerate(value, 1):
        where = f"entry {index}"
        if not isinstance(item, dict):
            raise UserFileError(f"{source}: {where}: a user is an object"
                                " ({\"user_id\": ..., \"password_hash\": ...})")
        unknown = [key for key in item if key not in _IMPORT_FIELDS]
        if unknown:
            raise UserFileError(f"{source}: {where}: unknown key {unknown[0]!r} (known: "
                                f"{', '.join(_IMPORT_FIELDS)})")
        entries.append((where, {key: value for key, value in item.items() if value is not None}))
    return entries


def _import_user(where: str, fields: dict[str, Any], password_type: str | None) -> ImportUser:
    for key, value in fields.items():
        if key != "is_superuser" and not isinstance(value, str):
            raise UserFileError(f"{where}: {key} must be a string")
    user_id = fields.get("user_id")
    if not user_id:
        raise UserFileError(f"{where}: user_id is missing")
    superuser = fields.get("is_superuser", False)
    if isinstance(superuser, str) and superuser.lower() in ("true", "false"):
        superuser = superuser.lower() == "true"
    if not isinstance(superuser, bool):
        raise UserFileError(f"{where}: is_superuser {superuser!r} is not true or false")
    kind = password_type or ("hash" if "password_hash" in fields else "plain")
    if kind == "hash":
        if "password_hash" not in fields:
            raise UserFileError(f"{where}: password_hash is missing (importing hashes)")
        return ImportUser(user_id, superuser, password_hash=fields["password_hash"],
                          salt=fields.get("salt", ""))
    if "password" not in fields:
        missing = "password" if password_type else "password_hash or password"
        raise UserFileError(f"{where}: {missing} is missing")
    return ImportUser(user_id, superuser, password=fields["password"])
