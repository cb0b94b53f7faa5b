"""A structured-output constraint the model's vocabulary cannot satisfy is the client's request, not a server
fault: 400 in OpenAI's shape (param structured_outputs), before generation when no token can begin it, and when
it runs into a dead end part-way (in-band for a stream). Schemathesis found the 500 this was (choices in a
script the tiny word-level vocabulary cannot spell). The tiny vocabulary is raw: its words are `\u2581word`."""

from __future__ import annotations

import json

import httpx
import pytest
from sse_util import events
from test_errors import assert_openai_error

pytestmark = pytest.mark.anyio
DEAD_END = "no token of this model's vocabulary"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_constraint_no_token_can_begin_is_400(client: httpx.AsyncClient, stream: bool) -> None:
    body = {"prompt": "the cat", "max_tokens": 4, "guided_choice": ["\u00e0\u00ed", "zzz"], "stream": stream}
    error = assert_openai_error(await client.post("/v1/completions", json=body), 400, param="structured_outputs")
    assert DEAD_END in error["message"] and "begins the choice" in error["message"], error


async def test_a_dead_end_part_way_is_400(client: httpx.AsyncClient) -> None:
    # "\u2581the" is a token; nothing in the vocabulary spells "\u2581zzz" after it
    body = {"prompt": "the cat", "max_tokens": 4, "guided_regex": "\u2581the\u2581zzz", "temperature": 0}
    error = assert_openai_error(await client.post("/v1/completions", json=body), 400, param="structured_outputs")
    assert DEAD_END in error["message"] and "continues the constraint" in error["message"], error
    r = await client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200
    chunks = events(r.text)
    assert chunks[0]["choices"][0]["text"].strip() == "the"  # the spellable part streamed first
    assert chunks[-1]["error"]["param"] == "structured_outputs" and DEAD_END in chunks[-1]["error"]["message"]
    assert (await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})).status_code == 200
