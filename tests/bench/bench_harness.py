"""A small FastAPI app that speaks the OpenAI streaming API (completions + chat, include_usage,
delta.reasoning_content, Prometheus /metrics), served by uvicorn on a free port in a thread, and a
helper that runs `r1deploy bench` through the real CLI error handling."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass(frozen=True)
class FakeServerOptions:
    api_key: str | None = None
    fail_every: int = 0  # every n-th request answers HTTP 500 (0 = never)
    token_delay_s: float = 0.002
    reasoning_tokens: int = 0  # chat: this many reasoning_content deltas before the answer
    include_usage: bool = True
    rss_growth_per_scrape: float | None = None  # export process_* series; RSS grows this much per scrape
    spec_decode: bool = False  # export vLLM's spec_decode_* counters: per request 2 drafts of 2, 3 accepted


def make_app(options: FakeServerOptions) -> FastAPI:
    app = FastAPI()
    counter = {"n": 0}

    def authorised(request: Request) -> bool:
        return options.api_key is None or request.headers.get("authorization") == f"Bearer {options.api_key}"

    def unauthorised() -> JSONResponse:
        return JSONResponse({"error": {"message": "invalid api key", "type": "auth", "param": None,
                                       "code": 401}}, status_code=401)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = ("# HELP x\nfake_allocator_reserved_bytes{gpu=\"0\"} 1000\n"
                "fake_allocator_allocated_bytes{gpu=\"0\"} 970\nfake_kv_blocks_used 3\n")
        if options.rss_growth_per_scrape is not None:
            counter["scrapes"] = counter.get("scrapes", 0) + 1
            rss = 1e9 + counter["scrapes"] * options.rss_growth_per_scrape
            text += f"process_resident_memory_bytes {rss}\nprocess_open_fds 20\nprocess_threads 8\n"
        if options.spec_decode:
            n = counter["n"]
            text += (f'vllm:spec_decode_num_drafts_total{{model_name="fake-model"}} {2 * n}\n'
                     f'vllm:spec_decode_num_draft_tokens_total{{model_name="fake-model"}} {4 * n}\n'
                     f'vllm:spec_decode_num_accepted_tokens_total{{model_name="fake-model"}} {3 * n}\n'
                     f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="fake-model",position="0"}} '
                     f'{2 * n}\nvllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="fake-model",'
                     f'position="1"}} {n}\n')
        return PlainTextResponse(text)

    async def stream(request: Request, chat: bool):
        if not authorised(request):
            return unauthorised()
        counter["n"] += 1
        if options.fail_every and counter["n"] % options.fail_every == 0:
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error",
                                           "param": None, "code": 500}}, status_code=500)
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        n = int(body.get("max_tokens", 16))

        async def events() -> Iterator[str]:
            kind = "chat.completion.chunk" if chat else "text_completion"
            if chat:  # a role-only first chunk, as OpenAI sends: it must not count as the first token
                yield f"data: {json.dumps({'object': kind, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            for i in range(n):
                await asyncio.sleep(options.token_delay_s)
                if chat:
                    key = "reasoning_content" if i < options.reasoning_tokens else "content"
                    choice = {"index": 0, "delta": {key: " tok"}, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": " tok", "finish_reason": None}
                yield f"data: {json.dumps({'object': kind, 'choices': [choice]})}\n\n"
            if options.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                         "total_tokens": prompt_tokens + n}
                yield f"data: {json.dumps({'object': kind, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await stream(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await stream(request, chat=True)

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_server() -> Iterator:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(options: FakeServerOptions = FakeServerOptions()) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(make_app(options), host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=5)


def run_bench(argv: list[str]) -> int:
    """`r1deploy bench ARGV` through r1deploy.cli's own error handling (UsageError -> exit 2)."""
    from r1deploy.bench.cli import register
    from r1deploy.cli import _Parser, _run

    parser = _Parser(prog="r1deploy")
    register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return _run(parser, ["bench", *argv])
