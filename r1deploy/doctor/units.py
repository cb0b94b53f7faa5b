"""How doctor writes sizes, speeds and compute capabilities."""

from __future__ import annotations

from r1deploy.doctor.gpu_probe import GpuInfo

GIB = 1 << 30


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def mbs(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:,.0f} MB/s"


def cc(gpu: GpuInfo) -> str:
    return ".".join(map(str, gpu.compute_capability))
