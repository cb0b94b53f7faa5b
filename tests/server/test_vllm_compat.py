"""vLLM's surface: /health, /version, /tokenize, /detokenize, the vLLM metric set (parsed with
prometheus_client's parser, moving as requests run) and SSE keep-alive comments."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_util import asgi_post
from prometheus_client.parser import text_string_to_metric_families
from server_harness import Running, running_app, tiny_engine, wait_for_phase
from sse_util import events
from test_errors import assert_openai_error

import r1deploy
from r1deploy.server.state import Phase

pytestmark = pytest.mark.anyio


async def test_health_is_200_only_when_ready(tiny_dir: Path) -> None:
    gate = threading.Event()

    def slow_load() -> Any:
        gate.wait(10)
        return tiny_engine(tiny_dir)

    async with running_app(tiny_dir, load=slow_load, api_key="k") as running:
        assert_openai_error(await running.client.get("/health"), 503)  # a probe: no key needed
        assert_openai_error(await running.client.post("/tokenize", json={"prompt": "the"},
                                                      headers={"Authorization": "Bearer k"}), 503)
        gate.set()
        await wait_for_phase(running.state, Phase.READY)
        r = await running.client.get("/health")
        assert r.status_code == 200 and r.content == b""
        assert_openai_error(await running.client.post("/tokenize", json={"prompt": "the"}), 401)


async def test_version(client: httpx.AsyncClient) -> None:
    assert (await client.get("/version")).json() == {"version": r1deploy.__version__}


async def test_tokenize_prompt_and_messages(server: Running) -> None:
    client, engine = server.client, server.state.llm_engine
    assert engine is not None
    r = (await client.post("/tokenize", json={"prompt": "the cat", "return_token_strs": True})).json()
    assert r["tokens"] == engine.tokenize("the cat") and r["tokens"][0] == 1  # BOS, as a raw prompt gets
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == engine.max_model_len
    assert r["token_strs"] == ["<s>", "\u2581the", "\u2581cat"]
    bare = (await client.post("/tokenize", json={"prompt": "the cat", "add_special_tokens": False})).json()
    assert bare["tokens"] == r["tokens"][1:] and bare["token_strs"] is None
    messages = [{"role": "user", "content": "hello"}]
    chat = (await client.post("/tokenize", json={"messages": messages})).json()
    assert chat["tokens"] == engine.chat_prompt_ids(messages)  # what /v1/chat/completions would prefill
    no_prompt = (await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})).json()
    assert chat["tokens"][:no_prompt["count"]] == no_prompt["tokens"] and no_prompt["count"] < chat["count"]


async def test_detokenize_round_trips(client: httpx.AsyncClient) -> None:
    tokens = (await client.post("/tokenize", json={"prompt": "the cat is on the tree",
                                                   "add_special_tokens": False})).json()["tokens"]
    assert (await client.post("/detokenize", json={"tokens": tokens})).json() == {"prompt": "the cat is on the tree"}


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/tokenize", {"prompt": "the", "messages": [{"role": "user", "content": "x"}]}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": "the", "model": "other"}, 404),
    ("/detokenize", {"tokens": [5, 10_000]}, 400),
    ("/detokenize", {"tokens": "5"}, 400),
])
async def test_bad_tokenize_requests(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                                     status: int) -> None:
    assert_openai_error(await client.post(path, json=body), status)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(matches) == 1, (name, labels, [k for k in samples if k[0] == name])
    return matches[0]


def _slow_steps(engine: Any, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    step = engine.step

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", slow)


async def test_vllm_metrics_exist_and_move(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_app(tiny_dir, metrics_prefix="vllm", served_model_name="tiny-r1") as running:
        client, engine = running.client, running.state.llm_engine
        model = {"model_name": "tiny-r1"}
        before = _samples((await client.get("/metrics")).text)
        assert _value(before, "vllm:num_requests_running", **model) == 0
        assert _value(before, "vllm:kv_cache_usage_perc", **model) == 0
        assert _value(before, "vllm:cache_config_info", block_size="16", num_gpu_blocks="64", **model) == 1

        _slow_steps(engine, monkeypatch, 0.02)
        prompt = list(range(5, 45))  # 40 tokens: two full blocks to look up in the prefix cache
        body = {"prompt": prompt, "max_tokens": 6, "ignore_eos": True, "stream": True}
        started = asyncio.Event()
        streaming = asyncio.create_task(asgi_post(running.app, body, started=started))
        await started.wait()
        during = _samples((await client.get("/metrics")).text)
        assert _value(during, "vllm:num_requests_running", **model) == 1
        assert 0 < _value(during, "vllm:kv_cache_usage_perc", **model) <= 1
        assert _value(during, "vllm:gpu_cache_usage_perc", **model) == _value(during, "vllm:kv_cache_usage_perc",
                                                                                **model)
        assert (await streaming).status == 200
        await client.post("/v1/completions", json={**body, "stream": False})  # the same prompt: prefix hits

        after = _samples((await client.get("/metrics")).text)
        assert _value(after, "vllm:num_requests_running", **model) == 0
        assert _value(after, "vllm:request_success_total", finished_reason="length", **model) == 2
        assert _value(after, "vllm:prompt_tokens_total", **model) == 80
        assert _value(after, "vllm:generation_tokens_total", **model) == 12
        assert _value(after, "vllm:prefix_cache_queries_total", **model) == 64  # 2 x 2 blocks of 16 tokens
        assert _value(after, "vllm:prefix_cache_hits_total", **model) == 32  # the second request's 2 blocks
        assert _value(after, "vllm:num_preemptions_total", **model) == 0
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                     "request_prefill_time_seconds", "request_decode_time_seconds",
                     "request_inference_time_seconds", "request_time_per_output_token_seconds",
                     "request_prompt_tokens", "request_generation_tokens"):
            assert _value(after, f"vllm:{name}_count", **model) == 2, name
        assert _value(after, "vllm:inter_token_latency_seconds_count", **model) == 10  # 5 gaps per request
        assert _value(after, "vllm:time_per_output_token_seconds_count", **model) == 10  # its older name
        # The slowed steps show up where they belong: every token gap and the decode time include them.
        assert _value(after, "vllm:inter_token_latency_seconds_sum", **model) >= 10 * 0.02
        assert _value(after, "vllm:request_decode_time_seconds_sum", **model) >= 2 * 5 * 0.02
        assert _value(after, "vllm:request_generation_tokens_sum", **model) == 12
        assert not any(n.startswith("r1deploy:") for n, _ in after)  # the flag picks one prefix
        dashboard = (Path(__file__).parents[2] / "docs" / "grafana_dashboard.json").read_text()
        used = set(re.findall(r"\$\{prefix\}:(\w+)", dashboard))
        assert len(used) >= 10 and {f"vllm:{name}" for name in used} <= {n for n, _ in after}, used


async def test_default_prefix_and_model_label_on_every_series(client: httpx.AsyncClient, server: Running) -> None:
    await client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2})
    samples = _samples((await client.get("/metrics")).text)
    ours = [(n, dict(ls)) for n, ls in samples if n.startswith("r1deploy:")]
    assert {"r1deploy:num_requests_waiting", "r1deploy:request_success_total",
            "r1deploy:time_to_first_token_seconds_count"} <= {n for n, _ in ours}
    assert all(labels.get("model_name") == server.state.model_name for _, labels in ours)
    assert not any(n.startswith("vllm:") for n, _ in samples)


async def test_sse_keepalive_comments_fill_quiet_gaps(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"prompt": "the", "max_tokens": 3, "ignore_eos": True, "stream": True}
    async with running_app(tiny_dir, sse_keepalive_s=0.02) as running:
        _slow_steps(running.state.llm_engine, monkeypatch, 0.1)
        text = (await running.client.post("/v1/completions", json=body)).text
    assert ": keep-alive\n\n" in text
    data = "".join(part + "\n\n" for part in text.split("\n\n") if part.strip() and not part.startswith(":"))
    assert "".join(e["choices"][0]["text"] for e in events(data))  # the chunks themselves are intact
    async with running_app(tiny_dir, sse_keepalive_s=0) as running:
        _slow_steps(running.state.llm_engine, monkeypatch, 0.1)
        text = (await running.client.post("/v1/completions", json=body)).text
    assert "keep-alive" not in text and len(events(text)) >= 3


async def test_startup_phases_are_logged_with_times(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="r1deploy"):
        async with running_app(tiny_dir):
            pass
    timed = {m.group(1) for r in caplog.records if (m := re.fullmatch(r"(.+): \d+\.\d\d s(?: .*)?", r.getMessage()))}
    assert {"config", "model build", "weights", "tokenizer", "KV cache sizing and allocation",
            "warm-up request", "server ready"} <= timed, timed
