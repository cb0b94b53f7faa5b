"""create_app: the FastAPI app over one AsyncLLMEngine (one engine loop feeding every request).

The model loads in the background after the app starts, so /health/live answers at once while
/health/ready stays 503 until the engine is loaded and warm (and again while draining, or if the
engine loop died).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from r1deploy.server.chat import create_chat_completion
from r1deploy.server.completions import create_completion
from r1deploy.server.errors import error_response, install_error_handlers
from r1deploy.server.generation import ClientGone
from r1deploy.server.metrics import CONTENT_TYPE
from r1deploy.server.middleware import GateMiddleware
from r1deploy.server.openapi import ERROR_RESPONSES, install_openapi
from r1deploy.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from r1deploy.server.reasoning import vocab_has_think
from r1deploy.server.request_defaults import with_generation_defaults
from r1deploy.server.state import Phase, ServerSettings, ServerState
from r1deploy.server.vllm_routes import add_vllm_routes
from r1deploy.startup import phase

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine

log = logging.getLogger("r1deploy.server")
T = TypeVar("T")


def create_app(
    settings: ServerSettings,
    load_engine: Callable[[], LLMEngine],
    on_ready: Callable[[ServerState], None] | None = None,
    on_failed: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    state = ServerState(settings)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start(state, load_engine, on_ready, on_failed))
        watching = asyncio.create_task(_watch_engine(state, on_failed))
        try:
            yield
        finally:
            starting.cancel()
            watching.cancel()
            if state.phase is not Phase.FAILED:
                state.phase = Phase.DRAINING
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)
            state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # No /docs or /redoc: interactive pages are not part of the API and pull scripts from a CDN.
    app = FastAPI(title="r1deploy", lifespan=lifespan, docs_url=None, redoc_url=None, responses=ERROR_RESPONSES)
    install_openapi(app)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(GateMiddleware, state=state)
    if settings.allowed_origins:
        # Added last, so outermost: a browser's preflight carries no key and must be answered before the gate.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; it labels the metrics

    @app.get("/health/live")
    async def live() -> Response:
        if state.engine_failed:  # the process is about to exit; an orchestrator should restart it
            return error_response(503, "the engine loop died", code="engine_dead")
        return JSONResponse({"status": "live"})

    @app.get("/health/ready")
    async def ready() -> Response:
        if state.ready:
            return JSONResponse({"status": "ready"})
        reason = state.phase.value if state.phase is not Phase.READY else "engine_dead"
        return error_response(503, f"not ready: {reason}", code=reason)

    add_vllm_routes(app, state)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        engine = state.llm_engine
        assert engine is not None  # the gate admits /v1 only when ready
        return ModelList(data=[ModelCard(id=state.model_name, created=created, max_model_len=engine.max_model_len)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(with_generation_defaults(body, state.sampling_defaults), request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(with_generation_defaults(body, state.sampling_defaults), request, state)

    return app


async def _start(state: ServerState, load_engine: Callable[[], LLMEngine],
                 on_ready: Callable[[ServerState], None] | None,
                 on_failed: Callable[[BaseException], None] | None) -> None:
    from r1deploy.engine.async_engine import AsyncLLMEngine
    from r1deploy.sampling_params import SamplingParams

    began = time.perf_counter()
    try:
        llm = await _in_daemon_thread(load_engine)
        if llm.max_model_len > llm.kv_capacity_tokens:
            # One full-length request could never be scheduled: it would wait forever, so refuse now.
            raise RuntimeError(f"the KV cache holds {llm.kv_capacity_tokens} tokens, less than max_model_len "
                               f"({llm.max_model_len}): lower --max-model-len or give the KV cache more memory")
        engine = AsyncLLMEngine(llm)
        engine.start()
        state.engine = engine
        settings = state.settings
        state.model_name = settings.served_model_name or llm.loaded.name
        state.reasoning = (settings.reasoning_parser == "deepseek-r1"
                           or (settings.reasoning_parser is None and vocab_has_think(llm.tokenizer)))
        # One token through the whole path (scheduler, runner, sampler) before we call ourselves ready.
        warmup = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        with phase("warm-up request"):
            async for _ in engine.generate([0], warmup, "r1deploy-warmup"):
                pass
    except Exception as exc:  # noqa: BLE001 - any load failure must show as not-ready, not a hang
        state.phase, state.load_error = Phase.FAILED, exc
        log.error("the model failed to load: %s", exc)
        if on_failed is not None:
            on_failed(exc)
        return
    if state.phase is Phase.LOADING:
        log.info("server ready: %.2f s after loading began", time.perf_counter() - began)
        state.phase = Phase.READY
        if on_ready is not None:
            on_ready(state)


async def _watch_engine(state: ServerState, on_failed: Callable[[BaseException], None] | None) -> None:
    """Turn an engine-loop death into a FAILED server and tell the owner, so the process exits for a
    restart instead of answering 503 forever. The loop has already failed every in-flight request."""
    while not state.engine_failed:
        await asyncio.sleep(0.1)  # a poll: the engine thread has no hook into this event loop
    assert state.engine is not None and state.engine.error is not None
    state.phase = Phase.FAILED
    log.error("the engine loop died: %s", state.engine.error)
    if on_failed is not None:
        on_failed(state.engine.error)


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Like asyncio.to_thread, but a daemon thread: a SIGTERM during a long load must not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result: tuple[bool, object] = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:  # the loop closed while we loaded: nobody is waiting
            pass

    threading.Thread(target=run, name="r1deploy-load", daemon=True).start()
    return await future
