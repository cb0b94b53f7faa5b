"""POST /v1/completions: prompts as text, token ids, or batches of either."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

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


async def create_completion(body: CompletionRequest, request: Request, state: ServerState) -> Response:
    check_model(state, body.model)
    check_capacity(state, len(body.prompts) * body.n)  # before any work: overload answers in milliseconds
    params = sampling_params(body, body.max_tokens, body.logprobs)
    engine = state.llm_engine
    assert engine is not None
    prompts = await off_loop(state, lambda: [engine.tokenize(p) if isinstance(p, str) else list(p)
                                             for p in body.prompts])
    job = Job(state, new_id("cmpl"), prompts, params)
    await job.start()
    text = TokenText(engine.tokenizer)
    if body.stream:
        return sse_response(_chunks(job, body, state.model_name, text), state.settings.sse_keepalive_s)
    finals = await unless_disconnected(request, job.final_outputs())
    choices = []
    for index, final in enumerate(finals):
        out = final.outputs[0]
        logprobs = (completion_logprobs(text, out.token_ids, out.logprobs or (), out.top_logprobs)
                    if body.logprobs is not None else None)
        choices.append(CompletionChoice(index=index, text=out.text, logprobs=logprobs,
                                        finish_reason=out.finish_reason))
    generated = sum(len(f.outputs[0].token_ids) for f in finals)
    response = CompletionResponse(id=job.request_id, created=int(time.time()), model=state.model_name,
                                  choices=choices, usage=Usage.of(job.num_prompt_tokens, generated))
    return Response(response.model_dump_json(), media_type="application/json")


async def _chunks(job: Job, body: CompletionRequest, model: str, text: TokenText) -> AsyncIterator[CompletionResponse]:
    created = int(time.time())
    sent_chars = [0] * job.num_choices
    sent_tokens = [0] * job.num_choices
    offsets = [0] * job.num_choices  # text_offset of the next token
    generated = 0
    async for index, output in job.stream():
        out = output.outputs[0]
        delta = out.text[sent_chars[index]:]
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
        if out.finished:
            generated += len(out.token_ids)
        yield CompletionResponse(id=job.request_id, created=created, model=model, choices=[
            CompletionChoice(index=index, text=delta, logprobs=logprobs, finish_reason=out.finish_reason)])
    if body.include_usage:
        yield CompletionResponse(id=job.request_id, created=created, model=model, choices=[],
                                 usage=Usage.of(job.num_prompt_tokens, generated))
