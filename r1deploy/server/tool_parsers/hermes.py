"""`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` tool calls (Hermes, Qwen2.5/3, and the tool
prompt server/chat_template.py writes for chat templates that know no tools)."""

from __future__ import annotations

from r1deploy.server.tool_parsers.base import ParsedCall, held_back, load_partial


class HermesToolParser:
    BEGIN = "<tool_call>"
    END = "</tool_call>"

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        head, found, rest = text.partition(self.BEGIN)
        if not found:
            return (text if final else text[: len(text) - held_back(text, self.BEGIN)]), []
        calls: list[ParsedCall] = []
        bodies = rest.split(self.BEGIN)
        try:
            for i, body in enumerate(bodies):
                inner, closed, _ = body.partition(self.END)
                complete = bool(closed) or (final and i == len(bodies) - 1)
                calls.append(_call(inner if closed else inner[: len(inner) - held_back(inner, self.END)], complete))
        except ValueError:  # a finished call that is not JSON: the text is the answer
            return text, []
        return head, calls


def _call(body: str, complete: bool) -> ParsedCall:
    whole = load_partial(body.strip(), complete, strings=False)  # the name only once its string is closed
    if not isinstance(whole, dict) or "name" not in whole:
        if complete:
            raise ValueError("a tool call needs a name")
        return ParsedCall(None, None, False)
    parsed = whole if complete else load_partial(body.strip(), False)
    arguments = parsed.get("arguments", parsed.get("parameters")) if isinstance(parsed, dict) else None
    return ParsedCall(str(whole["name"]), arguments, complete)
