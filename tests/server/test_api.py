"""The OpenAI routes on the tiny model: shapes, usage, streaming, n, stop, seed, logprobs, reasoning."""

from __future__ import annotations

import httpx
import pytest
from sse_util import events

from r1deploy.server.reasoning import split_reasoning
from r1deploy.server.state import ServerState

pytestmark = pytest.mark.anyio
CHAT = [{"role": "user", "content": "hello world"}]


async def test_models(client: httpx.AsyncClient, state: ServerState) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    card = r.json()["data"][0]
    assert card["id"] == state.model_name and state.model_name.startswith("tiny")  # the directory name
    assert card["object"] == "model" and card["max_model_len"] == 128


async def test_completion_text_prompt(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}  # BOS + 2 words


@pytest.mark.parametrize("prompt", ["the cat", ["the cat", "a dog"], [1, 7, 77], [[1, 7], [1, 8, 9]]])
async def test_completion_prompt_forms(client: httpx.AsyncClient, prompt: object) -> None:
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "ignore_eos": True, "n": 2})
    assert r.status_code == 200, r.text
    batch = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)  # type: ignore[index]
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(2 * batch))
    assert r.json()["usage"]["completion_tokens"] == 3 * 2 * batch


async def test_completion_stream_with_usage(client: httpx.AsyncClient) -> None:
    body = {"prompt": "the cat", "max_tokens": 6, "ignore_eos": True, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    full = (await client.post("/v1/completions", json={**body, "stream": False})).json()
    assert text == full["choices"][0]["text"]  # same seed, same text, streamed or not


async def test_stream_without_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, "stream": True})
    assert all(c["choices"] for c in events(r.text))


async def test_seed_reproducible_and_n_children_differ(client: httpx.AsyncClient) -> None:
    body = {"prompt": "the cat", "max_tokens": 12, "ignore_eos": True, "seed": 7, "n": 2, "temperature": 1.0}
    a = (await client.post("/v1/completions", json=body)).json()["choices"]
    b = (await client.post("/v1/completions", json=body)).json()["choices"]
    assert [c["text"] for c in a] == [c["text"] for c in b]
    assert a[0]["text"] != a[1]["text"]  # seed + i per choice


async def test_stop_string_does_not_leak(client: httpx.AsyncClient) -> None:
    base = {"prompt": "the cat", "max_tokens": 20, "ignore_eos": True, "seed": 11}
    text = (await client.post("/v1/completions", json=base)).json()["choices"][0]["text"]
    words = text.split()
    stop = " " + words[3]
    for stream in (False, True):
        r = await client.post("/v1/completions", json={**base, "stop": [stop], "stream": stream})
        got = ("".join(c["choices"][0]["text"] for c in events(r.text)) if stream
               else r.json()["choices"][0]["text"])
        assert got == text[: text.index(stop)] and stop not in got


async def test_completion_logprobs_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 4, "ignore_eos": True, "logprobs": 3})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    assert all(len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


async def test_chat_non_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and "reasoning_content" in message
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 8  # <s><|user|>hello world<|assistant|><think>


async def test_chat_logprobs_shape(client: httpx.AsyncClient) -> None:
    body = {"messages": CHAT, "max_completion_tokens": 3, "ignore_eos": True, "logprobs": True, "top_logprobs": 2,
            "seed": 5}
    content = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(item["bytes"]).decode() == item["token"] and len(item["top_logprobs"]) == 2
    stream = await client.post("/v1/chat/completions", json={**body, "stream": True})
    streamed = [x for c in events(stream.text) for ch in c["choices"] if ch.get("logprobs") for x in ch["logprobs"]["content"]]
    assert [x["token"] for x in streamed] == [x["token"] for x in content]


async def _seed_with_close_tag(client: httpx.AsyncClient, prompt: list[int]) -> tuple[int, str]:
    for seed in range(40):
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "seed": seed,
                                                       "ignore_eos": True})
        text = r.json()["choices"][0]["text"]
        if "</think>" in text:
            return seed, text
    raise AssertionError("no seed produced </think>")


async def test_chat_reasoning_split_matches_raw_output(client: httpx.AsyncClient, state: ServerState) -> None:
    assert state.reasoning  # the tiny vocabulary has </think>: deepseek-r1 parser by default
    engine = state.llm_engine
    assert engine is not None
    prompt = engine.chat_prompt_ids(CHAT)  # ends inside the thought: <|assistant|><think>
    seed, raw = await _seed_with_close_tag(client, prompt)
    body = {"messages": CHAT, "max_tokens": 24, "seed": seed, "ignore_eos": True}
    message = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == split_reasoning(raw)
    r = await client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = events(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (message["reasoning_content"] or "")
    assert "".join(d.get("content", "") for d in deltas) == (message["content"] or "")
    assert chunks[-1]["usage"]["completion_tokens"] == 24


async def test_chat_n_streams_every_index(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "n": 3, "max_tokens": 4, "stream": True,
                                                        "ignore_eos": True})
    finished = sorted(ch["index"] for c in events(r.text) for ch in c["choices"] if ch["finish_reason"])
    assert finished == [0, 1, 2]


async def test_content_parts_and_tools_accepted(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}], "tools": tools,
            "tool_choice": "auto", "max_tokens": 2}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
