"""Operating the server: probes, metrics, API key, overload, draining, engine death, disconnects."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_util import asgi_post
from prometheus_client.parser import text_string_to_metric_families
from server_harness import Running, running_app, tiny_engine, wait_for_phase
from test_errors import assert_openai_error

from r1deploy.server.state import Phase

pytestmark = pytest.mark.anyio


async def test_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).status_code == 200
    assert (await client.get("/health/ready")).json() == {"status": "ready"}


async def test_metrics_exposes_the_named_series(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "ignore_eos": True})
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {s.name: s for family in text_string_to_metric_families(r.text) for s in family.samples}
    for name in ("r1deploy_http_requests_total", "r1deploy_request_finished_total", "r1deploy_num_requests_running",
                 "r1deploy_num_requests_waiting", "r1deploy_kv_cache_blocks_used", "r1deploy_kv_cache_blocks_total",
                 "r1deploy_prefix_cache_hit_rate", "r1deploy_preemptions_total", "r1deploy_aborted_requests_total",
                 "r1deploy_prompt_tokens_total", "r1deploy_generation_tokens_total",
                 "r1deploy_time_to_first_token_seconds_bucket", "r1deploy_time_per_output_token_seconds_bucket",
                 "r1deploy_e2e_request_latency_seconds_bucket"):
        assert name in samples, name
    assert samples["r1deploy_kv_cache_blocks_total"].value == 64
    assert samples["r1deploy_generation_tokens_total"].value >= 3


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_aborts_and_frees_blocks(server: Running, stream: bool) -> None:
    engine = server.state.llm_engine
    assert engine is not None
    aborted, used = engine.num_aborted, engine.block_manager.num_used_blocks
    body = {"prompt": [1, 7], "max_tokens": 120, "ignore_eos": True, "stream": stream}
    await asgi_post(server.app, body, **({"after_chunks": 1} if stream else {"after_s": 0.05}))
    for _ in range(200):  # the abort crosses to the engine thread
        if engine.num_aborted > aborted and engine.block_manager.num_used_blocks == used:
            break
        await asyncio.sleep(0.01)
    assert engine.num_aborted == aborted + 1
    assert engine.block_manager.num_used_blocks == used and not engine.requests
    assert server.state.num_admitted == 0
    ok = await server.client.post("/v1/completions", json={"prompt": "the", "max_tokens": 1})
    assert ok.status_code == 200


async def test_api_key_on_every_route_but_probes(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, api_key="sekret") as running:
        client = running.client
        good = {"Authorization": "Bearer sekret"}
        body = {"prompt": "the", "max_tokens": 1}
        assert_openai_error(await client.post("/v1/completions", json=body), 401)
        assert_openai_error(await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer x"}), 401)
        assert_openai_error(await client.post("/v1/completions", json=body, headers={"Authorization": "sekret"}), 401)
        for path in ("/metrics", "/v1/models", "/openapi.json", "/v1/nope"):
            assert_openai_error(await client.get(path), 401)
        assert (await client.get("/health/ready")).status_code == 200  # probes need no key
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.post("/v1/completions", json=body, headers=good)).status_code == 200
        assert (await client.get("/metrics", headers=good)).status_code == 200


async def test_metrics_public_and_no_docs(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, api_key="sekret", metrics_public=True) as running:
        assert (await running.client.get("/metrics")).status_code == 200
        assert_openai_error(await running.client.get("/v1/models"), 401)
        good = {"Authorization": "Bearer sekret"}
        for path in ("/docs", "/redoc"):  # no interactive pages
            assert_openai_error(await running.client.get(path, headers=good), 404)


async def test_cors_only_when_origins_allowed(client: httpx.AsyncClient, tiny_dir: Path) -> None:
    origin = {"Origin": "https://app.example"}
    r = await client.get("/v1/models", headers=origin)
    assert not [h for h in r.headers if h.startswith("access-control-")]
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with running_app(tiny_dir, api_key="k", allowed_origins=("https://app.example",)) as running:
        r = await running.client.options("/v1/chat/completions", headers=preflight)  # a preflight carries no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = await running.client.get("/v1/models", headers={**origin, "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await running.client.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


async def test_draining_refuses_new_requests(tiny_dir: Path) -> None:
    async with running_app(tiny_dir) as running:
        client, state = running.client, running.state
        state.phase = Phase.DRAINING
        assert (await client.get("/health/ready")).status_code == 503
        assert (await client.get("/health/live")).status_code == 200
        assert_openai_error(await client.post("/v1/completions", json={"prompt": "the"}), 503)


async def test_not_ready_while_loading_then_ready(tiny_dir: Path) -> None:
    gate = threading.Event()

    def slow_load() -> Any:
        gate.wait(10)
        return tiny_engine(tiny_dir)

    async with running_app(tiny_dir, load=slow_load) as running:
        client = running.client
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 503
        assert_openai_error(await client.get("/v1/models"), 503)
        gate.set()
        await wait_for_phase(running.state, Phase.READY)
        assert (await client.get("/health/ready")).status_code == 200


async def test_failed_load_stays_not_ready(tiny_dir: Path) -> None:
    def broken() -> Any:
        raise RuntimeError("no memory left for the KV cache")

    async with running_app(tiny_dir, load=broken) as running:
        await wait_for_phase(running.state, Phase.FAILED)
        r = await running.client.get("/health/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "failed"
