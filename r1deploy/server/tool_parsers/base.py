"""What every tool-call parser returns, and the partial-JSON reading they share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import partial_json_parser
from partial_json_parser.core.exceptions import MalformedJSON, PartialJSON
from partial_json_parser.core.options import Allow


@dataclass(frozen=True)
class ParsedCall:
    name: str | None  # None while the name is still arriving
    arguments: Any  # the (possibly partial) arguments as parsed JSON; None before any arrived
    complete: bool  # the call's text is closed: `arguments` is final

    def arguments_json(self) -> str:
        return json.dumps(self.arguments if self.arguments is not None else {}, ensure_ascii=False)


class ToolParser(Protocol):
    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        """(content, calls) of `text`. While not final, content stops before anything that may still turn
        out to be tool-call markup, so what was returned as content is never taken back."""
        ...


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of text could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def load_partial(text: str, complete: bool, strings: bool = True) -> Any:
    """JSON text -> value; incomplete text gives what has arrived (with strings=False, a string still
    arriving is left out: a name is only used once whole). None when nothing usable has arrived yet.
    ValueError for malformed complete JSON."""
    if complete:
        return json.loads(text)
    if not text.strip():
        return None
    try:
        return partial_json_parser.loads(text, Allow.ALL if strings else Allow.ALL & ~Allow.STR)
    except (ValueError, MalformedJSON, PartialJSON):
        return None
