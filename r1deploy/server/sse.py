"""Server-sent events: one `data: {json}` per chunk, `data: [DONE]` last, errors as an event too, and a
`: keep-alive` comment (which SSE clients ignore) after each quiet interval, so that a proxy with an idle
timeout does not cut a stream while R1 thinks for minutes between visible chunks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from r1deploy.server.errors import APIError, error_body

log = logging.getLogger("r1deploy.server")
KEEPALIVE = ": keep-alive\n\n"


def event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def _with_error_event(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    # Headers (200) are already sent, so a failure mid-stream can only be reported in-band; the
    # stream still ends with [DONE] so that clients stop reading.
    try:
        async for chunk in chunks:
            yield event(chunk)
    except APIError as exc:
        yield event(error_body(exc.status, exc.message, exc.param, exc.code))
    except Exception as exc:
        log.exception("stream failed", exc_info=exc)
        yield event(error_body(500, "internal server error", code="internal_error"))
    yield "data: [DONE]\n\n"


async def _with_keepalive(events: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    if interval_s <= 0:
        async for item in events:
            yield item
        return
    # The next event is awaited in a task and waited for with a timeout that does not cancel it
    # (asyncio.wait_for would, killing the generator mid-step).
    pending = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(events))
    finally:
        pending.cancel()  # a client gone mid-wait: the cancellation reaches the generator, which aborts its job


def sse_response(chunks: AsyncIterator[BaseModel], keepalive_s: float = 0.0) -> StreamingResponse:
    return StreamingResponse(_with_keepalive(_with_error_event(chunks), keepalive_s), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
