"""Fault injection in the serving path: out of memory inside a forward fails that step's requests with a
clear error, and the server stays ready, frees their blocks and serves the next request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from server_harness import running_app
from test_errors import assert_openai_error

pytestmark = pytest.mark.anyio
BODY = {"prompt": "the cat sat on", "max_tokens": 6, "ignore_eos": True}


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError("cannot allocate 2 GiB")])
async def test_out_of_memory_in_a_forward_fails_that_step_only(tiny_dir: Path, error: BaseException) -> None:
    async with running_app(tiny_dir) as running:
        client, engine = running.client, running.state.llm_engine
        assert engine is not None
        real_execute = engine.executor.execute
        faults = {"left": 1}

        def execute_running_out_of_memory(*args: Any) -> Any:  # the test hook: one forward runs out of memory
            if faults["left"]:
                faults["left"] -= 1
                raise error
            return real_execute(*args)

        engine.executor.execute = execute_running_out_of_memory  # type: ignore[method-assign]
        error_body = assert_openai_error(await client.post("/v1/completions", json=BODY), 503)
        assert error_body["code"] == "out_of_memory" and "out of memory in the forward pass" in error_body["message"]
        assert type(error).__name__ in error_body["message"]
        assert engine.block_manager.num_used_blocks == 0  # the failed step's blocks are back
        assert (await client.get("/health/ready")).status_code == 200
        ok = await client.post("/v1/completions", json=BODY)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6

        faults["left"] = 1  # streamed: the error arrives in-band, then [DONE]
        streamed = await client.post("/v1/completions", json={**BODY, "stream": True})
        events = [json.loads(line[5:]) for line in streamed.text.splitlines()
                  if line.startswith("data:") and "[DONE]" not in line]
        assert events[-1]["error"]["code"] == "out_of_memory" and streamed.text.rstrip().endswith("[DONE]")
        assert engine.block_manager.num_used_blocks == 0
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200
