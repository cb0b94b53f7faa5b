"""Soak: keep a closed-loop load on for --duration (72h in the seed guide, minutes in CI), with clients
that abort or disconnect (--abort-rate, --disconnect-rate) and a mix of request shapes (--mix), and take
an idle checkpoint every --checkpoint-interval (checkpoints.py): the load pauses, in-flight requests
finish, the serving process is sampled, and checkpoint.json is rewritten, so a run that dies leaves
its data. The verdict flags 5xx responses, KV blocks not back at idle, and growth / drift between the
first and the last checkpoint (RSS, fds, threads, GPU memory, p99 TPOT).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1deploy.bench import report
from r1deploy.bench.arrivals import Rounds, Schedule
from r1deploy.bench.chaos import DropPolicy, Tally, check_mix, send_variant, send_with_drops
from r1deploy.bench.checkpoints import checkpoint, soak_checks
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.runner import warm_up
from r1deploy.bench.slo import Target
from r1deploy.bench.workload import RequestSpec
from r1deploy.errors import UsageError

if TYPE_CHECKING:
    from r1deploy.bench.benchmark import Setup

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
IDLE_WAIT_S = 10.0  # how long the target may take to free everything after the last request
DEFAULT_E2E_S = 1.0  # disconnect timing before any request has finished


def parse_duration(text: str, flag: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"{flag} {text!r}: expected a positive duration like 72h, 30m or 90s")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


class _Load:
    """Closed-loop workers that a checkpoint can pause: `gate` open = send, closed = finish and wait."""

    def __init__(self, target: Setup, specs: Iterator[RequestSpec], policy: DropPolicy, mix: float,
                 rng: random.Random) -> None:
        self.target, self.specs, self.rng = target, specs, rng
        self.policy, self.mix = policy, mix
        self.tally = Tally()
        self.records: list[RequestRecord] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.counter = itertools.count()

    def typical_e2e_s(self) -> float:
        recent = [r.e2e_s for r in self.records[-50:] if r.success and r.e2e_s is not None]
        return statistics.median(recent) if recent else DEFAULT_E2E_S

    async def worker(self, stop_at: float) -> None:
        while True:
            await self.gate.wait()
            if time.monotonic() >= stop_at:
                return
            self.in_flight += 1
            self.idle.clear()
            try:
                await self._one(next(self.specs))
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.idle.set()

    async def _one(self, spec: RequestSpec) -> None:
        if self.mix and self.rng.random() < self.mix:
            await send_variant(self.target.backend, spec, self.rng, self.tally)
            return
        record = await send_with_drops(self.target.backend, f"soak-{next(self.counter)}", spec, self.policy,
                                       self.rng, self.typical_e2e_s(), self.tally)
        if record is not None:
            self.records.append(record)

    async def pause(self) -> None:
        self.gate.clear()
        if self.in_flight:
            await self.idle.wait()


async def soak(args: argparse.Namespace, target: Setup, schedule: Schedule, targets: tuple[Target, ...]) -> int:
    from r1deploy.bench.benchmark import build_report, emit, finish, make_specs

    if not args.out:
        raise UsageError("--duration (soak) needs --out DIR: checkpoints are written there as the run goes")
    duration = parse_duration(args.duration, "--duration")
    every = parse_duration(args.checkpoint_interval, "--checkpoint-interval")
    check_mix(args.mix, target.backend)
    policy = DropPolicy(args.disconnect_rate, args.abort_rate)  # a bad rate fails before the warm-up
    concurrency = schedule.batch if isinstance(schedule, Rounds) else getattr(schedule, "concurrency", 1)
    rng = random.Random(args.seed)
    if args.warmup:
        await warm_up(target.backend, make_specs(args, target.maker, args.warmup * concurrency, rng), concurrency)

    def fresh_specs() -> Iterator[RequestSpec]:
        while True:  # new prompts each batch: a soak must not turn into a prefix-cache benchmark
            yield from make_specs(args, target.maker, concurrency, rng)

    load = _Load(target, fresh_specs(), policy, args.mix, rng)
    baseline = await _idle_sample(target, None)  # after warm-up: KV back at this level at every checkpoint
    points: list[dict[str, Any]] = []
    out = Path(args.out) / "checkpoint.json"
    t0 = time.monotonic()
    text = (f"soak {args.duration} at concurrency {concurrency}, disconnect {args.disconnect_rate:.0%}, "
            f"abort {args.abort_rate:.0%}, mix {args.mix:.0%}")
    counted = 0

    async def take_checkpoint(write: bool = True) -> None:
        nonlocal counted
        await load.pause()
        sample = await _idle_sample(target, baseline)
        points.append(checkpoint(time.monotonic() - t0, sample, load.records[counted:]))
        counted = len(load.records)
        if not write:
            return
        m = finish(target, list(load.records), t0, time.monotonic() - t0, targets)
        report.write_json(build_report(args, target, m, text + " (checkpoint)",
                                       {"soak": _soak_json(baseline, points, load, every)}), out)
        load.gate.set()

    async def checkpoints() -> None:
        while True:
            await asyncio.sleep(every)
            await take_checkpoint()

    stop_at = t0 + duration
    writer = asyncio.create_task(checkpoints())
    target.telemetry.start(t0)
    try:
        await asyncio.gather(*(load.worker(stop_at) for _ in range(concurrency)))
    finally:
        writer.cancel()
        target.telemetry.stop()
    elapsed = time.monotonic() - t0
    await take_checkpoint(write=False)  # the last one, at idle after the load: report.json has it
    m = finish(target, load.records, t0, elapsed, targets)
    m = replace(m, checks=(*m.checks, *soak_checks(baseline, points, load.tally.server_errors, concurrency)))
    soak_json = dict(_soak_json(baseline, points, load, every), duration_s=elapsed)
    return emit(args, build_report(args, target, m, text, {"soak": soak_json}), m.checks)


def _soak_json(baseline: dict[str, Any], points: list[dict[str, Any]], load: _Load, every: float) -> dict[str, Any]:
    return {"checkpoint_interval_s": every, "baseline": checkpoint(0.0, baseline, []), "checkpoints": points,
            **load.tally.to_json()}


async def _idle_sample(target: Setup, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Wait (up to IDLE_WAIT_S) for KV blocks to return to the baseline, then sample."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while True:
        sample = target.telemetry.sample()
        kv, base = sample.get("kv_blocks_used"), (baseline or {}).get("kv_blocks_used")
        if kv is None or base is None or kv <= base or time.monotonic() > deadline:
            return sample
        await asyncio.sleep(0.1)
