"""The gate in front of every route, as plain ASGI (so streamed responses are counted until their
last byte): API key, readiness, body size, in-flight count for draining, status-code metrics.

Order matters: the key is checked before a byte of the body is read, and the body is capped before
JSON parsing, so neither an anonymous client nor a huge body costs memory.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r1deploy.server.errors import error_response
from r1deploy.server.state import Phase, ServerState

_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics", "/health/live", "/health/ready",
           "/health", "/version", "/tokenize", "/detokenize")
_ENGINE_ROUTES = ("/tokenize", "/detokenize")  # outside /v1 (vLLM's paths) but need the loaded model


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class GateMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self._key = None if state.settings.api_key is None else _digest(state.settings.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in _ROUTES else "other"
        code = 499  # nginx's "client closed request", unless a response starts
        counted = path.startswith("/v1/")

        async def send_and_record(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        if counted:
            self.state.in_flight += 1
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_and_record)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._capped_body(scope, receive, send_and_record)
                if receive is None:
                    return
            await self.app(scope, receive, send_and_record)
        finally:
            if counted:
                self.state.in_flight -= 1
            self.state.metrics.http_requests.labels(route, str(code)).inc()

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        path: str = scope["path"]
        if path == "/health" or path.startswith("/health/") or (path == "/metrics" and self.state.settings.metrics_public):
            return None  # probes stay open: orchestrators do not hold the key (scrapers, when told)
        if self._key is not None and not self._authorised(scope):
            return error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if path.startswith("/v1/") or path in _ENGINE_ROUTES:
            phase = self.state.phase
            if phase is not Phase.READY:
                return error_response(503, f"the server is {phase.value}", code=phase.value,
                                      headers={"Retry-After": "5"})
            if not self.state.engine_alive:
                return error_response(503, "the engine loop stopped; the server needs a restart",
                                      code="engine_dead")
        return None

    def _authorised(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                # Hash first so compare_digest sees equal lengths: no timing leak of the key length.
                return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._key)
        return False

    async def _capped_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body up to the cap (413 beyond it) and replay it to the app."""
        limit = self.state.settings.max_body_bytes
        too_large = error_response(413, f"request body exceeds {limit} bytes", code="request_too_large")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await too_large(scope, receive, send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect notice

        return replay
