"""Overload, engine death, a fault in one request, and disconnect churn: nothing lost, nothing leaked."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_util import asgi_post
from server_harness import Running, running_app, tiny_engine, wait_for_phase
from sse_util import events
from test_errors import assert_openai_error

from r1deploy.server.logprobs import TokenText
from r1deploy.server.state import Phase

pytestmark = pytest.mark.anyio
LONG = {"prompt": [1, 7], "max_tokens": 60, "ignore_eos": True}


async def _stream(app: Any, body: dict[str, Any], started: asyncio.Event) -> str:
    """Stream body to the end; `started` is set at the first chunk."""
    answer = await asgi_post(app, {**body, "stream": True}, started=started)
    assert answer.status == 200
    return answer.text


async def test_overload_gets_429_fast_and_admitted_requests_finish(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, load=lambda: tiny_engine(tiny_dir, max_num_seqs=2), max_queue=2) as running:
        await wait_for_phase(running.state, Phase.READY)
        client, state = running.client, running.state
        starts = [asyncio.Event() for _ in range(4)]
        admitted = [asyncio.create_task(_stream(running.app, LONG, s)) for s in starts]
        for _ in range(500):  # 2 running + 2 queued: full
            if state.num_admitted == 4:
                break
            await asyncio.sleep(0.01)
        assert state.num_admitted == 4
        began = time.perf_counter()
        r = await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 1})
        assert time.perf_counter() - began < 0.1
        error = assert_openai_error(r, 429)
        assert error["code"] == "server_overloaded" and error["type"] == "rate_limit_error"
        assert int(r.headers["Retry-After"]) >= 1
        assert_openai_error(await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "n": 2}), 429)
        for text in await asyncio.gather(*admitted):
            chunks = events(text)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert "".join(c["choices"][0]["text"] for c in chunks)  # every admitted request completed
        assert state.num_admitted == 0
        assert (await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 1})).status_code == 200


async def test_engine_death_fails_every_request_and_turns_live_503(tiny_dir: Path) -> None:
    failures: list[BaseException] = []
    async with running_app(tiny_dir, on_failed=failures.append) as running:
        client, state = running.client, running.state
        engine = state.llm_engine
        assert engine is not None
        real_run = engine.executor.execute
        broken = asyncio.Event()

        def evil_run(*args: Any) -> Any:
            if broken.is_set():
                raise RuntimeError("injected: CUDA error: an illegal memory access")
            return real_run(*args)

        engine.executor.execute = evil_run  # type: ignore[method-assign]
        started = asyncio.Event()
        stream = asyncio.create_task(_stream(running.app, LONG, started))
        plain = asyncio.create_task(client.post("/v1/completions", json=LONG))
        await started.wait()
        broken.set()
        chunks = events(await stream)  # ends with [DONE]
        assert chunks[-1]["error"]["code"] == "engine_dead" and chunks[-1]["error"]["type"] == "server_error"
        assert assert_openai_error(await plain, 500)["code"] == "engine_dead"
        for _ in range(100):  # the watchdog polls every 0.1 s
            if failures:
                break
            await asyncio.sleep(0.05)
        assert failures and state.phase is Phase.FAILED  # the CLI's on_failed makes the process exit 1
        assert (await client.get("/health/live")).status_code == 503
        assert (await client.get("/health/ready")).status_code == 503
        assert_openai_error(await client.post("/v1/completions", json={"prompt": "the"}), 503)


@pytest.mark.parametrize("stream", [True, False])
async def test_fault_in_one_request_fails_only_that_request(server: Running, monkeypatch: pytest.MonkeyPatch,
                                                            stream: bool) -> None:
    engine = server.state.llm_engine
    assert engine is not None
    used = engine.block_manager.num_used_blocks

    def evil_token_text(self: TokenText, token_id: int) -> str:
        raise RuntimeError("injected fault while rendering logprobs")

    monkeypatch.setattr(TokenText, "__call__", evil_token_text)  # only requests with logprobs render tokens
    started = asyncio.Event()
    healthy = asyncio.create_task(_stream(server.app, LONG, started))
    await started.wait()
    # As under uvicorn: the 500 goes out, and the re-raised exception only reaches the server's log.
    transport = httpx.ASGITransport(app=server.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.post("/v1/completions", json={**LONG, "logprobs": 2, "stream": stream})
    if stream:
        assert events(r.text)[-1]["error"]["code"] == "internal_error"
    else:
        assert_openai_error(r, 500)
    chunks = events(await healthy)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.state.ready
    for _ in range(200):
        if engine.block_manager.num_used_blocks == used and not engine.requests:
            break
        await asyncio.sleep(0.01)
    assert engine.block_manager.num_used_blocks == used and not engine.requests


async def test_engine_fault_in_one_request_fails_only_that_request(tiny_dir: Path) -> None:
    async with running_app(tiny_dir) as running:
        engine = running.state.llm_engine
        assert engine is not None
        real_enqueue = engine.enqueue

        evil_prompt = [1, 9, 9, 9]  # marks the one request whose detokenizer fails

        def enqueue_with_evil_detokenizer(request: Any) -> None:
            real_enqueue(request)
            if list(request.prompt_token_ids) == evil_prompt:
                def explode(*_: Any) -> str:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
                engine._detokenizers[request.request_id].step = explode  # type: ignore[method-assign]

        engine.enqueue = enqueue_with_evil_detokenizer  # type: ignore[method-assign]
        healthy = asyncio.create_task(running.client.post("/v1/completions", json=LONG))
        await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=running.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            bad = await client.post("/v1/completions", json={"prompt": evil_prompt, "max_tokens": 3})
        assert bad.status_code == 500
        assert (await healthy).status_code == 200
        assert running.state.ready


async def test_200_clients_disconnecting_at_random_points_leak_nothing(server: Running) -> None:
    engine = server.state.llm_engine
    assert engine is not None
    used, aborted = engine.block_manager.num_used_blocks, engine.num_aborted
    rng = random.Random(0)
    limit = asyncio.Semaphore(40)  # bounded concurrency: a burst, not a flood

    async def one() -> None:
        stream = rng.random() < 0.6
        body = {"prompt": [1] + [rng.randrange(7, 90) for _ in range(rng.randrange(1, 40))],
                "max_tokens": rng.randrange(1, 80), "ignore_eos": True, "stream": stream, "n": rng.choice([1, 1, 2])}
        cue = ({"after_chunks": rng.randrange(1, 6)} if stream and rng.random() < 0.5
               else {"after_s": rng.uniform(0, 0.05)})  # 0 s: before the prompt is even scheduled
        async with limit:
            await asgi_post(server.app, body, **cue)

    await asyncio.gather(*(one() for _ in range(200)))
    for _ in range(500):
        if engine.block_manager.num_used_blocks == used and not engine.requests:
            break
        await asyncio.sleep(0.01)
    assert engine.block_manager.num_used_blocks == used and not engine.requests
    assert server.state.num_admitted == 0 and engine.num_aborted > aborted
    ok = await server.client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
    assert ok.status_code == 200
