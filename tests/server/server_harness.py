"""Server fixtures: the real app (loader, engine, lifespan) on a tiny model, over httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package
from tiny import save_tiny_model_dir

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig
from r1deploy.server.app import create_app
from r1deploy.server.state import Phase, ServerSettings, ServerState

MAX_MODEL_LEN = 128


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


class Running(NamedTuple):
    app: FastAPI
    state: ServerState
    client: httpx.AsyncClient


def tiny_engine(model_dir: Path, **config: Any) -> LLMEngine:
    return LLMEngine(str(model_dir), config=EngineConfig(num_gpu_blocks_override=64, max_model_len=MAX_MODEL_LEN,
                                                         **config))


async def wait_for_phase(state: ServerState, phase: Phase) -> None:
    for _ in range(1000):
        if state.phase is not Phase.LOADING:
            break
        await asyncio.sleep(0.01)
    assert state.phase is phase, state.load_error


@asynccontextmanager
async def running_app(model_dir: Path, load: Callable[[], LLMEngine] | None = None,
                      on_failed: Callable[[BaseException], None] | None = None,
                      **settings: Any) -> AsyncIterator[Running]:
    """The app over the tiny model; with a custom `load`, the caller waits for the phase it expects."""
    app = create_app(ServerSettings(**settings), load or (lambda: tiny_engine(model_dir)), on_failed=on_failed)
    state: ServerState = app.state.server
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            if load is None:
                await wait_for_phase(state, Phase.READY)
            yield Running(app, state, client)


@pytest.fixture(scope="session")
async def server(tiny_dir: Path) -> AsyncIterator[Running]:
    async with running_app(tiny_dir) as running:
        yield running


@pytest.fixture
def client(server: Running) -> httpx.AsyncClient:
    return server.client


@pytest.fixture
def state(server: Running) -> ServerState:
    return server.state
