"""Call an ASGI app as a server would, with a client that disconnects on cue (httpx cannot)."""

from __future__ import annotations

import asyncio
import json
from typing import Any


async def call_then_disconnect(app: Any, body: dict[str, Any], *, after_chunks: int | None = None,
                               after_s: float | None = None, path: str = "/v1/completions") -> list[dict[str, Any]]:
    """POST body, then disconnect after `after_chunks` non-empty response body chunks or `after_s`
    seconds, whichever comes first; returns the ASGI messages the app sent."""
    raw = json.dumps(body).encode()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    delivered = False
    chunks = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunks
        sent.append(message)  # uvicorn too drops what is sent after a disconnect, without an error
        if message["type"] == "http.response.body" and message.get("body"):
            chunks += 1
            if after_chunks is not None and chunks >= after_chunks:
                gone.set()

    if after_s is not None:
        asyncio.get_running_loop().call_later(after_s, gone.set)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent
