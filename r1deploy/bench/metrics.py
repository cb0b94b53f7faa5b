"""Run-level metrics from RequestRecords, with vLLM `bench serve`'s definitions so numbers compare.

Definitions (every latency in ms, percentiles by linear interpolation, as numpy.percentile):
- TTFT  = first token-bearing chunk - send time (reasoning tokens count: they are output).
- TPOT  = (E2E - TTFT) / (output tokens - 1), per request with > 1 output token, then aggregated.
- ITL   = every gap between consecutive token-bearing chunks, pooled over successful requests.
- E2E   = last token-bearing chunk - send time.
- TTFRT / TTFAT = time to the first reasoning / first answer (non-reasoning) chunk.
- request/s, input, output and total tok/s = totals over successful requests / run duration
  (first send to last completion, warm-up excluded).
- goodput = requests meeting every given --slo limit / duration; for goodput only, TPOT counts as
  0 when a request produced <= 1 token (as vLLM).
- peak concurrency = most requests in flight at once; peak output tok/s = busiest 1 s bucket.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from r1deploy.bench.record import RequestRecord

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e", "ttfrt", "ttfat")


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of(values: Iterable[float]) -> Distribution | None:
        data = sorted(values)
        if not data:
            return None
        mean = sum(data) / len(data)
        std = math.sqrt(sum((v - mean) ** 2 for v in data) / len(data))
        p50, p90, p99 = (percentile(data, q) for q in PERCENTILES)
        return Distribution(len(data), mean, std, data[0], data[-1], p50, p90, p99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """numpy.percentile's default (linear) method on already sorted values."""
    pos = (len(sorted_values) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


@dataclass(frozen=True)
class GoodputLimits:
    """Per-request limits in ms; None = not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def is_good(self, r: RequestRecord) -> bool:
        if not r.success or r.ttft_s is None or r.e2e_s is None:
            return False
        tpot_ms = (r.tpot_s or 0.0) * 1e3
        return all(limit is None or value <= limit for value, limit in (
            (r.ttft_s * 1e3, self.ttft_ms), (tpot_ms, self.tpot_ms), (r.e2e_s * 1e3, self.e2e_ms)))


@dataclass(frozen=True)
class Summary:
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    input_throughput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    errors: dict[str, int]
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2e: Distribution | None
    ttfrt: Distribution | None
    ttfat: Distribution | None

    def flat(self) -> dict[str, float | int | None]:
        """vLLM's result keys: duration, completed, ..., {mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms."""
        out: dict[str, float | int | None] = {
            k: v for k, v in asdict(self).items() if not isinstance(v, dict) or k == "errors"}
        for name in LATENCIES:
            dist: Distribution | None = getattr(self, name)
            out.pop(name, None)
            key = "e2el" if name == "e2e" else name  # vLLM spells it e2el
            for stat in ("mean", "std", "p50", "p90", "p99"):
                label = "median" if stat == "p50" else stat
                out[f"{label}_{key}_ms"] = None if dist is None else getattr(dist, stat)
        return out

    def latency(self, name: str, stat: str) -> float | None:
        dist: Distribution | None = getattr(self, name)
        return None if dist is None else getattr(dist, stat)


def summarize(records: Sequence[RequestRecord], duration_s: float,
              goodput: GoodputLimits | None = None) -> Summary:
    ok = [r for r in records if r.success]
    duration = max(duration_s, 1e-9)
    input_tokens = sum(r.input_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = None if goodput is None or goodput.empty else sum(goodput.is_good(r) for r in ok) / duration

    def ms(values: Iterable[float | None]) -> Distribution | None:
        return Distribution.of(v * 1e3 for v in values if v is not None)

    return Summary(
        duration_s=duration_s, completed=len(ok), failed=len(records) - len(ok),
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration, request_goodput=good,
        input_throughput=input_tokens / duration, output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        max_output_tokens_per_s=peak_output_tokens_per_s(ok),
        max_concurrent_requests=peak_concurrency(records),
        errors=dict(Counter(error_kind(r.error) for r in records if not r.success)),
        ttft=ms(r.ttft_s for r in ok), tpot=ms(r.tpot_s for r in ok),
        itl=ms(gap for r in ok for gap in r.itls_s), e2e=ms(r.e2e_s for r in ok),
        ttfrt=ms(r.ttfrt_s for r in ok), ttfat=ms(r.ttfat_s for r in ok),
    )


def error_kind(error: str | None) -> str:
    """Group errors by their first clause ('HTTP 500', 'connection refused', ...) for the summary."""
    return (error or "unknown").split(":", 1)[0].strip()[:60]


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    # Sweep line over (time, +1/-1); at equal times an end sorts before a start, so back-to-back
    # requests do not count as overlapping.
    events = sorted(ev for r in records for ev in ((r.start, 1), (r.end if r.end is not None else r.start, -1)))
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def token_times(r: RequestRecord) -> list[tuple[float, float]]:
    """(time, tokens) per chunk; tokens spread evenly over chunks when a chunk carried several."""
    if not r.chunk_times:
        return []
    per_chunk = r.output_tokens / len(r.chunk_times)
    return [(t, per_chunk) for t in r.chunk_times]


def output_tokens_per_bucket(records: Iterable[RequestRecord], t0: float, bucket_s: float = 1.0) -> list[float]:
    """Output tokens/s in consecutive buckets from t0: the throughput-over-time series."""
    counts: Counter[int] = Counter()
    for r in records:
        for t, n in token_times(r):
            counts[int((t - t0) // bucket_s)] += n
    if not counts:
        return []
    return [counts.get(i, 0.0) / bucket_s for i in range(max(counts) + 1)]


def peak_output_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    t0 = min(r.start for r in records)
    return max(output_tokens_per_bucket(records, t0), default=0.0)
