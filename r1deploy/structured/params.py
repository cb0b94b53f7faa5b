"""StructuredOutputsParams: what a request's output must match (vLLM's name and fields). Pure data, no
xgrammar import, so SamplingParams can carry it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None  # a JSON schema; normalised to its JSON text (the cache key)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None  # normalised to a tuple
    grammar: str | None = None  # EBNF (GBNF dialect, as xgrammar reads it)
    strict: bool = True  # JSON schema: no properties beyond those listed (OpenAI's strict mode)
    # Reasoning models: the constraint starts after the model's </think>, so the thought stays free text.
    after_reasoning: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            # Key order is kept: the grammar writes properties in the schema's order.
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar")

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"
