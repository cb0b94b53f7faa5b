"""RequestRecord: what one benchmark request did, as timestamps; every metric is derived from these.

All times are `time.monotonic()` seconds, the clock the engine stamps its tokens with, so in-process
and HTTP records are comparable. A "chunk" is one streamed message (SSE event or engine output)
that carried at least one token; several tokens may share a chunk (speculative decoding, batching).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    start: float  # just before the request was sent (engine: queued)
    end: float | None  # last token-bearing chunk; the trailing usage-only chunk does not count
    chunk_times: tuple[float, ...] = ()  # arrival of every token-bearing chunk, first one included
    input_tokens: int = 0
    output_tokens: int = 0
    output_tokens_source: str = "none"  # usage | engine | tokenizer | chunks (an estimate)
    first_reasoning: float | None = None  # first chunk with reasoning_content (R1 <think> text)
    first_answer: float | None = None  # first chunk with answer content
    success: bool = True
    error: str | None = None
    status: int | None = None  # HTTP status, None in-process
    round: int = -1  # batch round (--batch/--repeat), -1 for open-loop arrivals

    @property
    def first_token(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e_s(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1): the first token is excluded on both sides (vLLM)."""
        if self.output_tokens <= 1 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> tuple[float, ...]:
        """Gaps between consecutive token-bearing chunks (no zero gaps for multi-token chunks)."""
        times = self.chunk_times
        return tuple(b - a for a, b in pairwise(times))

    @property
    def ttfrt_s(self) -> float | None:
        return None if self.first_reasoning is None else self.first_reasoning - self.start

    @property
    def ttfat_s(self) -> float | None:
        return None if self.first_answer is None else self.first_answer - self.start

    def to_json(self, t0: float) -> dict[str, object]:
        """Times relative to the run's start (t0), latencies in ms: the per-request rows of the report."""
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1e3, 4)

        return {
            "request_id": self.request_id, "round": self.round, "success": self.success,
            "error": self.error, "status": self.status,
            "start_s": round(self.start - t0, 6),
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "output_tokens_source": self.output_tokens_source,
            "ttft_ms": ms(self.ttft_s), "tpot_ms": ms(self.tpot_s), "e2e_ms": ms(self.e2e_s),
            "ttfrt_ms": ms(self.ttfrt_s), "ttfat_ms": ms(self.ttfat_s),
            "chunk_offsets_ms": [round((t - self.start) * 1e3, 4) for t in self.chunk_times],
        }
