"""Soak: keep a closed-loop load on for --duration (72h in the seed guide, seconds in tests), write
a checkpoint report every --checkpoint-interval so a run that dies leaves its data, then let the
target go idle and check for leaks against the idle baseline taken before the load:
- RSS of this process (the engine when in-process) grew <= 10 %;
- GPU memory in use (NVML) grew <= 5 %;
- KV blocks in use are back to the baseline (engine, or the server's /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1deploy.bench import report
from r1deploy.bench.arrivals import Concurrency, Rounds, Schedule
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.runner import warm_up
from r1deploy.bench.slo import Target, verdict
from r1deploy.bench.workload import RequestSpec
from r1deploy.errors import UsageError

if TYPE_CHECKING:
    from r1deploy.bench.benchmark import Setup  # benchmark imports this module lazily: no cycle at run time

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
IDLE_WAIT_S = 10.0  # how long the target may take to free everything after the last request
LEAK_TARGETS = (
    Target("rss_growth_pct", "RSS growth after idle", "<=", 10, " %"),
    Target("gpu_mem_growth_pct", "GPU memory growth after idle", "<=", 5, " %"),
    Target("kv_blocks_over_baseline", "KV blocks in use over idle baseline", "<=", 0, ""),
)


def parse_duration(text: str, flag: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"{flag} {text!r}: expected a positive duration like 72h, 30m or 90s")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _growth(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before <= 0:
        return None
    return 100.0 * (after - before) / before


def _gpu_mem(sample: dict[str, Any]) -> float | None:
    used = [g["mem_used_bytes"] for g in sample["gpus"] if g.get("mem_used_bytes") is not None]
    return sum(used) if used else None


def leak_values(baseline: dict[str, Any], idle: dict[str, Any]) -> dict[str, float | None]:
    kv_before, kv_after = baseline.get("kv_blocks_used"), idle.get("kv_blocks_used")
    return {"rss_growth_pct": _growth(baseline["rss_bytes"], idle["rss_bytes"]),
            "gpu_mem_growth_pct": _growth(_gpu_mem(baseline), _gpu_mem(idle)),
            "kv_blocks_over_baseline": None if kv_before is None or kv_after is None else kv_after - kv_before}


async def soak(args: argparse.Namespace, target: Setup, schedule: Schedule, targets: tuple[Target, ...]) -> int:
    from r1deploy.bench.benchmark import build_report, emit, finish, make_specs

    if not args.out:
        raise UsageError("--duration (soak) needs --out DIR: checkpoints are written there as the run goes")
    duration = parse_duration(args.duration, "--duration")
    every = parse_duration(args.checkpoint_interval, "--checkpoint-interval")
    concurrency = schedule.batch if isinstance(schedule, Rounds) else getattr(schedule, "concurrency", 1)
    rng = random.Random(args.seed)
    if args.warmup:
        await warm_up(target.backend, make_specs(args, target.maker, args.warmup * concurrency, rng), concurrency)

    def fresh_specs() -> Iterator[RequestSpec]:
        while True:  # new prompts each batch: a soak must not turn into a prefix-cache benchmark
            yield from make_specs(args, target.maker, concurrency, rng)

    baseline = target.telemetry.sample()
    records: list[RequestRecord] = []
    out = Path(args.out) / "checkpoint.json"
    t0 = time.monotonic()
    text = f"soak {args.duration} at concurrency {concurrency}"

    async def checkpoints() -> None:
        while True:
            await asyncio.sleep(every)
            m = finish(target, list(records), t0, time.monotonic() - t0, targets)
            report.write_json(build_report(args, target, m, text + " (checkpoint)"), out)

    from r1deploy.bench.runner import run as run_schedule

    writer = asyncio.create_task(checkpoints())
    target.telemetry.start(t0)
    try:
        await run_schedule(target.backend, fresh_specs(), Concurrency(concurrency, 1 << 62), records,
                           stop_at=t0 + duration)
    finally:
        writer.cancel()
        target.telemetry.stop()
    elapsed = time.monotonic() - t0
    idle = await _idle_sample(target, baseline)
    leaks = leak_values(baseline, idle)
    m = finish(target, records, t0, elapsed, targets)
    notes = {"kv_blocks_over_baseline": "no KV block count from the target",
             "gpu_mem_growth_pct": "no GPU: memory not measured", "rss_growth_pct": "no RSS"}
    m = replace(m, checks=(*m.checks, *verdict(LEAK_TARGETS, leaks, notes)))
    soak_json = {"duration_s": elapsed, "checkpoint_interval_s": every, "baseline": baseline, "idle": idle,
                 "leaks": leaks}
    return emit(args, build_report(args, target, m, text, {"soak": soak_json}), m.checks)


async def _idle_sample(target, baseline: dict[str, Any]) -> dict[str, Any]:
    """Wait (up to IDLE_WAIT_S) for KV blocks to return to the baseline, then sample."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while True:
        sample = target.telemetry.sample()
        kv, base = sample.get("kv_blocks_used"), baseline.get("kv_blocks_used")
        if kv is None or base is None or kv <= base or time.monotonic() > deadline:
            return sample
        await asyncio.sleep(0.1)
