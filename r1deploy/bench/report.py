"""The run report: one JSON document (every request's timings), a CSV of requests, a console summary.

JSON layout (schema "r1deploy-bench/1"): config, environment, definitions, summary (vLLM's result
keys: duration, completed, request_throughput, ..., {mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms),
slo (profile, checks, passed), telemetry (summary + series), efficiency (MBU / MFU, planned vs
measured), optional expert_offload (--offload experts: the expert store's hits, misses, hit rate, bytes
moved, stall time over the measured phase), optional speculative (speculative decoding over the measured phase:
acceptance per draft position, mean accepted length, draft and verify time per verify step), sweep and soak
sections, and requests (one row per request).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from r1deploy.bench.metrics import Summary
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.slo import PASS, Check
from r1deploy.bench.spec_report import print_section as print_spec_section

SCHEMA = "r1deploy-bench/1"

DEFINITIONS = {
    "ttft": "time to first token: first token-bearing chunk - send time (reasoning tokens count)",
    "tpot": "time per output token: (E2E - TTFT) / (output tokens - 1), per request with > 1 token",
    "itl": "inter-token latency: each gap between consecutive token-bearing chunks, pooled",
    "e2el": "end-to-end latency: last token-bearing chunk - send time",
    "ttfrt": "time to first reasoning token (reasoning_content / text before </think>)",
    "ttfat": "time to first answer token (content after the reasoning)",
    "throughput": "totals over successful requests / duration (first send to last completion, no warm-up)",
    "goodput": "requests meeting every latency limit (TPOT counted 0 for <= 1 token) / duration",
    "percentiles": "linear interpolation between closest ranks (numpy.percentile default)",
    "gpu_util": "NVML utilization.gpu: share of time any kernel ran, not how busy the GPU was; see MBU/MFU",
    "fragmentation": "(reserved - allocated) / reserved of the caching allocator, worst sample of the run",
    "mbu": "(weights bytes + KV bytes read per step) / mean TPOT / peak memory bandwidth of the GPUs",
    "mfu": "2 x active parameters x tokens processed per second / peak dense BF16 FLOPs of the GPUs",
}

CSV_FIELDS = ("request_id", "round", "success", "status", "error", "start_s", "input_tokens", "output_tokens",
              "output_tokens_source", "ttft_ms", "tpot_ms", "e2e_ms", "ttfrt_ms", "ttfat_ms")


def environment() -> dict[str, Any]:
    from r1deploy import __version__ as version

    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "r1deploy": version, "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def checks_json(checks: Sequence[Check]) -> list[dict[str, Any]]:
    return [{"metric": c.target.metric, "target": c.target.describe(), "op": c.target.op,
             "threshold": c.target.threshold, "value": c.value, "status": c.status, "note": c.note}
            for c in checks]


def build(config: dict[str, Any], summary: Summary, records: Sequence[RequestRecord], t0: float,
          profile: str, checks: Sequence[Check], telemetry: dict[str, Any],
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "config": config, "environment": environment(), "definitions": DEFINITIONS,
        "summary": summary.flat(),
        "slo": {"profile": profile, "checks": checks_json(checks), "passed": all(c.status == PASS for c in checks)},
        "telemetry": telemetry, **(extra or {}),
        "requests": [r.to_json(t0) for r in records],
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    """Atomic: a checkpoint interrupted mid-write never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable))
    tmp.replace(path)


def write_csv(report: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report["requests"])


def load(path: Path) -> dict[str, Any]:
    from r1deploy.errors import UsageError

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"report {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"report {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("summary"), dict):
        raise UsageError(f"{path} is not a benchmark report (no 'summary'): write one with --out DIR")
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_summary(report: dict[str, Any], checks: Sequence[Check], console: Console) -> None:
    s = report["summary"]
    head = Table(title="r1deploy bench", show_header=False, box=None)
    head.add_column(style="bold")
    head.add_column(justify="right")
    for label, key in (("Successful requests", "completed"), ("Failed requests", "failed"),
                       ("Duration (s)", "duration_s"), ("Total input tokens", "total_input_tokens"),
                       ("Total output tokens", "total_output_tokens"),
                       ("Request throughput (req/s)", "request_throughput"),
                       ("Request goodput (req/s)", "request_goodput"),
                       ("Input token throughput (tok/s)", "input_throughput"),
                       ("Output token throughput (tok/s)", "output_throughput"),
                       ("Total token throughput (tok/s)", "total_token_throughput"),
                       ("Peak output throughput (tok/s)", "max_output_tokens_per_s"),
                       ("Peak concurrent requests", "max_concurrent_requests")):
        head.add_row(label, _fmt(s.get(key)))
    for kind, count in (s.get("errors") or {}).items():
        head.add_row(f"  errors: {kind}", _fmt(count))
    console.print(head)

    lat = Table(title="latency (ms)")
    lat.add_column("metric")
    for stat in ("mean", "median", "p90", "p99"):
        lat.add_column(stat, justify="right")
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2el"),
                      ("first reasoning token", "ttfrt"), ("first answer token", "ttfat")):
        values = [s.get(f"{stat}_{key}_ms") for stat in ("mean", "median", "p90", "p99")]
        if any(v is not None for v in values):
            lat.add_row(name, *(_fmt(v) for v in values))
    console.print(lat)

    tel = report.get("telemetry") or {}
    if tel.get("gpu_reason"):
        console.print(f"[yellow]{tel['gpu_reason']}[/yellow]", soft_wrap=True)
    eff = report.get("efficiency") or {}
    if eff.get("mbu_pct") is not None or eff.get("mfu_pct") is not None:
        console.print(f"GPU utilisation (kernel time) {_fmt(tel.get('gpu_util_mean_pct'), 1)} %, "
                      f"MBU {_fmt(eff.get('mbu_pct'), 1)} %, MFU {_fmt(eff.get('mfu_pct'), 1)} %")
    planned = {k: v for k, v in (eff.get("planned") or {}).items() if v.get("planned") is not None}
    if planned:
        table = Table(title=f"planned ({eff.get('planned_for') or 'planner'}) vs measured (median)")
        for column in ("metric", "planned", "measured", "measured / planned"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for key, row in planned.items():
            table.add_row(key, _fmt(row["planned"]), _fmt(row["measured"]), _fmt(row["measured_over_planned"]))
        console.print(table)
    offload = report.get("expert_offload")
    if offload:
        table = Table(title=f"expert offload (store counters since the {offload.get('counted_from', 'start')})",
                      show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column(justify="right")
        moved = offload.get("bytes_to_device") or 0
        per_token = offload.get("bytes_to_device_per_output_token")
        for label, value in (("GPU slots / host slots", f"{offload.get('gpu_slots')} / {offload.get('host_slots')}"),
                             ("Expert hits", _fmt(offload.get("hits"))), ("Expert misses", _fmt(offload.get("misses"))),
                             ("Hit rate (%)", _fmt(100 * (offload.get("hit_rate") or 0.0), 1)),
                             ("Bytes moved to GPU (GB)", _fmt(moved / 1e9, 2)),
                             ("Bytes moved per output token (MB)",
                              _fmt(None if per_token is None else per_token / 1e6, 1)),
                             ("Stall time (s)", _fmt(offload.get("stall_s"), 3)),
                             ("Evictions", _fmt(offload.get("evictions"))),
                             ("Prefetches (used)",
                              f"{_fmt(offload.get('prefetches'))} ({_fmt(offload.get('prefetch_hits'))})"),
                             ("Disk reads", _fmt(offload.get("disk_reads"))),
                             ("Computed on the host", _fmt(offload.get("cpu_computes")))):
            table.add_row(label, value)
        console.print(table)
    if report.get("speculative"):
        print_spec_section(report["speculative"], console)
    for c in checks:
        style = "green" if c.status == PASS else "red" if c.status == "FAIL" else "yellow"
        console.print(f"[{style}]{c.line()}[/{style}]", highlight=False, soft_wrap=True)
