"""Measure all-reduce bus bandwidth between the GPUs of this host (NCCL), as nccl-tests reports it.

One process per GPU joins a torch.distributed group on 127.0.0.1 (gloo on the CPU, for tests), all-reduces
a buffer of each size after warm-up, and rank 0 reports the median time (CUDA events on GPUs: the
host's launch and synchronisation latency is not the collective's). Bus bandwidth = 2(n-1)/n x bytes /
time: the bytes each GPU's link carries in a ring all-reduce, comparable with a link's peak.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AllReduceResult:
    world_size: int
    backend: str
    size_bytes: int
    median_s: float

    @property
    def bus_bytes_per_s(self) -> float:
        n = self.world_size
        return 2 * (n - 1) / n * self.size_bytes / self.median_s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed_ms(device, op, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls of op()."""
    import torch

    times = []
    for _ in range(iters):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            op()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            op()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def _worker(rank: int, world_size: int, backend: str, port: int, sizes: list[int], iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        medians = []
        for size in sizes:
            buffer = torch.randn(max(size // 4, 1), device=device)  # never zeros: see the device notes
            _timed_ms(device, lambda buffer=buffer: dist.all_reduce(buffer), 3)  # warm-up: connections, NCCL channels
            dist.barrier()  # start together, so the first timed call does not include a peer's lateness
            medians.append(statistics.median(_timed_ms(device, lambda buffer=buffer: dist.all_reduce(buffer), iters)) / 1e3)
        if rank == 0:
            Path(out).write_text(json.dumps(medians))
    finally:
        dist.destroy_process_group()


def measure_allreduce_sizes(world_size: int, sizes: list[int], backend: str = "nccl",
                            iters: int = 20) -> list[AllReduceResult]:
    """Median all-reduce time of an fp32 buffer of each size (bytes) over world_size local processes."""
    import torch.multiprocessing as mp

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast: shared hosts must not use it
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "medians")
        mp.spawn(_worker, args=(world_size, backend, _free_port(), sizes, iters, out), nprocs=world_size)
        medians = json.loads(Path(out).read_text())
    return [AllReduceResult(world_size, backend, size, median) for size, median in zip(sizes, medians, strict=True)]


def measure_allreduce(world_size: int, backend: str = "nccl", size_bytes: int = 256 << 20,
                      iters: int = 10) -> AllReduceResult:
    """Median all-reduce time of a size_bytes fp32 buffer over world_size local processes."""
    return measure_allreduce_sizes(world_size, [size_bytes], backend, iters)[0]
