"""Call an ASGI app as a server would: see each chunk as it is sent (httpx's ASGI transport buffers
the whole response) and disconnect on cue (httpx cannot)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, NamedTuple


class Answer(NamedTuple):
    status: int | None  # None: no response started before the client left
    text: str


async def asgi_post(app: Any, body: dict[str, Any], *, path: str = "/v1/completions",
                    after_chunks: int | None = None, after_s: float | None = None,
                    started: asyncio.Event | None = None) -> Answer:
    """POST body; set `started` at the first non-empty body chunk; disconnect after `after_chunks` such
    chunks or `after_s` seconds, whichever comes first (neither: read to the end)."""
    raw = json.dumps(body).encode()
    gone = asyncio.Event()
    status: int | None = None
    parts: list[bytes] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if gone.is_set():
            return  # uvicorn too drops what is sent after a disconnect, without an error
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message.get("body"):
            parts.append(message["body"])
            if started is not None:
                started.set()
            if after_chunks is not None and len(parts) >= after_chunks:
                gone.set()

    if after_s is not None:
        asyncio.get_running_loop().call_later(after_s, gone.set)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), 20)
    return Answer(status, b"".join(parts).decode())
