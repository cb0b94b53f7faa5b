"""The real `openai` client against `python -m r1deploy serve` on 127.0.0.1: the tiny model for the
API surface, and one smoke test of the embedded default model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_util import serving

from r1deploy.server.reasoning import split_reasoning

openai = pytest.importorskip("openai")
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def client(tiny_dir: Path) -> Iterator[openai.OpenAI]:
    args = [str(tiny_dir), "--max-model-len", "128", "--api-key", "k", "--served-model-name", "tiny0",
            "--log-level", "warning"]
    with serving(args) as (_, base), openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as c:
        yield c


def test_models_and_chat(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_completions_n_and_seed(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny0", "prompt": "the cat", "max_tokens": 6, "n": 3, "seed": 4,
              "extra_body": {"ignore_eos": True}}
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 18
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text


def test_streaming_usage_equals_tokens_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny0", messages=CHAT, max_tokens=7, stream=True, logprobs=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    streamed = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == streamed == 7


def test_stop_string(client: openai.OpenAI) -> None:
    base = {"model": "tiny0", "prompt": "the cat", "max_tokens": 20, "seed": 11, "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**base).choices[0].text
    stop = " " + text.split()[3]
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].text for c in client.completions.create(**base, stop=[stop], stream=True))
        else:
            got = client.completions.create(**base, stop=[stop]).choices[0].text
        assert got == text[: text.index(stop)]


def test_reasoning_split(client: openai.OpenAI) -> None:
    # The tiny template opens <think>; find a seed whose sampled answer closes it.
    for seed in range(40):
        kwargs = {"model": "tiny0", "messages": CHAT, "max_tokens": 24, "seed": seed, "extra_body": {"ignore_eos": True}}
        message = client.chat.completions.create(**kwargs).choices[0].message
        if message.content is not None:
            break
    else:
        raise AssertionError("no seed produced </think>")
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and (reasoning, message.content) == split_reasoning(f"{reasoning}</think>{message.content}")
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content


def test_errors_reach_the_client_typed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="a")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny0", prompt="a", temperature=3)
    assert info.value.body["param"] == "temperature"


def test_embedded_default_model_smoke() -> None:
    # No model argument: the embedded SmolLM2.
    with serving(["--log-level", "warning"]) as (_, base), \
            openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as c:
        # Seeded: the model's own sampling defaults apply, and an unseeded draw of EOS as the 3rd token made
        # this test flaky.
        r = c.chat.completions.create(model=c.models.list().data[0].id, max_tokens=4, seed=0,
                                      messages=[{"role": "user", "content": "Hello!"}])
        assert r.choices[0].message.content and r.usage.completion_tokens == 4
