"""Sweep: run the workload at each given rate or concurrency and report the highest load whose
latency targets (the P99 ones) all pass. Linear over the loads given, so the curve is explicit and
repeatable; the throughput-latency curve lands in the report's "sweep" section and HTML plot.
"""

from __future__ import annotations

import argparse
import random
import sys

from r1deploy.bench.arrivals import Concurrency, Rate, Schedule
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.runner import warm_up
from r1deploy.bench.slo import Target, all_pass
from r1deploy.errors import UsageError


def parse_loads(text: str, integer: bool) -> list[float]:
    try:
        loads = [int(v) if integer else float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"sweep values {text!r}: expected a comma-separated list of numbers") from None
    if not loads or any(v <= 0 for v in loads):
        raise UsageError(f"sweep values {text!r}: give one or more positive numbers")
    return sorted(set(loads))


def schedule_at(args: argparse.Namespace, load: float) -> Schedule:
    if args.sweep_concurrency:
        return Concurrency(int(load), args.num_requests)
    return Rate(load, args.num_requests, args.burstiness, args.max_concurrency)


async def sweep(args: argparse.Namespace, target, targets: tuple[Target, ...]) -> int:
    from r1deploy.bench.benchmark import build_report, emit, make_specs, measure

    kind = "concurrency" if args.sweep_concurrency else "rate"
    loads = parse_loads(args.sweep_concurrency or args.sweep_rates, integer=kind == "concurrency")
    if args.warmup:
        await warm_up(target.backend, make_specs(args, target.maker, args.warmup, random.Random(args.seed + 1)),
                      args.warmup)
    points, results = [], []
    for load in loads:
        schedule = schedule_at(args, load)
        specs = make_specs(args, target.maker, schedule.total, random.Random(args.seed))
        records: list[RequestRecord] = []
        m = await measure(target, specs, schedule, args, targets, records)
        latency_ok = all_pass([c for c in m.checks if c.target.metric.startswith("p99_")])
        points.append({"load": load, "latency_passed": latency_ok, "summary": m.summary.flat(),
                       **({"expert_offload": m.expert_offload} if m.expert_offload is not None else {})})
        results.append(m)
        print(f"sweep {kind} {load:g}: {m.summary.output_throughput:.1f} output tok/s, P99 TPOT "
              f"{m.summary.latency('tpot', 'p99') or float('nan'):.1f} ms, P99 TTFT "
              f"{m.summary.latency('ttft', 'p99') or float('nan'):.1f} ms: "
              f"{'meets' if latency_ok else 'misses'} the latency targets", file=sys.stderr)
    passing = [i for i, p in enumerate(points) if p["latency_passed"]]
    chosen = passing[-1] if passing else 0
    best = points[chosen]["load"] if passing else None
    print(f"sweep: highest {kind} meeting the latency targets: {best if best is not None else 'none'}")
    m = results[chosen]
    return emit(args, build_report(args, target, m, f"sweep over {kind} {loads}; reported point {loads[chosen]:g}",
                                   {"sweep": {"kind": kind, "points": points, "best_load": best}}), m.checks)
