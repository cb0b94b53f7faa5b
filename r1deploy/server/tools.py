"""Checks on `tools`: any malformed parameter schema is a 400, since a bad schema crashed other servers'
workers (CVE-2025-48944). Forced tool calls and response_format are server/structured_output.py's."""

from __future__ import annotations

import re
from typing import Any

from r1deploy.server.errors import APIError
from r1deploy.server.protocol import ChatCompletionRequest

_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_MAX_DEPTH = 32


def check_tools(body: ChatCompletionRequest) -> None:
    for i, tool in enumerate(body.tools or ()):
        if tool.function.parameters is not None:
            _check_schema(tool.function.parameters, f"tools.{i}.function.parameters", 0)


def _check_schema(schema: Any, where: str, depth: int) -> None:
    def bad(why: str) -> APIError:
        return APIError(400, f"{where}: {why}", param=where)

    if not isinstance(schema, dict):
        raise bad("a JSON schema must be an object")
    if depth > _MAX_DEPTH:
        raise bad(f"schema nested deeper than {_MAX_DEPTH} levels")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in _JSON_TYPES for k in kinds):
        raise bad(f"'type' must be one of {sorted(_JSON_TYPES)}")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise bad("'properties' must be an object")
    for name, sub in properties.items():
        _check_schema(sub, f"{where}.properties.{name}", depth + 1)
    if "items" in schema:
        _check_schema(schema["items"], f"{where}.items", depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad("'required' must be a list of strings")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError) as exc:
            raise bad(f"'pattern' is not a valid regular expression ({exc})") from exc
