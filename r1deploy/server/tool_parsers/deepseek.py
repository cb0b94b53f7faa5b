"""DeepSeek-V3 / R1-0528 tool calls (the format of presets/r1_chat_template.jinja and DeepSeek's own):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
    ...<｜tool▁calls▁end｜>

These markers are ordinary added tokens in DeepSeek's vocabulary (not special), so they survive
skip_special_tokens and are read here from the text.
"""

from __future__ import annotations

from r1deploy.server.tool_parsers.base import ParsedCall, held_back, load_partial

FENCE_OPEN = "```json\n"
FENCE_CLOSE = "\n```"


class DeepSeekV3ToolParser:
    CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
    CALL_BEGIN = "<｜tool▁call▁begin｜>"
    CALL_END = "<｜tool▁call▁end｜>"
    SEP = "<｜tool▁sep｜>"

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        head, found, rest = text.partition(self.CALLS_BEGIN)
        if not found:
            return (text if final else text[: len(text) - held_back(text, self.CALLS_BEGIN)]), []
        calls: list[ParsedCall] = []
        position = 0
        try:
            while (start := rest.find(self.CALL_BEGIN, position)) >= 0:
                body_start = start + len(self.CALL_BEGIN)
                end = rest.find(self.CALL_END, body_start)
                calls.append(self._call(rest[body_start:] if end < 0 else rest[body_start:end], end >= 0 or final))
                if end < 0:
                    break
                position = end + len(self.CALL_END)
        except ValueError:  # a finished call whose arguments are not JSON: not a call, the text is the answer
            return text, []
        return head, calls

    def _call(self, body: str, complete: bool) -> ParsedCall:
        _, sep, after = body.partition(self.SEP)
        name, newline, arguments = after.partition("\n")
        if not sep or not (newline or complete):
            return ParsedCall(None, None, False)
        if arguments.startswith(FENCE_OPEN):
            arguments = arguments[len(FENCE_OPEN):]
        elif FENCE_OPEN.startswith(arguments):
            arguments = ""  # the fence is still arriving
        if complete:
            arguments = arguments.rstrip().removesuffix("```")
        else:
            arguments = arguments.partition(FENCE_CLOSE)[0]
            arguments = arguments[: len(arguments) - held_back(arguments, FENCE_CLOSE)]
        return ParsedCall(name.strip(), load_partial(arguments, complete), complete)
