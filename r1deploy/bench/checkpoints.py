"""Soak checkpoints and the growth / drift verdict drawn from them.

A checkpoint is taken at idle: the load pauses, in-flight requests finish, and once the target's KV
blocks are back (or IDLE_WAIT_S passed) the serving process is sampled: RSS, open fds, threads, KV
blocks in use, allocator reserved / allocated (fragmentation) and GPU memory, plus the window's p50 /
p99 TTFT and TPOT (requests that finished since the previous checkpoint). Growth is measured between
the first checkpoint (after warm-up and one interval of load) and the last, never from a cold baseline,
so that caches and pools filling up once do not read as a leak.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1deploy.bench.metrics import percentile
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.slo import Check, Target, verdict
from r1deploy.bench.telemetry import fragmentation_pct

SOAK_TARGETS = (
    Target("server_5xx", "responses with HTTP 5xx", "<=", 0, ""),
    Target("kv_blocks_over_baseline", "KV blocks in use over the baseline at any idle checkpoint", "<=", 0, ""),
    Target("rss_growth_pct", "RSS growth, first to last checkpoint", "<=", 2, " %"),
    Target("threads_growth_pct", "threads growth, first to last checkpoint", "<=", 10, " %"),
    Target("gpu_mem_growth_pct", "GPU memory growth, first to last checkpoint", "<=", 5, " %"),
    Target("p99_tpot_drift_pct", "p99 TPOT drift, first to last full window", "<=", 10, " %"),
)


def checkpoint(t_s: float, sample: dict[str, Any], window: Sequence[RequestRecord]) -> dict[str, Any]:
    gpu_mem = [g["mem_used_bytes"] for g in sample["gpus"] if g.get("mem_used_bytes") is not None]
    return {
        "t_s": round(t_s, 3), "rss_bytes": sample["rss_bytes"], "open_fds": sample.get("open_fds"),
        "threads": sample.get("threads"), "kv_blocks_used": sample["kv_blocks_used"],
        "reserved_bytes": sample["reserved_bytes"], "allocated_bytes": sample["allocated_bytes"],
        "fragmentation_pct": fragmentation_pct(sample["reserved_bytes"], sample["allocated_bytes"]),
        "gpu_mem_used_bytes": sum(gpu_mem) if gpu_mem else None,
        "window": window_stats(window),
    }


def window_stats(records: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.success]

    def ms(values: list[float | None], q: float) -> float | None:
        data = sorted(v for v in values if v is not None)
        return round(1e3 * percentile(data, q), 3) if data else None

    ttft, tpot = [r.ttft_s for r in ok], [r.tpot_s for r in ok]
    return {"requests": len(records), "failed": len(records) - len(ok),
            "http_5xx": sum(1 for r in records if (r.status or 0) >= 500),
            "p50_ttft_ms": ms(ttft, 50), "p99_ttft_ms": ms(ttft, 99),
            "p50_tpot_ms": ms(tpot, 50), "p99_tpot_ms": ms(tpot, 99)}


def _growth(first: float | None, last: float | None) -> float | None:
    if first is None or last is None or first <= 0:
        return None
    return 100.0 * (last - first) / first


def soak_checks(baseline: dict[str, Any], points: Sequence[dict[str, Any]], variant_5xx: int,
                connections: int) -> list[Check]:
    """connections: the load's client connections, which the server's open fds count while kept alive."""
    fds = Target("open_fds_growth", f"open fds growth, first to last checkpoint (beyond {connections} client "
                 "connections)", "<=", connections, "")
    first, last = (points[0], points[-1]) if len(points) >= 2 else (None, None)

    def growth(key: str) -> float | None:
        return None if first is None else _growth(first[key], last[key])

    def tpot_drift() -> float | None:
        if first is None:
            return None
        # The run's tail (after the last interval) may hold a handful of requests: its p99 is noise, not drift.
        full = [p for p in points[1:] if p["window"]["requests"] * 2 >= first["window"]["requests"]]
        return _growth(first["window"]["p99_tpot_ms"], full[-1]["window"]["p99_tpot_ms"]) if full else None

    kv_base = baseline.get("kv_blocks_used")
    kv = [p["kv_blocks_used"] for p in points if p["kv_blocks_used"] is not None]
    values = {
        "server_5xx": float(variant_5xx + sum(p["window"]["http_5xx"] for p in points)),
        "kv_blocks_over_baseline": None if kv_base is None or not kv else max(kv) - kv_base,
        "rss_growth_pct": growth("rss_bytes"),
        "open_fds_growth": None if first is None or first["open_fds"] is None or last["open_fds"] is None
        else last["open_fds"] - first["open_fds"],
        "threads_growth_pct": growth("threads"), "gpu_mem_growth_pct": growth("gpu_mem_used_bytes"),
        "p99_tpot_drift_pct": tpot_drift(),
    }
    few = "needs 2 checkpoints: run longer than 2 x --checkpoint-interval"
    notes = {"kv_blocks_over_baseline": "no KV block count from the target",
             "gpu_mem_growth_pct": "no GPU: memory not measured" if first else few,
             "rss_growth_pct": "the target exports no process_resident_memory_bytes" if first else few,
             "open_fds_growth": "the target exports no process_open_fds" if first else few,
             "threads_growth_pct": "the target exports no process_threads" if first else few,
             "p99_tpot_drift_pct": "no request with > 1 output token in a window" if first else few}
    return verdict((*SOAK_TARGETS, fds), values, notes)
