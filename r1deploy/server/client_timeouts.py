"""ClientTimeoutProtocol: uvicorn's h11 protocol with the two client timeouts it lacks (nginx's
client_header/client_body_timeout and send_timeout, as one --client-timeout).

- Request read: a request's headers and body must have arrived within the timeout of the connection opening (or
  of the previous response ending). uvicorn's keep-alive timer stops at the first byte, so without this a client
  trickling one byte a second (slowloris) keeps a connection, and once its headers are in, a request, for ever.
  Past it: 408 in OpenAI's error shape if the request had begun, then the connection is closed; the app reading
  the body sees a disconnect.
- Send stall: a client that stops reading fills the socket's buffers; the stream's next write then waits for
  it. A write stalled for the timeout aborts the connection (close() would wait for a flush that never comes);
  the app sees a disconnect, so the engine request is aborted and its KV blocks freed.

The event loop never waits on a client either way: other clients are served meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from r1deploy.server.errors import error_body

log = logging.getLogger("r1deploy.server")
_READING = (h11.IDLE, h11.SEND_BODY)  # the client's side of h11 while its request is not all in


class ClientTimeoutProtocol(H11Protocol):
    def __init__(self, *args: Any, client_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_timeout_s = client_timeout_s
        self._read_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_deadline()

    def on_response_complete(self) -> None:
        self._arm_read_deadline()
        super().on_response_complete()  # may read a pipelined request at once (handle_events disarms)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state not in _READING and self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.client_timeout_s, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in (self._read_deadline, self._send_deadline):
            if deadline is not None:
                deadline.cancel()
        self._read_deadline = self._send_deadline = None
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
        self._read_deadline = self.loop.call_later(self.client_timeout_s, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in _READING:
            return
        cycle = self.cycle
        if self.conn.their_state is h11.SEND_BODY and cycle is not None and not cycle.response_started:
            log.info("%s: request body not received within %gs; answering 408", self._who(), self.client_timeout_s)
            body = error_body(408, f"the request was not received within {self.client_timeout_s:g}s",
                              code="request_timeout").model_dump_json().encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=408, headers=headers)))
            self.transport.write(self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
            cycle.disconnected = True  # the app's own answer, if any, is dropped
            cycle.message_event.set()  # the app waiting for the body gets http.disconnect
            self.transport.close()
        else:
            log.info("%s: request not received within %gs; closing", self._who(), self.client_timeout_s)
            self.transport.abort()  # close() could wait for ever to flush to a client that reads nothing

    def _send_stalled(self) -> None:
        self._send_deadline = None
        log.warning("%s: the client read nothing for %gs; closing its connection", self._who(), self.client_timeout_s)
        self.transport.abort()

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
