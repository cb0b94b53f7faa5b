"""SamplingParams: how one request's tokens are chosen and when its generation stops.

Field names, defaults and meanings follow vLLM's `SamplingParams`, so client code written for
vLLM (and the OpenAI-style server) passes its keyword arguments through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1deploy.structured.params import StructuredOutputsParams

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS): dividing logits by a
# near-zero temperature would overflow to inf and turn the softmax into NaN.
SAMPLING_EPS = 1e-5

# vLLM's default cap on top logprobs per token; larger requests cost a [B, N] top-k every step.
MAX_LOGPROBS = 20
LOGIT_BIAS_BOUND = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
MAX_LOGIT_BIAS = 1024  # biased tokens per request


# Wrong types raise ValueError too (noqa TRY004), like vLLM: callers such as the server catch one
# exception type and report the named parameter as a bad request.


def _number(name: str, value: object) -> float:
    # bool is an int subclass; `temperature=True` is a bug on the caller's side, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")  # noqa: TRY004
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")  # noqa: TRY004
    return value


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off (normalised to 0)
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token)
    repetition_penalty: float = 1.0  # HF/vLLM: seen (prompt + output) logits / p if > 0, * p if <= 0
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence of the token in the output
    seed: int | None = None  # per-request RNG seed: same seed, same tokens whatever the batch
    stop: str | list[str] | tuple[str, ...] | None = None  # normalised to tuple[str, ...]
    stop_token_ids: list[int] | tuple[int, ...] = ()  # normalised to tuple[int, ...]
    max_tokens: int | None = 16  # None = until max_model_len
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are generated
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token; 0 = only the sampled token's
    skip_special_tokens: bool = True
    # token id -> added to its logit before sampling (ids checked against the vocabulary by the engine);
    # normalised to a tuple of (id, bias) pairs
    logit_bias: dict[int, float] | tuple[tuple[int, float], ...] | None = None
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must match

    def __post_init__(self) -> None:
        # Frozen: normalised values are written with object.__setattr__. Every normalised form is
        # itself valid input, so dataclasses.replace() (which re-runs __post_init__) works.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if _integer("n", self.n) < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")

        temperature = _number("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {temperature}")
        put("temperature", temperature)

        top_p = _number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        put("top_p", top_p)

        top_k = _integer("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or positive, got {top_k}")
        put("top_k", max(top_k, 0))  # one spelling of "off" downstream

        min_p = _number("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        put("min_p", min_p)

        repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
        put("repetition_penalty", repetition_penalty)

        for name in ("presence_penalty", "frequency_penalty"):
            penalty = _number(name, getattr(self, name))
            if not -2.0 <= penalty <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {penalty}")
            put(name, penalty)

        if self.seed is not None:
            _integer("seed", self.seed)

        put("stop", self._normalise_stop(self.stop))

        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")  # noqa: TRY004
        for token_id in self.stop_token_ids:
            if _integer("stop_token_ids", token_id) < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {token_id}")
        put("stop_token_ids", tuple(self.stop_token_ids))

        if self.max_tokens is not None and _integer("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if _integer("min_tokens", self.min_tokens) < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must not exceed max_tokens, got min_tokens={self.min_tokens} > {self.max_tokens}"
            )

        if self.logprobs is not None and not 0 <= _integer("logprobs", self.logprobs) <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

        put("logit_bias", self._normalise_logit_bias(self.logit_bias))
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams")
            # Once the grammar is complete it allows only EOS; holding EOS back would leave no token at all.
            if self.ignore_eos or self.min_tokens:
                raise ValueError("structured_outputs cannot be combined with ignore_eos or min_tokens")

        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")  # noqa: TRY004

    @staticmethod
    def _normalise_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
        pairs = bias.items() if isinstance(bias, dict) else bias or ()
        out = []
        for pair in pairs:  # type: ignore[union-attr]
            token_id, value = pair
            if _integer("logit_bias", token_id) < 0:
                raise ValueError(f"logit_bias: token ids must be non-negative, got {token_id}")
            value = _number("logit_bias", value)
            if not -LOGIT_BIAS_BOUND <= value <= LOGIT_BIAS_BOUND:
                raise ValueError(f"logit_bias: values must be in [-100, 100], got {value} for token {token_id}")
            out.append((token_id, value))
        if len(out) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(out)}")
        return tuple(out)

    @staticmethod
    def _normalise_stop(stop: object) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a str or a list of str, got {stop!r}")
        if any(s == "" for s in stop):
            # An empty stop string matches at every position and would end generation at once.
            raise ValueError("stop must not contain empty strings")
        return tuple(stop)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: no randomness, so top-p, min-p and the seed have no effect."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1
