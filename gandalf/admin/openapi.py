"""The OpenAPI 3.1 document of the admin API, generated from the operations'
msgspec types (``msgspec.json.schema_components``) and the operation table:
paths, methods, path and query parameters, request bodies, answers and every
error an operation documents, in the one error shape. Never written by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from gandalf import __version__
from gandalf.admin.resources import Op, permission_name
from gandalf.admin.schemas import ErrorBody

_REF = "#/components/schemas/{name}"
_PARAM = re.compile(r"{(\w+)}")
_ERROR_TEXT = {
    400: "Bad request: a body or query that does not match the schema",
    401: "No key, or an unknown, revoked, blocked or expired one",
    403: "The key's role may not do this",
    404: "No such object",
    409: "Conflict: declared in the config file (read-only here), in use, or exists",
}


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without its ``null`` branch (a query string
    cannot say null: leaving the parameter out does)."""
    options = schema.get("anyOf")
    if options is None:
        return schema
    kept = [o for o in options if o != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    if len(kept) == 1:
        out.update(kept[0])
    else:
        out["anyOf"] = kept
    return out


def document(ops: Sequence[Op], prefix: str) -> dict[str, Any]:
    """The whole document for ``ops`` mounted under ``prefix``."""
    types: list[Any] = [ErrorBody]
    for op in ops:
        types.append(op.returns)
        if op.body is not None:
            types.append(op.body)
        if op.query is not None:
            types.append(op.query)
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    error = {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}}
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(op.path)
        ]
        if op.query is not None:
            query = components[op.query.__name__]
            required = set(query.get("required", ()))
            for name, schema in query["properties"].items():
                parameters.append(
                    {
                        "name": name,
                        "in": "query",
                        "required": name in required,
                        "schema": _not_null(schema),
                    }
                )
        responses: dict[str, Any] = {
            str(op.ok): {
                "description": "OK" if op.ok == 200 else "Created",
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(name=op.returns.__name__)}}
                },
            }
        }
        for status in op.errors:
            responses[str(status)] = {"description": _ERROR_TEXT[status], "content": error}
        operation: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "description": f"Needs a key with role {permission_name(op.needs)}.",
            "tags": [op.path.strip("/").split("/")[0]],
            "security": [{"bearer": []}],
            "responses": responses,
        }
        if parameters:
            operation["parameters"] = parameters
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(name=op.body.__name__)}}
                },
            }
        paths.setdefault(prefix + op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Gandalf admin API",
            "version": __version__,
            "description": (
                "Keys, orgs, teams, routes, providers, usage, audit and the response cache "
                "of a Gandalf gateway. Reads need an admin or viewer key, writes an admin key "
                "(Authorization: Bearer gnd_... or x-api-key). Errors use OpenAI's shape."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
