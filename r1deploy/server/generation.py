"""From validated prompts to engine requests and back: tokenise off the loop, validate every request
before any is queued, fan n out into n engine requests, merge their streams, abort on disconnect.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from r1deploy.engine.engine import OUT_OF_MEMORY
from r1deploy.engine.llm import fan_out
from r1deploy.engine.outputs import RequestOutput
from r1deploy.models.model_names import path_like
from r1deploy.sampling_params import SamplingParams
from r1deploy.server.errors import APIError, bad_input
from r1deploy.server.protocol import SamplingRequest
from r1deploy.server.request_fields import check_fields, logit_bias
from r1deploy.server.state import ServerState
from r1deploy.structured import StructuredOutputsParams
from r1deploy.structured.grammar import DEAD_END

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(state: ServerState, model: str | None) -> None:
    """404 for another model's name; 400 for a name that looks like a path (never opened: one model is served)."""
    reason = None if model is None else path_like(model)
    if reason is not None:
        raise APIError(400, f"model: {reason}", param="model", code="invalid_model_name")
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


async def off_loop(state: ServerState, fn: Callable[[], T]) -> T:
    """Run tokenisation or templating on the tokenizer thread; its ValueErrors are the client's fault."""
    try:
        return await asyncio.get_running_loop().run_in_executor(state.tokenizer_pool, fn)
    except ValueError as exc:
        raise bad_input(exc) from exc


def check_capacity(state: ServerState, num_choices: int) -> None:
    """429 at once when admitting num_choices more engine requests would pass max_num_seqs running plus
    max_queue waiting: a client told to back off beats one left waiting in an unbounded queue."""
    if state.num_admitted + num_choices > state.capacity:
        raise APIError(429, "the server is overloaded: too many requests running and queued; retry later",
                       code="server_overloaded", headers={"Retry-After": "1"})


class Job:
    """One HTTP request's engine requests: prompts x n choices, choice index = prompt * n + i."""

    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]],
                 params: SamplingParams) -> None:
        self.state = state
        self.request_id = request_id
        self.prompts = prompts
        self.children = fan_out(params)
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * len(self.children)

    @property
    def num_prompt_tokens(self) -> int:
        """Usage counts each prompt once, however many choices it has (OpenAI's rule)."""
        return sum(len(p) for p in self.prompts)

    def _child_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    async def start(self) -> None:
        """Validate every prompt against the engine's checks (length, max_tokens, vocab) before anything
        is queued (children differ only in seed, so the first per prompt stands for all), then admit
        and submit all children."""
        state = self.state
        engine = state.llm_engine
        assert engine is not None  # the gate admits /v1 only when ready
        n = len(self.children)
        await off_loop(state, lambda: [engine.make_request(p, self.children[0], self._child_id(i * n))
                                       for i, p in enumerate(self.prompts)])
        # Check and count with no await in between, so concurrent requests cannot overshoot together.
        check_capacity(state, self.num_choices)
        for index in range(self.num_choices):
            task = asyncio.create_task(self._run_child(index))
            state.num_admitted += 1
            # A done callback, not the coroutine's finally: it runs even for a task cancelled unstarted.
            task.add_done_callback(self._child_done)
            self._tasks.append(task)

    def _child_done(self, _: asyncio.Task[None]) -> None:
        self.state.num_admitted -= 1
        self._queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, cumulative output) as they come; leaving the iteration early (an error, a
        disconnect, a cancelled task) cancels every child, which aborts its engine request."""
        try:
            remaining = len(self._tasks)
            while remaining:
                item = await self._queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in self._tasks:
                task.cancel()

    async def _run_child(self, index: int) -> None:
        state = self.state
        assert state.engine is not None
        params = self.children[index % len(self.children)]
        prompt = self.prompts[index // len(self.children)]
        try:
            async for output in state.engine.generate(prompt, params, self._child_id(index)):
                if output.finished:
                    state.metrics.observe_finished(output.outputs[0], len(prompt))
                self._queue.put_nowait((index, output))
        except ValueError as exc:
            self._queue.put_nowait(bad_input(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. the engine loop died: the request must hear of it
            error: Exception = exc
            if state.engine_failed:
                error = APIError(500, "the engine failed; the server is shutting down for a restart",
                                 code="engine_dead")
            elif DEAD_END in str(exc):  # the request's own constraint, not the server, ran out of tokens
                error = APIError(400, DEAD_END + str(exc).split(DEAD_END, 1)[1], param="structured_outputs")
            elif OUT_OF_MEMORY in str(exc):  # that step's requests failed; the engine serves on
                error = APIError(503, str(exc).removeprefix("engine failed: "), code="out_of_memory")
            self._queue.put_nowait(error)

    async def final_outputs(self) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * self.num_choices
        async for index, output in self.stream():
            if output.finished:
                finals[index] = output
        return finals  # type: ignore[return-value] - every child ends with a finished output


async def _disconnected(request: Request) -> None:
    # After the body is read, the next ASGI message is the disconnect notice (or the end of the
    # response): the one reliable signal for a non-streaming request.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone
    return task.result()


def sampling_params(body: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    structured: StructuredOutputsParams | None = None,
                    skip_special_tokens: bool | None = None) -> SamplingParams:
    check_fields(body)
    try:
        return SamplingParams(
            n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop,
            stop_token_ids=body.stop_token_ids or (), max_tokens=max_tokens, min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos, logprobs=logprobs, logit_bias=logit_bias(body), structured_outputs=structured,
            skip_special_tokens=body.skip_special_tokens if skip_special_tokens is None else skip_special_tokens)
    except ValueError as exc:
        raise bad_input(exc) from exc
