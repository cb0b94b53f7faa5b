"""Metric formulas on hand-made timelines (times in seconds, expectations worked out by hand)."""

from __future__ import annotations

import pytest

from r1deploy.bench.metrics import Distribution, GoodputLimits, peak_concurrency, percentile, summarize
from r1deploy.bench.record import RequestRecord


def rec(rid: str, start: float, chunks: tuple[float, ...], tokens: int, **kw: object) -> RequestRecord:
    return RequestRecord(rid, start, chunks[-1] if chunks else None, chunks, input_tokens=10,
                         output_tokens=tokens, **kw)  # type: ignore[arg-type]


def test_single_request_formulas() -> None:
    # Sent at 0, tokens at 0.1, 0.3, 0.6: TTFT 100 ms, E2E 600 ms, TPOT (600-100)/2 = 250 ms,
    # ITLs 200 and 300 ms.
    r = rec("a", 0.0, (0.1, 0.3, 0.6), 3)
    assert r.ttft_s == pytest.approx(0.1)
    assert r.e2e_s == pytest.approx(0.6)
    assert r.tpot_s == pytest.approx(0.25)
    assert r.itls_s == pytest.approx((0.2, 0.3))


def test_tpot_uses_tokens_not_chunks() -> None:
    # Two chunks carrying 5 tokens (speculative decoding): TPOT = (1.0 - 0.2) / 4, one ITL gap only.
    r = rec("a", 0.0, (0.2, 1.0), 5)
    assert r.tpot_s == pytest.approx(0.2)
    assert r.itls_s == pytest.approx((0.8,))


def test_single_token_has_no_tpot() -> None:
    assert rec("a", 0.0, (0.1,), 1).tpot_s is None


def test_percentile_matches_numpy_linear() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    d = Distribution.of([4.0, 1.0, 3.0, 2.0])
    assert d is not None and d.mean == 2.5 and d.min == 1.0 and d.max == 4.0 and d.p50 == 2.5


def test_summary_throughput_goodput_and_failures() -> None:
    records = [
        rec("a", 0.0, (0.1, 0.3, 0.6), 3),  # TTFT 100, TPOT 250, E2E 600
        rec("b", 0.5, (0.55, 0.65, 1.5), 3),  # TTFT 50, TPOT 475, E2E 1000
        RequestRecord("c", 1.0, None, success=False, error="HTTP 500: boom", status=500),
    ]
    s = summarize(records, duration_s=2.0, goodput=GoodputLimits(ttft_ms=80.0))
    assert (s.completed, s.failed) == (2, 1)
    assert s.total_input_tokens == 20 and s.total_output_tokens == 6
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(3.0)
    assert s.total_token_throughput == pytest.approx(13.0)
    assert s.request_goodput == pytest.approx(0.5)  # only b meets TTFT <= 80 ms
    assert s.ttft is not None and s.ttft.mean == pytest.approx(75.0)
    assert s.tpot is not None and s.tpot.p50 == pytest.approx(362.5)
    assert s.itl is not None and s.itl.count == 4  # ITL pooled over successful requests
    assert s.e2e is not None and s.e2e.max == pytest.approx(1000.0)
    assert s.errors == {"HTTP 500": 1}
    flat = s.flat()
    assert flat["mean_ttft_ms"] == pytest.approx(75.0)
    assert flat["median_e2el_ms"] == pytest.approx(800.0)
    assert "p99_itl_ms" in flat and flat["errors"] == {"HTTP 500": 1}


def test_goodput_counts_tpot_zero_for_one_token() -> None:
    one = rec("a", 0.0, (0.05,), 1)
    s = summarize([one], 1.0, GoodputLimits(tpot_ms=1.0))
    assert s.request_goodput == pytest.approx(1.0)


def test_peak_concurrency_and_reasoning_times() -> None:
    records = [rec("a", 0.0, (0.5, 1.0), 2, first_reasoning=0.5, first_answer=1.0),
               rec("b", 0.2, (0.4, 0.8), 2), rec("c", 1.0, (1.5, 2.0), 2)]
    assert peak_concurrency(records) == 2  # c starts exactly when a ends: not overlapping
    s = summarize(records, 2.0)
    assert s.ttfrt is not None and s.ttfrt.mean == pytest.approx(500.0)
    assert s.ttfat is not None and s.ttfat.mean == pytest.approx(1000.0)
    assert s.max_output_tokens_per_s == pytest.approx(3.0)  # 0.4, 0.5 and 0.8 land in [0, 1) s


def test_empty_run_has_no_latencies() -> None:
    s = summarize([], 1.0)
    assert s.completed == 0 and s.ttft is None and s.request_goodput is None
