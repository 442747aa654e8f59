"""The OpenAPI 3.1 document of the management API, made from its endpoint
table (ops.api.ENDPOINTS) so that it describes exactly what is served."""

from __future__ import annotations

import re
from typing import Any

from bastionmq.version import __version__

from .api import ENDPOINTS, PREFIX

_ERROR = {"type": "object", "properties": {"code": {"type": "string"},
                                           "message": {"type": "string"}}}
_PLAIN_PATHS = {
    "/metrics": ("Prometheus metrics (no key while http_api.metrics_public is true)", "text/plain"),
    "/healthz": ("Alive: the process answers (no key)", "application/json"),
    "/readyz": ("Ready: started, every listener accepting (no key; 503 otherwise)",
                "application/json"),
}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        # aiohttp's {topic:.+} is OpenAPI's {topic}
        path = PREFIX + re.sub(r"\{(\w+):[^}]*\}", r"{\1}", endpoint.path)
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in re.findall(r"\{(\w+)", endpoint.path)]
        parameters += [{"name": name, "in": "query", "required": False,
                        "schema": {"type": kind}, "description": text}
                       for name, kind, text in endpoint.query]
        operation: dict[str, Any] = {
            "summary": endpoint.summary, "tags": [endpoint.tag],
            "operationId": endpoint.handler,
            "description": f"Needs a key with role {endpoint.role}"
                           + (" (or admin)." if endpoint.role == "viewer" else "."),
            "parameters": parameters,
            "responses": {
                "2XX": {"description": "Done", "content": {"application/json": {}}},
                "400": {"description": "Bad request", "content": {
                    "application/json": {"schema": _ERROR}}},
                "401": {"description": "No valid API key"},
                "403": {"description": "The key's role may not do this"},
                "404": {"description": "Not found", "content": {
                    "application/json": {"schema": _ERROR}}},
            },
        }
        if endpoint.body is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": dict(endpoint.body)}}}
        paths.setdefault(path, {})[endpoint.method.lower()] = operation
    for path, (summary, media) in _PLAIN_PATHS.items():
        paths[path] = {"get": {"summary": summary, "tags": ["monitoring"], "security": [],
                               "responses": {"200": {"description": "OK",
                                                     "content": {media: {}}}}}}
    paths[PREFIX + "/openapi.json"] = {"get": {
        "summary": "This document (no key)", "tags": ["node"], "security": [],
        "responses": {"200": {"description": "OK", "content": {"application/json": {}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "bastionmq management API", "version": __version__,
                 "description": "See docs/api.md. Send an API key as "
                                "'Authorization: Bearer KEY'."},
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
        "security": [{"apiKey": []}],
        "paths": paths,
    }
