"""`r1deploy bench` / `deepseek-benchmark`: one run, a soak (--duration) or a sweep, over the library in
benchmark.py (targets, measurement, reports), which soak.py and sweep.py share."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from r1deploy.bench.arrivals import Rounds, Schedule
from r1deploy.bench.benchmark import (
    DEFAULT_OUTPUT_LEN,
    Setup,
    _http_target,
    _progress,
    _validate,
    build_report,
    emit,
    engine_target,
    finish,
    make_specs,
    measure,
    schedule_from,
)
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.runner import warm_up
from r1deploy.bench.slo import parse_slo, targets_for
from r1deploy.bench.soak import soak
from r1deploy.bench.sweep import sweep


def run(args: argparse.Namespace) -> int:
    _validate(args)
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    targets = targets_for(args.slo_profile, parse_slo(args.slo))
    schedule = schedule_from(args)
    output_len = args.output_len or (1024 if args.workload == "reasoning" else DEFAULT_OUTPUT_LEN)
    context_len = (args.prefix_len if args.workload == "prefix" else 0) + args.input_len + output_len
    max_seqs = max(args.batch or 0, args.concurrency or 0, args.max_concurrency or 0, 256)
    target = await _http_target(args) if args.url else engine_target(args, context_len, max_seqs)
    try:
        if args.duration:
            return await soak(args, target, schedule, targets)
        if args.sweep_rates or args.sweep_concurrency:
            return await sweep(args, target, targets)
        return await _single(args, target, schedule, targets)
    finally:
        await target.backend.close()


async def _single(args: argparse.Namespace, target: Setup, schedule: Schedule, targets: tuple) -> int:
    rng = random.Random(args.seed)
    batch = schedule.batch if isinstance(schedule, Rounds) else 1
    warm = args.warmup * batch
    specs = make_specs(args, target.maker, warm + schedule.total, rng)
    print(f"bench: {target.description}: {schedule.describe()}", file=sys.stderr)
    if warm:
        await warm_up(target.backend, specs[:warm], batch)
    records: list[RequestRecord] = []
    with _progress(schedule.total, not args.no_progress) as progress:
        task = progress.add_task("run", total=schedule.total, info="")

        def on_done(record: RequestRecord) -> None:
            failed = sum(not r.success for r in records)
            progress.update(task, advance=1, info=f"{failed} failed" if failed else "")

        t_start = time.monotonic()
        try:
            m = await measure(target, specs[warm:], schedule, args, targets, records, on_done=on_done)
        except (KeyboardInterrupt, asyncio.CancelledError):
            # Keep what finished: the report of an interrupted run is still a report.
            m = finish(target, records, t_start, time.monotonic() - t_start, targets)
            emit(args, build_report(args, target, m, schedule.describe() + " (interrupted)"), m.checks)
            return 130
    return emit(args, build_report(args, target, m, schedule.describe()), m.checks)
