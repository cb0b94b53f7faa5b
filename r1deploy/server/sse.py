"""Server-sent events: one `data: {json}` per chunk, `data: [DONE]` last, errors as an event too."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from r1deploy.server.errors import APIError, error_body

log = logging.getLogger("r1deploy.server")


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


def sse_response(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    return StreamingResponse(_with_error_event(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
