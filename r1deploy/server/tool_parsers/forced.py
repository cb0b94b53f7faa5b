"""Parsers for output a grammar forced into tool calls (tool_choice `required` or a named function, as vLLM
does): a named function's output is its arguments object; `required` writes a JSON array of
{"name": ..., "parameters": {...}} (server/tool_grammar.py builds both schemas)."""

from __future__ import annotations

from r1deploy.server.tool_parsers.base import ParsedCall, load_partial


class NamedFunctionParser:
    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        try:
            return "", [ParsedCall(self.name, load_partial(text, final), final)]
        except ValueError:  # cut short by max_tokens: not JSON, so it is returned as text
            return text, []


class RequiredCallsParser:
    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        try:
            names = load_partial(text, final, strings=False)  # names only once whole
            values = names if final else load_partial(text, False)
        except ValueError:
            return text, []
        if not isinstance(names, list) or not isinstance(values, list):
            return ("", []) if not final else (text, [])
        calls = []
        for named, value in zip(names, values):
            if not isinstance(named, dict) or "name" not in named:
                break
            calls.append(ParsedCall(str(named["name"]), value.get("parameters") if isinstance(value, dict) else None,
                                    final))
        return "", calls
