"""Twenty JSON schemas for the structured-output end-to-end test: nested objects, enums, arrays, required
fields, bounded so that a 135M model finishes each well inside max_tokens."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
COLOR = {"type": "string", "enum": ["red", "green", "blue"]}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
FLAG = {"type": "boolean"}
TAGS = {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                          "y": {"type": "integer", "minimum": -9, "maximum": 9}},
         "required": ["x", "y"], "additionalProperties": False}
FIELDS: list[tuple[str, dict[str, Any]]] = [("name", NAME), ("color", COLOR), ("age", AGE), ("ok", FLAG),
                                            ("tags", TAGS), ("point", POINT)]


def _object(fields: list[tuple[str, dict[str, Any]]], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": dict(fields), "required": required, "additionalProperties": False}


def schemas() -> list[dict[str, Any]]:
    out = []
    for i in range(20):
        picked = [FIELDS[(i + k) % len(FIELDS)] for k in range(1 + i % 3)]
        names = [name for name, _ in picked]
        schema = _object(picked, names if i % 2 == 0 else names[:1])
        if i % 4 == 3:  # nested: the object inside another, with an array of enums beside it
            schema = _object([("item", schema), ("labels", TAGS)], ["item", "labels"])
        out.append(schema)
    return out
