"""Bad input never takes the server down: OpenAI error shape, the right status, and the next request works."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from asgi_util import asgi_post
from sse_util import events

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
    ("json_schema without a schema", "chat/completions",
     {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format"),
    ("json_schema not a schema", "chat/completions",
     {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "object", "properties": {"a": {"type": 7}}}}}}, 400, "response_format.json_schema.schema"),
    ("guided_regex that does not compile", "completions", {"prompt": "a", "guided_regex": "(["}, 400,
     "guided_regex"),
    ("two output constraints", "completions", {"prompt": "a", "guided_regex": "a+", "guided_choice": ["a"]}, 400,
     "guided_choice"),
    ("structured_outputs with two kinds", "completions",
     {"prompt": "a", "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs"),
    ("tool_choice naming no tool", "chat/completions",
     {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("logit_bias above 100", "completions", {"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
    ("logit_bias key not a token id", "completions", {"prompt": "a", "logit_bias": {"cat": 1}}, 400, "logit_bias"),
    ("logit_bias token outside the vocabulary", "completions", {"prompt": "a", "logit_bias": {"100000": 1}}, 400,
     "logit_bias"),
    ("best_of above n", "completions", {"prompt": "a", "best_of": 2}, 400, "best_of"),
    ("prompt_logprobs", "completions", {"prompt": "a", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("prompt_logprobs (chat)", "chat/completions", {"messages": CHAT, "prompt_logprobs": 0}, 400, "prompt_logprobs"),
    ("suffix", "completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("echo with logprobs", "completions", {"prompt": "a", "echo": True, "logprobs": 1}, 400, "echo"),
    ("unknown field", "completions", {"prompt": "a", "frobnicate": {"x": 1}}, 400, "frobnicate"),
    ("unknown field (chat)", "chat/completions", {"messages": CHAT, "functions": []}, 400, "functions"),
    ("unknown stream option", "chat/completions", {"messages": CHAT, "stream_options": {"x": True}}, 400,
     "stream_options.x"),
    ("unknown message field", "chat/completions", {"messages": [{"role": "user", "content": "x", "audio": 1}]},
     400, "messages.0.audio"),
    ("unknown model", "chat/completions", {"messages": CHAT, "model": "gpt-9"}, 404, "model"),
    ("unknown model (completions)", "completions", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
    ("temperature above 2", "completions", {"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ("top_p above 1", "completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("top_p negative", "chat/completions", {"messages": CHAT, "top_p": -0.1}, 400, "top_p"),
    ("stop string too long", "completions", {"prompt": "a", "stop": "x" * 257}, 400, "stop"),
    ("stop list item too long", "completions", {"prompt": "a", "stop": ["x" * 257]}, 400, "stop"),
    ("n over cap (chat)", "chat/completions", {"messages": CHAT, "n": 17}, 400, "n"),
    ("missing messages", "chat/completions", {"model": None}, 400, "messages"),
    ("messages not a list", "chat/completions", {"messages": "hello"}, 400, "messages"),
    ("content wrong type", "chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("max_tokens as float", "completions", {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("prompt as number", "completions", {"prompt": 5}, 400, "prompt"),
    ("prompt + max_completion_tokens too long", "chat/completions",
     {"messages": CHAT, "max_completion_tokens": 125}, 400, "max_tokens"),
    ("chat_template override", "chat/completions", {"messages": CHAT, "chat_template": "{{ 7 * 7 }}"},
     400, "chat_template"),
    ("chat_template_kwargs override", "chat/completions",
     {"messages": CHAT, "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs"),
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


@pytest.mark.parametrize("raw", [
    b"{not json", b"[1, 2]", b'"a string"', b"", b"null",
    b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "temperature": Infinity}',
    b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
    b'\xff\xfe{"prompt": "a"}',
])
async def test_malformed_body(client: httpx.AsyncClient, raw: bytes) -> None:
    r = await client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)


async def test_unknown_field_named_in_the_message(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "frobnicate": {"x": 1}})
    assert "frobnicate" in assert_openai_error(r, 400, "frobnicate")["message"]


async def test_oversized_body_413(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", content=b" " * ((1 << 20) + 1), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413)  # the default cap is 1 MiB

    async def chunked() -> Any:  # no Content-Length: the cap counts streamed bytes
        for _ in range(2):
            yield b" " * (1 << 19) + b" "

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


async def test_bad_input_does_not_disturb_running_requests(server: Any) -> None:
    """Every bad case fired while a long stream runs: the stream finishes intact."""
    started = asyncio.Event()
    body = {"prompt": [1, 7], "max_tokens": 40, "ignore_eos": True, "seed": 1, "stream": True}
    running = asyncio.create_task(asgi_post(server.app, body, started=started))
    await started.wait()
    for _, route, bad, status, _ in CASES:
        assert (await server.client.post(f"/v1/{route}", json=bad)).status_code == status
    answer = await running
    chunks = events(answer.text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    reference = await server.client.post("/v1/completions", json={**body, "stream": False})
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference.json()["choices"][0]["text"]
