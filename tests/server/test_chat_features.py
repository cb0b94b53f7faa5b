"""Chat templates and request fields on the tiny model, in process: --chat-template and
--default-chat-template-kwargs under the request's allow-listed kwargs, reasoning in `reasoning_content` and
`reasoning` with usage.completion_tokens_details.reasoning_tokens, continuous_usage_stats, echo, best_of,
the reasoning parser's vLLM and SGLang spellings."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from server_harness import running_app
from sse_util import events

from r1deploy.server.chat_template import load_chat_template, load_default_kwargs
from r1deploy.server.state import ServerSettings

pytestmark = pytest.mark.anyio
CHAT = [{"role": "user", "content": "hello world"}]
THINK_END_ID = 4  # "</think>" in tests/server/tiny.py


async def test_reasoning_fields_and_tokens(client: httpx.AsyncClient) -> None:
    # </think> forced as the third token: two reasoning tokens, then the end of the thought.
    body = {"messages": CHAT, "max_tokens": 2, "ignore_eos": True, "seed": 3}
    r = (await client.post("/v1/chat/completions", json=body)).json()
    message = r["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] and message["reasoning"]
    assert r["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    forced = {**body, "max_tokens": 3, "logit_bias": {str(THINK_END_ID): 100}}
    r = (await client.post("/v1/chat/completions", json=forced)).json()
    assert r["usage"]["completion_tokens_details"] == {"reasoning_tokens": 1}
    assert r["choices"][0]["message"]["reasoning"] is None
    # Thinking switched off in the template kwargs: no thought to split off, no reasoning tokens.
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    r = (await client.post("/v1/chat/completions", json=off)).json()
    assert r["choices"][0]["message"]["reasoning"] is None and r["choices"][0]["message"]["content"]
    assert "completion_tokens_details" not in r["usage"]


async def test_streamed_reasoning_and_continuous_usage(client: httpx.AsyncClient) -> None:
    body = {"messages": CHAT, "max_tokens": 4, "ignore_eos": True, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = events((await client.post("/v1/chat/completions", json=body)).text)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"] is not None for c in chunks) and counts == sorted(counts) and counts[-1] == 4
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}


async def test_echo_and_best_of(client: httpx.AsyncClient) -> None:
    body = {"prompt": "the cat", "max_tokens": 3, "ignore_eos": True, "seed": 1, "echo": True, "best_of": 1}
    r = (await client.post("/v1/completions", json=body)).json()
    plain = (await client.post("/v1/completions", json={**body, "echo": False})).json()
    assert r["choices"][0]["text"] == "the cat" + plain["choices"][0]["text"]
    chunks = events((await client.post("/v1/completions", json={**body, "stream": True})).text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == r["choices"][0]["text"]


async def test_chat_template_flag_and_default_kwargs(tiny_dir: Path) -> None:
    template = load_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                  "{% if thinking %}<think>{% endif %}")
    async with running_app(tiny_dir, chat_template=template,
                           default_chat_template_kwargs=load_default_kwargs('{"thinking": true}')) as app:
        async def prompt_tokens(**extra: object) -> int:
            r = await app.client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1, **extra})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        assert await prompt_tokens() == 4  # BOS, hello, world, <think>: our template, the default kwarg
        assert await prompt_tokens(chat_template_kwargs={"thinking": False}) == 3  # the request's wins
        r = await app.client.post("/v1/chat/completions", json={"messages": CHAT, "chat_template_kwargs": {
            "add_generation_prompt": False}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_chat_template_sources_and_parser_spellings(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(path)) == "{{ messages[0]['content'] }}"
    for bad in ("no-such-file.jinja", "{% if %}"):
        with pytest.raises(ValueError, match="--chat-template"):
            load_chat_template(bad)
    with pytest.raises(ValueError, match="JSON object"):
        load_default_kwargs("[1]")
    assert ServerSettings(reasoning_parser="deepseek_r1").reasoning_parser == "deepseek-r1"
    assert ServerSettings(reasoning_parser="deepseek-r1").reasoning_parser == "deepseek-r1"
