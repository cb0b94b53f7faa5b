"""POST /v1/chat/completions: the model's chat template, reasoning split into `reasoning_content`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import jinja2
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
from r1deploy.server.logprobs import TokenText, chat_logprobs
from r1deploy.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
)
from r1deploy.server.reasoning import ReasoningStream, split_reasoning
from r1deploy.server.sse import sse_response
from r1deploy.server.state import ServerState
from r1deploy.server.tools import check_tools


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages.{i}.content: only text parts are supported",
                               param=f"messages.{i}.content")
            content = "\n".join(part.text for part in content)  # type: ignore[misc]
        # Chat templates know "system", not OpenAI's newer "developer".
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return messages


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState) -> Response:
    check_model(state, body.model)
    check_capacity(state, body.n)  # before any work, so an overloaded server answers in milliseconds
    check_tools(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
    params = sampling_params(body, body.max_completion_tokens or body.max_tokens,
                             (body.top_logprobs or 0) if body.logprobs else None)
    engine = state.llm_engine
    assert engine is not None
    messages = _messages(body)

    def template() -> list[int]:
        try:
            return engine.chat_prompt_ids(messages)
        except jinja2.TemplateError as exc:  # e.g. the template's raise_exception on role order
            raise ValueError(f"messages: the chat template rejected them: {exc}") from exc

    job = Job(state, new_id("chatcmpl"), [await off_loop(state, template)], params)
    await job.start()
    text = TokenText(engine.tokenizer)
    if body.stream:
        return sse_response(_chunks(job, body, state, text), state.settings.sse_keepalive_s)
    finals = await unless_disconnected(request, job.final_outputs())
    choices = []
    for index, final in enumerate(finals):
        out = final.outputs[0]
        reasoning, content = split_reasoning(out.text) if state.reasoning else (None, out.text)
        logprobs = chat_logprobs(text, out.token_ids, out.logprobs or (), out.top_logprobs) if body.logprobs else None
        choices.append(ChatChoice(index=index, message=AssistantMessage(content=content, reasoning_content=reasoning),
                                  logprobs=logprobs, finish_reason=out.finish_reason))
    generated = sum(len(f.outputs[0].token_ids) for f in finals)
    response = ChatCompletionResponse(id=job.request_id, created=int(time.time()), model=state.model_name,
                                      choices=choices, usage=Usage.of(job.num_prompt_tokens, generated))
    return Response(response.model_dump_json(), media_type="application/json")


async def _chunks(job: Job, body: ChatCompletionRequest, state: ServerState,
                  text: TokenText) -> AsyncIterator[ChatCompletionChunk]:
    created = int(time.time())
    model = state.model_name

    def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=job.request_id, created=created, model=model, choices=[choice])

    for index in range(job.num_choices):  # OpenAI opens every choice with the role
        yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
    splitters = [ReasoningStream(state.reasoning) for _ in range(job.num_choices)]
    sent_tokens = [0] * job.num_choices
    generated = 0
    async for index, output in job.stream():
        out = output.outputs[0]
        reasoning, content = splitters[index].update(out.text, out.finished)
        if not reasoning and not content and not out.finished:
            continue  # held back (a possible stop string or tag): its tokens go out with the text later
        logprobs = None
        if body.logprobs:
            start = sent_tokens[index]
            top = out.top_logprobs[start:] if out.top_logprobs else None
            logprobs = chat_logprobs(text, out.token_ids[start:], (out.logprobs or ())[start:], top)
        sent_tokens[index] = len(out.token_ids)
        if out.finished:
            generated += len(out.token_ids)
        delta = DeltaMessage(content=content or None, reasoning_content=reasoning or None)
        yield chunk(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=out.finish_reason))
    if body.include_usage:
        yield ChatCompletionChunk(id=job.request_id, created=created, model=model, choices=[],
                                  usage=Usage.of(job.num_prompt_tokens, generated))
