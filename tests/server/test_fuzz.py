"""Property-based fuzz of request bodies, valid and invalid: the server never answers 5xx.

Bodies mix the schemas' own fields (so many are valid and reach the engine) with wrong types, out of
range values, unknown keys and non-object JSON; each goes through the real app in process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1deploy.server.protocol import ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.anyio

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=10)
_small_tokens = st.integers(1, 8)  # valid requests stay cheap on the CPU
_words = st.text(alphabet=st.sampled_from(list("the cat a dog </think>\n\u00e9\U0001F600")), max_size=30)
_field_values: dict[str, st.SearchStrategy[Any]] = {
    "n": st.integers(-1, 20), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 100), "min_p": st.floats(-0.5, 1.5), "seed": st.integers(-2**64, 2**64),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3), "stop": st.none() | _words | st.lists(_words, max_size=20),
    "stop_token_ids": st.lists(st.integers(-5, 200), max_size=4), "max_tokens": _small_tokens | st.integers(-5, 500),
    "max_completion_tokens": _small_tokens | st.integers(-5, 500), "min_tokens": st.integers(-2, 10),
    "logprobs": st.booleans() | st.integers(-2, 25), "top_logprobs": st.integers(-2, 25),
    "stream": st.booleans(), "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "model": st.none() | st.text(max_size=8), "echo": _json,
    "prompt": _words | st.lists(_words, max_size=3) | st.lists(st.integers(-2, 120), max_size=140)
    | st.lists(st.lists(st.integers(0, 96), max_size=5), max_size=3),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard", ""]),
         "content": st.none() | _words | st.lists(st.fixed_dictionaries(
             {"type": st.sampled_from(["text", "image_url"]), "text": _words}), max_size=2)}), max_size=3),
    "tools": _json, "tool_choice": _json, "response_format": _json,
}
_known = sorted(set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields))
_body = st.one_of(
    st.dictionaries(st.sampled_from(_known), st.deferred(lambda: _json), max_size=6),  # any JSON in known fields
    st.fixed_dictionaries({}, optional=_field_values),  # mostly plausible values
    _json,  # not even an object
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["completions", "chat/completions"]), body=_body)
async def test_fuzzed_bodies_never_5xx(client: httpx.AsyncClient, route: str, body: Any) -> None:
    r = await client.post(f"/v1/{route}", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
