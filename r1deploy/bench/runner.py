"""Drive a backend with a workload on a schedule; collect one RequestRecord per request.

Records are appended to a caller-owned list as requests finish, so an interrupted run (Ctrl-C, a
dying soak) still leaves every completed request's data behind.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from r1deploy.bench.arrivals import Concurrency, Rate, Rounds, Schedule, intervals
from r1deploy.bench.client import Backend
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.workload import RequestSpec

OnDone = Callable[[RequestRecord], None]


async def warm_up(backend: Backend, specs: Sequence[RequestSpec], batch: int) -> None:
    """Send warm-up requests in batches; their records are dropped (compilation, caches, CUDA graphs)."""
    for start in range(0, len(specs), batch):
        await asyncio.gather(*(backend.send(f"warmup-{start + i}", spec)
                               for i, spec in enumerate(specs[start:start + batch])))


async def run(backend: Backend, specs: Iterable[RequestSpec], schedule: Schedule, out: list[RequestRecord],
              on_done: OnDone | None = None, seed: int = 0, stop_at: float | None = None) -> float:
    """Run the schedule, appending records to `out`; returns the run's start time (monotonic)."""
    t0 = time.monotonic()

    def done(record: RequestRecord) -> None:
        out.append(record)
        if on_done is not None:
            on_done(record)

    if isinstance(schedule, Rounds):
        await _rounds(backend, list(specs), schedule, done)
    elif isinstance(schedule, Concurrency):
        await _closed_loop(backend, iter(specs), schedule.concurrency, done, stop_at)
    else:
        await _open_loop(backend, list(specs), schedule, done, seed)
    return t0


async def _send(backend: Backend, index: int, spec: RequestSpec, done: OnDone, round_index: int = -1) -> None:
    done(await backend.send(f"bench-{index}", spec, round_index))


async def _rounds(backend: Backend, specs: list[RequestSpec], schedule: Rounds, done: OnDone) -> None:
    # The seed's fixed-shape test: a batch at once, then wait for all of it (a barrier per round).
    for r in range(schedule.repeat):
        batch = specs[r * schedule.batch:(r + 1) * schedule.batch]
        await asyncio.gather(*(_send(backend, r * schedule.batch + i, s, done, r) for i, s in enumerate(batch)))


async def _closed_loop(backend: Backend, specs: Iterator[RequestSpec], concurrency: int, done: OnDone,
                       stop_at: float | None) -> None:
    counter = itertools.count()

    async def worker() -> None:
        # Each worker takes the next spec as soon as its previous request finished: exactly
        # `concurrency` in flight, and no client-side queueing inside the timed interval.
        while stop_at is None or time.monotonic() < stop_at:
            spec = next(specs, None)
            if spec is None:
                return
            await _send(backend, next(counter), spec, done)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(backend: Backend, specs: list[RequestSpec], schedule: Rate, done: OnDone, seed: int) -> None:
    gaps = intervals(schedule.rate, schedule.burstiness, len(specs), seed)
    limit = asyncio.Semaphore(schedule.max_concurrency) if schedule.max_concurrency else None

    async def one(index: int, spec: RequestSpec) -> None:
        if limit is None:
            await _send(backend, index, spec, done)
            return
        async with limit:  # the wait here is client queueing: send time (and so TTFT) starts after it
            await _send(backend, index, spec, done)

    tasks = []
    due = time.monotonic()
    for index, (spec, gap) in enumerate(zip(specs, gaps)):
        if index:  # the first request goes at once, the rest after their drawn gaps
            due += gap
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(one(index, spec)))
    await asyncio.gather(*tasks)
