"""Request fields that are honoured with a check (logit_bias, best_of, echo) or refused with a 400 naming
them (prompt_logprobs, suffix): none is silently dropped."""

from __future__ import annotations

from r1deploy.server.errors import APIError
from r1deploy.server.protocol import CompletionRequest, SamplingRequest


def check_fields(body: SamplingRequest) -> None:
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of: only best_of equal to n is supported (no server-side ranking of choices)",
                       param="best_of")
    if body.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs: not supported by this server", param="prompt_logprobs")
    if isinstance(body, CompletionRequest):
        if body.suffix is not None:
            raise APIError(400, "suffix: not supported by this server (no fill-in-the-middle)", param="suffix")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo: with logprobs it needs prompt logprobs, which this server does not "
                                "compute; drop one of them", param="echo")


def logit_bias(body: SamplingRequest) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings); the bounds are checked by SamplingParams and
    the ids against the vocabulary by the engine."""
    if not body.logit_bias:
        return None
    try:
        return {int(token): bias for token, bias in body.logit_bias.items()}
    except ValueError as exc:
        raise APIError(400, "logit_bias: keys must be token ids", param="logit_bias") from exc
