"""Every failure leaves the server in the OpenAI error shape `{"error": {message, type, param, code}}`.

FastAPI's own 422 body, Starlette's 404/405 and unexpected exceptions are converted here, so a
client never sees a traceback or a shape its SDK cannot parse.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from r1deploy.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("r1deploy.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"),
                                         param=param, code=code))


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code).model_dump(), status_code=status, headers=headers)


def bad_input(exc: ValueError) -> APIError:
    """The engine's and SamplingParams' ValueErrors start with the parameter's name ("prompt: ...",
    "top_k must be ..."), which becomes `param`."""
    match = re.match(r"(\w+)(?::| must)", str(exc))
    return APIError(400, str(exc), param=match.group(1) if match else None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # Pydantic tags union members in the path ("str", "list[...]"); they mean nothing to a client.
    loc = [part for part in loc if not re.search(r"[\[\]]|^(str|int|constrained-str)$", part)]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":  # OpenAI's answer to a field it does not know
        return f"{param}: unrecognized request argument; this server does not support it", param
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", code="internal_error")
