"""Tool-call parsers: model output text -> (content, tool calls), on finished text or on the growing text of
a stream. `parser_for` picks DeepSeek's tool-call tokens when the vocabulary has them, else the
`<tool_call>{json}</tool_call>` style (Hermes, Qwen, and the prompt r1deploy writes for templates without
tool support)."""

from __future__ import annotations

from r1deploy.server.tool_parsers.base import ParsedCall, ToolParser
from r1deploy.server.tool_parsers.deepseek import DeepSeekV3ToolParser
from r1deploy.server.tool_parsers.hermes import HermesToolParser

__all__ = ["DeepSeekV3ToolParser", "HermesToolParser", "ParsedCall", "ToolParser", "parser_for"]


def parser_for(vocab: dict[str, int]) -> ToolParser:
    if DeepSeekV3ToolParser.CALLS_BEGIN in vocab:
        return DeepSeekV3ToolParser()
    return HermesToolParser()
