"""POST /v1/chat/completions: the chat template (tools included), reasoning split into `reasoning_content`
(and vLLM's newer `reasoning`), tool calls parsed out of the answer, output constrained by a grammar."""

from __future__ import annotations

import time
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import Response

from r1deploy.server.chat_stream import ChatPlan, chat_chunks
from r1deploy.server.chat_template import template_kwargs, template_messages, uses_tools, with_tool_prompt
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
    ChatCompletionRequest,
    ChatCompletionResponse,
    NamedToolChoice,
    Usage,
)
from r1deploy.server.reasoning import THINK_END, split_reasoning
from r1deploy.server.sse import sse_response
from r1deploy.server.state import ServerState
from r1deploy.server.structured_output import structured_spec
from r1deploy.server.tool_parsers import ToolParser, parser_for
from r1deploy.server.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser
from r1deploy.server.tool_parsers.stream import tool_calls
from r1deploy.server.tools import check_tools


def _plan(body: ChatCompletionRequest, state: ServerState, kwargs: dict[str, Any], vocab: dict[str, int]) -> ChatPlan:
    # A thinking switch turned off in the template means the answer has no thought to split off.
    thinking = kwargs.get("thinking", kwargs.get("enable_thinking", True)) is not False
    parser: ToolParser | None = None
    finish = "tool_calls"
    if body.tools and body.tool_choice != "none":
        if isinstance(body.tool_choice, NamedToolChoice):
            parser, finish = NamedFunctionParser(str(body.tool_choice.function.get("name"))), "stop"
        elif body.tool_choice == "required":
            parser = RequiredCallsParser()
        else:
            parser = parser_for(vocab)
    return ChatPlan(state.reasoning and thinking, vocab.get(THINK_END), parser,
                    None if body.parallel_tool_calls else 1, finish)


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState) -> Response:
    check_model(state, body.model)
    check_capacity(state, body.n)  # before any work, so an overloaded server answers in milliseconds
    check_tools(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
    engine = state.llm_engine
    assert engine is not None
    settings = state.settings
    kwargs = template_kwargs(body, settings.default_chat_template_kwargs)
    vocab = engine.tokenizer.get_vocab() if engine.tokenizer is not None else {}
    plan = _plan(body, state, kwargs, vocab)
    structured, field = structured_spec(body, after_reasoning=plan.reasoning)
    params = sampling_params(body, body.max_completion_tokens or body.max_tokens,
                             (body.top_logprobs or 0) if body.logprobs else None, structured)
    template = settings.chat_template or (engine.tokenizer.chat_template if engine.tokenizer is not None else None)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    native_tools = tools is not None and template is not None and uses_tools(template)
    messages = template_messages(body, native_tools)
    if tools and not native_tools:
        messages = with_tool_prompt(messages, tools)

    def prepare() -> list[int]:
        try:
            ids = engine.chat_prompt_ids(messages, tools=tools if native_tools else None,
                                         chat_template=settings.chat_template, **kwargs)
        except jinja2.TemplateError as exc:  # e.g. the template's raise_exception on role order
            raise ValueError(f"messages: the chat template rejected them: {exc}") from exc
        if structured is not None:  # compiled here, on the tokenizer thread, and cached for the engine's use
            try:
                engine.grammars.compile(structured)
            except ValueError as exc:
                raise APIError(400, f"{field}: {exc}", param=field) from exc
        return ids

    job = Job(state, new_id("chatcmpl"), [await off_loop(state, prepare)], params)
    await job.start()
    text = TokenText(engine.tokenizer)
    if body.stream:
        return sse_response(chat_chunks(job, body, state, text, plan), state.settings.sse_keepalive_s)
    finals = await unless_disconnected(request, job.final_outputs())
    choices = []
    reasoning_tokens: int | None = None
    for index, final in enumerate(finals):
        out = final.outputs[0]
        reasoning, content = split_reasoning(out.text) if plan.reasoning else (None, out.text)
        calls = []
        if plan.tool_parser is not None:
            content, parsed = plan.tool_parser.parse(content or "", final=True)
            calls = tool_calls(parsed[: plan.max_calls])
            content = content or None
        logprobs = chat_logprobs(text, out.token_ids, out.logprobs or (), out.top_logprobs) if body.logprobs else None
        message = AssistantMessage(content=content, reasoning_content=reasoning, reasoning=reasoning, tool_calls=calls)
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs,
                                  finish_reason=plan.finish_reason(out.finish_reason, bool(calls))))
        counted = plan.reasoning_tokens(out.token_ids)
        if counted is not None:
            reasoning_tokens = (reasoning_tokens or 0) + counted
    generated = sum(len(f.outputs[0].token_ids) for f in finals)
    response = ChatCompletionResponse(id=job.request_id, created=int(time.time()), model=state.model_name,
                                      choices=choices, usage=Usage.of(job.num_prompt_tokens, generated, reasoning_tokens))
    return Response(response.model_dump_json(), media_type="application/json")
