"""ToolCallStream: the growing text of one choice -> content deltas and OpenAI tool-call deltas (an id and
the name once, then argument text as it is written).

Arguments are streamed as the JSON text `json.dumps` gives the (partial) parsed value, minus the closing
quotes and brackets the partial parser supplied; a piece is sent only when it extends what was sent, so the
concatenated deltas equal the finished call's `arguments` exactly.
"""

from __future__ import annotations

import uuid

from r1deploy.server.protocol import DeltaFunctionCall, DeltaToolCall, OutFunctionCall, OutToolCall
from r1deploy.server.tool_parsers.base import ParsedCall, ToolParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(calls: list[ParsedCall]) -> list[OutToolCall]:
    return [OutToolCall(id=new_call_id(), function=OutFunctionCall(name=c.name or "", arguments=c.arguments_json()))
            for c in calls if c.name is not None]


def _arguments_so_far(call: ParsedCall) -> str:
    text = call.arguments_json()
    # An unfinished value may still change at its end (a number, a literal, the closers the partial parser
    # added), so its tail waits; whatever is sent is a prefix of the finished text.
    return text if call.complete else text.rstrip('"]}0123456789.-+eE')


class ToolCallStream:
    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls  # parallel_tool_calls=false: the first call only
        self._content_sent = 0
        self._ids: list[str] = []
        self._arguments_sent: list[str] = []

    @property
    def called(self) -> bool:
        return bool(self._ids)

    def update(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        content, calls = self.parser.parse(text, final)
        content_delta = content[self._content_sent:]
        self._content_sent = max(self._content_sent, len(content))
        deltas: list[DeltaToolCall] = []
        for index, call in enumerate(calls[: self.max_calls]):
            if call.name is None:
                break
            opening = index == len(self._ids)
            if opening:
                self._ids.append(new_call_id())
                self._arguments_sent.append("")
            sent = self._arguments_sent[index]
            arguments = _arguments_so_far(call) if call.arguments is not None or call.complete else ""
            piece = arguments[len(sent):] if arguments.startswith(sent) else ""
            self._arguments_sent[index] = sent + piece
            if opening:
                deltas.append(DeltaToolCall(index=index, id=self._ids[index], type="function",
                                            function=DeltaFunctionCall(name=call.name, arguments=piece)))
            elif piece:
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=piece)))
        return content_delta, deltas
