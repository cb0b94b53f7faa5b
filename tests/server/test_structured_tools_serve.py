"""Structured output, tool calling and logit_bias end to end: the real `openai` client against
`python -m r1deploy serve` on the embedded SmolLM2 (byte-level BPE, so xgrammar sees a real vocabulary).

Requests run concurrently, so the engine batches them; max_tokens stays small to keep this to about a minute
on two cores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest
from serve_util import serving
from structured_schemas import schemas

openai = pytest.importorskip("openai")
MODEL = "smol"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with serving(["--served-model-name", MODEL, "--log-level", "warning"]) as (_, base), \
            openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600) as c:
        yield c


def _schema_answer(client: openai.OpenAI, i: int, schema: dict[str, Any]) -> tuple[str, str | None]:
    kwargs = {"model": MODEL, "max_tokens": 64, "temperature": 0,
              "messages": [{"role": "user", "content": f"Reply with a JSON object for item {i}."}],
              "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                         "strict": True}}}
    if i % 2:
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_json_schema_answers_validate_streamed_and_not(client: openai.OpenAI) -> None:
    cases = schemas()
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda c: _schema_answer(client, *c), enumerate(cases)))
    for schema, (text, finish) in zip(cases, answers, strict=True):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_guided_choice(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="The best color is", max_tokens=8, temperature=0,
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert r.choices[0].text in ("red", "green", "blue")


def test_required_tool_call_then_tool_result(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=48, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools are in the prompt
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # The call and its result go back in the history and are answered.
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=12,
                                            temperature=0)
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens and answer.choices[0].message.content


def test_named_tool_call_streams_argument_deltas(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    deltas = []
    finish = None
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                                max_tokens=32, temperature=0, stream=True):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"  # OpenAI's finish reason when tool_choice names the function
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_auto_tool_call_parsed_from_tool_call_tags(client: openai.OpenAI) -> None:
    # SmolLM2's template knows no tools, so they go in a <tool_call> system prompt; a regex makes this small
    # model answer in that format, which the parser must turn into a tool call, streamed or not.
    regex = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "C"\}\}\n</tool_call>'
    kwargs = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 40,
              "temperature": 0, "extra_body": {"guided_regex": regex}}
    r = client.chat.completions.create(**kwargs)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not message.content
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    arguments = json.loads(message.tool_calls[0].function.arguments)
    streamed = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [d for c in streamed for d in c.delta.tool_calls or []]
    assert not "".join(c.delta.content or "" for c in streamed)
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == arguments
    assert streamed[-1].finish_reason == "tool_calls"


def test_logit_bias_removes_a_token(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].message.content
    paris = 7042  # " Paris" in SmolLM2's vocabulary
    r = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, temperature=0,
                                       logit_bias={str(paris): -100})
    assert "Paris" not in r.choices[0].message.content
