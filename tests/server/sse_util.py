"""Parse an SSE body into its JSON events; asserts the stream ends with [DONE]."""

from __future__ import annotations

import json
from typing import Any


def events(body: str) -> list[dict[str, Any]]:
    lines = [line for line in body.split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines), body
    assert lines[-1] == "data: [DONE]", body
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
