"""The OpenAPI document says what the server answers: invalid input is 400 with OpenAI's error schema (never
FastAPI's 422 / HTTPValidationError), every other error has that schema too, /metrics is text, /health empty, and the
generation routes may stream text/event-stream."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.anyio
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


async def test_errors_are_documented_as_400_and_openai_shaped(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert "422" not in str(document) and "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert responses["default"]["content"]["application/json"]["schema"] == ERROR_REF, (method, path)
            if "requestBody" in operation:
                assert responses["400"]["content"]["application/json"]["schema"] == ERROR_REF, (method, path)
    paths = document["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "content" not in paths["/health"]["get"]["responses"]["200"]  # vLLM's empty 200
    for route in ("/v1/completions", "/v1/chat/completions"):
        event = paths[route]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        assert event["required"] == ["data"] and event["properties"]["data"] == {"type": "string"}
    error = document["components"]["schemas"]["ErrorInfo"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


async def test_a_validation_error_is_the_documented_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "the", "max_tokens": "many"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
