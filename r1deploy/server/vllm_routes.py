"""vLLM's utility endpoints: /health (200 when ready, 503 otherwise, as a load balancer expects), /version,
/tokenize (a prompt, or messages through the chat template) and /detokenize, with vLLM's request and
response shapes."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, model_validator

import r1deploy
from r1deploy.server.chat_template import template_messages
from r1deploy.server.errors import APIError, error_response
from r1deploy.server.generation import check_model, off_loop
from r1deploy.server.protocol import ChatMessage, _Strict
from r1deploy.server.state import ServerState


class TokenizeRequest(_Strict):
    """vLLM's CompletionTokenizeRequest (prompt) or ChatTokenizeRequest (messages), exactly one of them."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default as vLLM: True for a prompt, False for templated messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def add_vllm_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return Response(status_code=200)
        return error_response(503, f"not ready: {state.phase.value}", code=state.phase.value)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": r1deploy.__version__})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(state, body.model)
        engine = state.llm_engine
        assert engine is not None  # the gate admits /tokenize only when ready
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer (dummy weights)", code="no_tokenizer")

        def encode() -> list[int]:
            if body.prompt is not None:
                return engine.tokenize(body.prompt, body.add_special_tokens is not False)
            template = state.settings.chat_template or tokenizer.chat_template
            if not template:
                raise ValueError("messages: this model has no chat template")
            text = tokenizer.apply_chat_template(template_messages(body, native_tools=False),  # type: ignore[arg-type]
                                                 chat_template=template, tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt)
            return engine.tokenize(text, bool(body.add_special_tokens))

        tokens = await off_loop(state, encode)
        strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(state, body.model)
        engine = state.llm_engine
        assert engine is not None
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (dummy weights)", code="no_tokenizer")
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens: token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=await off_loop(state, lambda: engine.tokenizer.decode(body.tokens)))
