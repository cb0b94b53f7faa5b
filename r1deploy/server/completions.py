"""POST /v1/completions: prompts as text, token ids, or batches of either; `echo` puts each prompt's text
before its choices' text; structured output as in chat."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from r1deploy.server.errors import APIError
from r1deploy.server.generation import (
    Job,
    check_capacity,
    check_model,
    new_id,
    off_loop,
    sampling_params,
    unless_disconnected,
)
from r1deploy.server.logprobs import TokenText, completion_logprobs
from r1deploy.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from r1deploy.server.sse import sse_response
from r1deploy.server.state import ServerState
from r1deploy.server.structured_output import structured_spec

if TYPE_CHECKING:
    from r1deploy.engine.engine import LLMEngine


async def create_completion(body: CompletionRequest, request: Request, state: ServerState) -> Response:
    check_model(state, body.model)
    check_capacity(state, len(body.prompts) * body.n)  # before any work: overload answers in milliseconds
    structured, field = structured_spec(body, after_reasoning=False)
    params = sampling_params(body, body.max_tokens, body.logprobs, structured)
    engine = state.llm_engine
    assert engine is not None

    def prepare() -> list[list[int]]:
        if structured is not None:
            try:
                engine.grammars.compile(structured)  # on the tokenizer thread; cached for the engine
            except ValueError as exc:
                raise APIError(400, f"{field}: {exc}", param=field) from exc
        return [engine.tokenize(p) if isinstance(p, str) else list(p) for p in body.prompts]

    prompts = await off_loop(state, prepare)
    job = Job(state, new_id("cmpl"), prompts, params)
    await job.start()
    text = TokenText(engine.tokenizer)
    echoes = [_echo(engine, p, raw) if body.echo else "" for p, raw in zip(prompts, body.prompts, strict=True)]
    if body.stream:
        return sse_response(_chunks(job, body, state.model_name, text, echoes), state.settings.sse_keepalive_s)
    finals = await unless_disconnected(request, job.final_outputs())
    choices = []
    for index, final in enumerate(finals):
        out = final.outputs[0]
        logprobs = (completion_logprobs(text, out.token_ids, out.logprobs or (), out.top_logprobs)
                    if body.logprobs is not None else None)
        choices.append(CompletionChoice(index=index, text=echoes[index // len(job.children)] + out.text,
                                        logprobs=logprobs, finish_reason=out.finish_reason))
    generated = sum(len(f.outputs[0].token_ids) for f in finals)
    response = CompletionResponse(id=job.request_id, created=int(time.time()), model=state.model_name,
                                  choices=choices, usage=Usage.of(job.num_prompt_tokens, generated))
    return Response(response.model_dump_json(), media_type="application/json")


def _echo(engine: LLMEngine, ids: list[int], raw: str | list[int]) -> str:
    if isinstance(raw, str):
        return raw
    return engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""


async def _chunks(job: Job, body: CompletionRequest, model: str, text: TokenText,
                  echoes: list[str]) -> AsyncIterator[CompletionResponse]:
    created = int(time.time())
    echoed = [False] * job.num_choices
    sent_chars = [0] * job.num_choices
    sent_tokens = [0] * job.num_choices
    offsets = [0] * job.num_choices  # text_offset of the next token
    generated_so_far = [0] * job.num_choices  # per choice (continuous_usage_stats)
    generated = 0
    async for index, output in job.stream():
        out = output.outputs[0]
        delta = out.text[sent_chars[index]:]
        if not echoed[index]:  # the prompt goes first, with the choice's first text
            delta, echoed[index] = echoes[index // len(job.children)] + delta, True
        if not delta and not out.finished:
            continue  # tokens whose text is held back (a possible stop string) go out with it later
        tokens = out.token_ids[sent_tokens[index]:]
        logprobs = None
        if body.logprobs is not None:
            top = out.top_logprobs[sent_tokens[index]:] if out.top_logprobs else None
            logprobs = completion_logprobs(text, tokens, (out.logprobs or ())[sent_tokens[index]:], top,
                                           offsets[index])
            offsets[index] += sum(len(t) for t in logprobs.tokens)
        sent_chars[index], sent_tokens[index] = len(out.text), len(out.token_ids)
        generated_so_far[index] = len(out.token_ids)
        if out.finished:
            generated += len(out.token_ids)
        usage = Usage.of(job.num_prompt_tokens, sum(generated_so_far)) if body.continuous_usage else None
        yield CompletionResponse(id=job.request_id, created=created, model=model, usage=usage, choices=[
            CompletionChoice(index=index, text=delta, logprobs=logprobs, finish_reason=out.finish_reason)])
    if body.include_usage:
        yield CompletionResponse(id=job.request_id, created=created, model=model, choices=[],
                                 usage=Usage.of(job.num_prompt_tokens, generated))
