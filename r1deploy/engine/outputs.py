"""What the engine hands back: vLLM-shaped RequestOutput with one CompletionOutput per sequence."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float  # time.monotonic() seconds
    first_token_time: float | None
    token_times: tuple[float, ...]  # one per output token
    finish_time: float | None
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    num_preemptions: int
    first_scheduled_time: float | None = None  # first admitted to the running batch: queue time ends there

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None  # the stop string or stop token id, None for EOS or length
    error: str | None  # why the request failed (it then ends with finish_reason "abort"), else None
    logprobs: tuple[float, ...] | None  # sampled-token logprob per output token, if requested
    top_logprobs: tuple[dict[int, float], ...] | None
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    # Shortcuts for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def metrics(self) -> RequestMetrics:
        return self.outputs[0].metrics
