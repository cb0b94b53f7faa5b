"""The SSE chunks of a streamed chat completion: per choice, the reasoning / content split, then tool-call
deltas parsed out of the content; usage at the end, or on every chunk with continuous_usage_stats."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from r1deploy.server.generation import Job
from r1deploy.server.logprobs import TokenText, chat_logprobs
from r1deploy.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    DeltaMessage,
    Usage,
)
from r1deploy.server.reasoning import ReasoningStream
from r1deploy.server.state import ServerState
from r1deploy.server.tool_parsers import ToolParser
from r1deploy.server.tool_parsers.stream import ToolCallStream


@dataclass(frozen=True)
class ChatPlan:
    """How one request's output is read: reasoning split, tool-call parser, and the finish reason a call
    gives (OpenAI: `tool_calls`, but `stop` when tool_choice named the function)."""

    reasoning: bool
    think_end_id: int | None
    tool_parser: ToolParser | None
    max_calls: int | None  # parallel_tool_calls=false: one
    call_finish: str = "tool_calls"

    def finish_reason(self, finish_reason: str | None, called: bool) -> str | None:
        return self.call_finish if called and finish_reason == "stop" else finish_reason

    def reasoning_tokens(self, token_ids: tuple[int, ...]) -> int | None:
        """Output tokens up to and including </think>; all of them while the thought is unfinished."""
        if not self.reasoning:
            return None
        if self.think_end_id is not None and self.think_end_id in token_ids:
            return token_ids.index(self.think_end_id) + 1
        return len(token_ids)


async def chat_chunks(job: Job, body: ChatCompletionRequest, state: ServerState, text: TokenText,
                      plan: ChatPlan) -> AsyncIterator[ChatCompletionChunk]:
    created = int(time.time())
    model = state.model_name
    n = job.num_choices
    tokens = [0] * n  # generated so far, per choice (usage)
    reasoning_tokens: list[int | None] = [None] * n

    def usage() -> Usage:
        counted = [r for r in reasoning_tokens if r is not None]
        return Usage.of(job.num_prompt_tokens, sum(tokens), sum(counted) if counted else None)

    def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=job.request_id, created=created, model=model, choices=[choice],
                                   usage=usage() if body.continuous_usage else None)

    for index in range(n):  # OpenAI opens every choice with the role
        yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
    splitters = [ReasoningStream(plan.reasoning) for _ in range(n)]
    calls = [ToolCallStream(plan.tool_parser, plan.max_calls) if plan.tool_parser else None for _ in range(n)]
    contents = [""] * n  # each choice's content so far, for its tool-call parser
    sent_tokens = [0] * n
    async for index, output in job.stream():
        out = output.outputs[0]
        tokens[index] = len(out.token_ids)
        reasoning_tokens[index] = plan.reasoning_tokens(out.token_ids)
        reasoning, content = splitters[index].update(out.text, out.finished)
        tool_deltas = None
        stream = calls[index]
        if stream is not None:
            contents[index] += content
            content, tool_deltas = stream.update(contents[index], out.finished)
        if not reasoning and not content and not tool_deltas and not out.finished:
            continue  # held back (a possible stop string, tag or tool call): its tokens go out with it later
        logprobs = None
        if body.logprobs:
            start = sent_tokens[index]
            top = out.top_logprobs[start:] if out.top_logprobs else None
            logprobs = chat_logprobs(text, out.token_ids[start:], (out.logprobs or ())[start:], top)
        sent_tokens[index] = len(out.token_ids)
        delta = DeltaMessage(content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None,
                             tool_calls=tool_deltas or None)
        finish_reason = plan.finish_reason(out.finish_reason, stream is not None and stream.called)
        yield chunk(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason))
    if body.include_usage:
        yield ChatCompletionChunk(id=job.request_id, created=created, model=model, choices=[], usage=usage())
