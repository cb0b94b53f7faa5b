"""Request: one sequence's state as it moves waiting -> running -> finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from r1deploy.sampling_params import SamplingParams

if TYPE_CHECKING:
    from r1deploy.structured.grammar import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against max_model_len
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # K/V of all_token_ids[:num_computed_tokens] are in the cache. A request is "caught up" when
    # only its newest token is missing; vLLM v1's scheduling idea: no prefill/decode phases.
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks of block_table already registered for prefix reuse
    # Async scheduling: tokens sampled by a step still in flight, not yet in output_token_ids. The
    # scheduler counts them (the next step computes their K/V) but nothing hashes or reads their values.
    num_placeholders: int = 0
    # Speculative decoding: draft tokens proposed after the newest token, verified by the next step (which
    # computes their K/V and samples 1 + len(spec_token_ids) positions); cleared once the step is processed.
    spec_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    grammar: RequestGrammar | None = None  # structured output: advanced by the engine as tokens are accepted
    # Timings (time.monotonic seconds)
    first_scheduled_time: float | None = None  # first admitted to the running batch
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    # Sampled-token logprobs and optional top-N (token id -> logprob) per output token
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    # Detokenised output; `stop_reason` is the stop string or token id that ended it, if any
    output_text: str = ""
    stop_reason: str | int | None = None
    error: str | None = None  # set when processing this request failed; it ends as aborted

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return self.num_tokens + self.num_placeholders

    @property
    def ends_in_flight(self) -> bool:
        """Its in-flight token is its last: it ends by length once that token is appended."""
        return self.num_placeholders > 0 and self.num_output_tokens + self.num_placeholders >= self.max_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens_with_drafts(self) -> int:
        """Tokens a step may compute K/V for: the known ones, the in-flight placeholder and the drafts."""
        return self.num_tokens_with_placeholders + len(self.spec_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end], followed by the drafts for positions past num_tokens, without copying
        the whole sequence (a decode step needs one token)."""
        num_prompt = len(self.prompt_token_ids)
        if end > self.num_tokens and self.spec_token_ids:
            drafts = self.spec_token_ids[max(0, start - self.num_tokens):end - self.num_tokens]
            return self.token_slice(start, self.num_tokens) + drafts if start < self.num_tokens else drafts
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - num_prompt)]

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
