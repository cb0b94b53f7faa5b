"""Bad input never takes the server down: OpenAI error shape, the right status, and the next request works."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.anyio
CHAT = [{"role": "user", "content": "hello"}]
LONG = [1] + [7] * 130  # over max_model_len (128)

CASES: list[tuple[str, str, Any, int, str | None]] = [
    # (name, route, body, status, param)
    ("empty string prompt", "completions", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", "completions", {"prompt": []}, 400, "prompt"),
    ("empty token list", "completions", {"prompt": [[]]}, 400, "prompt"),
    ("missing prompt", "completions", {}, 400, "prompt"),
    ("prompt too long", "completions", {"prompt": LONG}, 400, "prompt"),
    ("prompt + max_tokens too long", "completions", {"prompt": [1, 7], "max_tokens": 127}, 400, "max_tokens"),
    ("token id out of vocab", "completions", {"prompt": [1, 5000]}, 400, "prompt"),
    ("temperature as string", "completions", {"prompt": "a", "temperature": "0.5"}, 400, "temperature"),
    ("n as bool", "completions", {"prompt": "a", "n": True}, 400, "n"),
    ("negative temperature", "completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("top_p zero", "completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_k below -1", "completions", {"prompt": "a", "top_k": -2}, 400, "top_k"),
    ("penalty out of range", "completions", {"prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    ("n over cap", "completions", {"prompt": "a", "n": 17}, 400, "n"),
    ("logprobs over cap", "completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("max_tokens zero", "completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("empty stop string", "completions", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("too many stops", "completions", {"prompt": "a", "stop": ["x"] * 17}, 400, "stop"),
    ("min_tokens over max", "completions", {"prompt": "a", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
    ("empty messages", "chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("image part", "chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages.0.content"),
    ("top_logprobs without logprobs", "chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs over cap", "chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("tool_choice required", "chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("tool without name", "chat/completions",
     {"messages": CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]}, 400, "tools.0.function.name"),
    ("tool schema bad type", "chat/completions",
     {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     400, "tools.0.function.parameters"),
    ("tool schema bad pattern", "chat/completions",
     {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
         "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}]},
     400, "tools.0.function.parameters.properties.a"),
    ("json response_format", "chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("unknown model", "chat/completions", {"messages": CHAT, "model": "gpt-9"}, 404, "model"),
]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("name", "route", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input(client: httpx.AsyncClient, name: str, route: str, body: Any, status: int,
                         param: str | None) -> None:
    r = await client.post(f"/v1/{route}", json=body)
    assert_openai_error(r, status, param)
    ok = await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 1})
    assert ok.status_code == 200  # still serving


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"a string"', b""])
async def test_malformed_body(client: httpx.AsyncClient, raw: bytes) -> None:
    r = await client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)


async def test_unknown_fields_ignored(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "frobnicate": {"x": 1}})
    assert r.status_code == 200


async def test_oversized_body_413(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", content=b" " * (8 << 20 + 1), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413)

    async def chunked() -> Any:  # no Content-Length: the cap counts streamed bytes
        for _ in range(9):
            yield b" " * (1 << 20)

    r = await client.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413)


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/nope"), 404)
    assert_openai_error(await client.get("/v1/completions"), 405)


async def test_bad_input_allocates_nothing(client: httpx.AsyncClient, state: Any) -> None:
    engine = state.llm_engine
    used = engine.block_manager.num_used_blocks
    await client.post("/v1/completions", json={"prompt": LONG})
    await client.post("/v1/completions", json={"prompt": [1, 7], "max_tokens": 127, "n": 4})
    assert engine.block_manager.num_used_blocks == used and not engine.requests
