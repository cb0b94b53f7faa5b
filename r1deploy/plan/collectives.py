"""Measure all-reduce bus bandwidth between the GPUs of this host (NCCL), as nccl-tests reports it.

One process per GPU joins a torch.distributed group on 127.0.0.1 (gloo on the CPU, for tests), all-reduces
a buffer after warm-up, and rank 0 reports the median time. Bus bandwidth = 2(n-1)/n x bytes / time: the
bytes each GPU's link carries in a ring all-reduce, so the number is comparable with a link's peak.
"""

from __future__ import annotations

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


def _worker(rank: int, world_size: int, backend: str, port: int, size_bytes: int, iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        buffer = torch.randn(size_bytes // 4, device=device)  # never zeros: see the device notes
        times = []
        for i in range(iters + 3):  # the first 3 warm up (connection setup, NCCL channels)
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            dist.all_reduce(buffer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(str(statistics.median(times)))
    finally:
        dist.destroy_process_group()


def measure_allreduce(world_size: int, backend: str = "nccl", size_bytes: int = 256 << 20,
                      iters: int = 10) -> AllReduceResult:
    """Median all-reduce time of a size_bytes fp32 buffer over world_size local processes."""
    import torch.multiprocessing as mp

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast: shared hosts must not use it
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "median_s")
        mp.spawn(_worker, args=(world_size, backend, _free_port(), size_bytes, iters, out), nprocs=world_size)
        median = float(Path(out).read_text())
    return AllReduceResult(world_size, backend, size_bytes, median)
