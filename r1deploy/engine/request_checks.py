"""The checks a request's prompt and token budget pass before the engine builds it (LLMEngine.make_request)."""

from __future__ import annotations

from collections.abc import Sequence

from r1deploy.sampling_params import SamplingParams


def checked_max_tokens(token_ids: Sequence[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> int:
    """The request's max_tokens (max_model_len's room when unset); a ValueError names the bad parameter."""
    if not token_ids:
        raise ValueError("prompt: empty prompt")
    if any(t < 0 or t >= vocab_size for t in token_ids):
        raise ValueError(f"prompt: token ids must be in [0, {vocab_size})")
    if any(t >= vocab_size for t, _ in params.logit_bias):
        raise ValueError(f"logit_bias: token ids must be in [0, {vocab_size})")
    if len(token_ids) >= max_model_len:
        raise ValueError(f"prompt: {len(token_ids)} tokens, but max_model_len is {max_model_len} "
                         "(and at least one token must be generated)")
    room = max_model_len - len(token_ids)
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens > room:
        raise ValueError(f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) "
                         f"exceeds max_model_len ({max_model_len})")
    return max_tokens
