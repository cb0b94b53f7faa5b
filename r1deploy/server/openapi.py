"""The OpenAPI document made true to what the server answers, so clients and schema-driven fuzzers
(schemathesis's response checks) can rely on it:

- invalid input is 400 with OpenAI's error body (errors.py turns FastAPI's 422 into it), not FastAPI's 422
  with its HTTPValidationError body: a 400 entry replaces the 422 one;
- every other error (401, 404, 408, 413, 429, 500, 503) is in that shape too: a `default` response;
- /metrics is Prometheus text, /health an empty 200, and the generation routes stream `text/event-stream`
  when asked to.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from r1deploy.server.protocol import ErrorResponse

ERROR_DESCRIPTION = 'an error in OpenAI\'s shape: {"error": {"message", "type", "param", "code"}}'
# FastAPI(responses=...): every route documents the error shape; with a `default` entry FastAPI adds no 422.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {"default": {"model": ErrorResponse, "description": ERROR_DESCRIPTION}}
STREAMING_ROUTES = ("/v1/completions", "/v1/chat/completions")
TEXT_ROUTES = ("/metrics",)
EMPTY_ROUTES = ("/health",)  # vLLM's: 200 with an empty body
# One parsed server-sent event, as OpenAPI 3.2 documents text/event-stream (3.0/3.1 tools read `schema` per event):
# our `data` is a chunk's JSON, an error's JSON or the final [DONE], so it stays a string here.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer", "minimum": 0}}}


def install_openapi(app: FastAPI) -> None:
    """Serve the corrected document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = corrected(get_openapi(title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign] - FastAPI's documented way to customise the document


def corrected(document: dict[str, Any]) -> dict[str, Any]:
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation["responses"]
            default = responses.pop("default", None)
            if default is not None and ("requestBody" in operation or operation.get("parameters")):
                responses["400"] = {**default, "description": "invalid request: " + ERROR_DESCRIPTION}
            if default is not None:
                responses["default"] = default  # last, as it reads: every status not listed above
            ok = responses.get("200", {})
            if path in STREAMING_ROUTES:
                ok.setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT}
            if path in TEXT_ROUTES:
                ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path in EMPTY_ROUTES:
                ok.pop("content", None)
    return document
