"""GPU and memory telemetry sampled on a thread while the run lasts.

- NVML (nvidia-ml-py): utilization.gpu, SM clock, memory used, power, per GPU. NVML's
  utilization.gpu is the share of the sample period in which *any* kernel ran: one tiny kernel on
  one SM reads 100 %. It says the GPU was never idle, not that it was busy; MBU / MFU (efficiency.py)
  say how much of its bandwidth and compute the model used.
- Allocator: fragmentation = (reserved - allocated) / reserved, from torch.cuda.memory_stats() when
  the engine runs in this process, or from the server's Prometheus /metrics (any *reserved_bytes and
  *allocated_bytes series, summed over labels); OOM counters likewise.
- KV blocks in use, and the serving process's RSS, open fds and threads for the soak leak checks: this
  process in-process, the server's `process_*` series with --url (never the load generator's own).
Missing sources are recorded with the reason (e.g. "no GPU: utilisation not measured"), never faked.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

Sample = dict[str, Any]


@dataclass(frozen=True)
class MemoryStats:
    reserved_bytes: float | None = None
    allocated_bytes: float | None = None
    num_ooms: float | None = None
    kv_blocks_used: float | None = None
    rss_bytes: float | None = None  # the scraped server process (process_resident_memory_bytes)
    open_fds: float | None = None
    threads: float | None = None


class NvmlSource:
    """Per-GPU readings; `reason` says why there are none."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.names: list[str] = []
        self.reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # noqa: BLE001 - no driver, no library, no GPU: all mean "not measured"
            self.reason = f"no GPU: utilisation not measured (NVML unavailable: {type(exc).__name__})"
            return
        if count == 0:
            self.reason = "no GPU: utilisation not measured"
            return
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.names = [_str(pynvml.nvmlDeviceGetName(h)) for h in self.handles]

    def read(self) -> list[dict[str, float | None]]:
        nv = getattr(self, "nvml", None)
        out = []
        for h in self.handles:
            util = _try(lambda h=h: nv.nvmlDeviceGetUtilizationRates(h))
            mem = _try(lambda h=h: nv.nvmlDeviceGetMemoryInfo(h))
            power = _try(lambda h=h: nv.nvmlDeviceGetPowerUsage(h))
            out.append({
                "util_pct": None if util is None else float(util.gpu),
                "mem_util_pct": None if util is None else float(util.memory),
                "sm_clock_mhz": _try(lambda h=h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))),
                "mem_used_bytes": None if mem is None else float(mem.used),
                "power_w": None if power is None else power / 1000.0,
            })
        return out


def torch_memory_stats() -> MemoryStats | None:
    """This process's CUDA caching allocator, summed over visible GPUs; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    reserved = allocated = ooms = 0.0
    for device in range(torch.cuda.device_count()):
        stats = torch.cuda.memory_stats(device)
        reserved += stats.get("reserved_bytes.all.current", 0)
        allocated += stats.get("allocated_bytes.all.current", 0)
        ooms += stats.get("num_ooms", 0)
    return MemoryStats(reserved, allocated, ooms)


def parse_prometheus(text: str) -> MemoryStats:
    """Allocator and KV series from a /metrics page, whatever the server's prefix (r1deploy, vLLM...)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([^\s{]+)(\{[^}]*\})?\s+(\S+)", line)
        if not match:
            continue
        name = match.group(1)
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        for key, pattern in _PROM_SERIES.items():
            if re.search(pattern, name):
                sums[key] = sums.get(key, 0.0) + value
    return MemoryStats(sums.get("reserved"), sums.get("allocated"), sums.get("ooms"), sums.get("kv"),
                       sums.get("rss"), sums.get("fds"), sums.get("threads"))


_PROM_SERIES = {
    "reserved": r"reserved_bytes$",
    "allocated": r"allocated_bytes$",
    "ooms": r"oom(s)?(_total)?$",
    "kv": r"kv\w*blocks\w*used|kv\w*used\w*blocks",
    "rss": r"^process_resident_memory_bytes$",
    "fds": r"^process_open_fds$",
    "threads": r"^process_threads$",
}


def scrape_metrics(base_url: str, api_key: str | None) -> Callable[[], MemoryStats | None]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def read() -> MemoryStats | None:
        try:
            response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=5.0)
        except httpx.HTTPError:
            return None
        return parse_prometheus(response.text) if response.status_code == 200 else None

    return read


@dataclass
class Telemetry:
    """Samples every `interval_s` on a daemon thread between start() and stop()."""

    interval_s: float = 0.5
    memory: Callable[[], MemoryStats | None] | None = None  # allocator / KV source
    kv_blocks: Callable[[], float | None] | None = None  # in-process KV blocks in use
    samples: list[Sample] = field(default_factory=list)
    memory_reason: str = ""
    remote_process: bool = False  # --url: RSS, fds and threads come only from the server's /metrics

    def __post_init__(self) -> None:
        self.nvml = NvmlSource()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self.t0 = time.monotonic()

    def sample(self) -> Sample:
        mem = self.memory() if self.memory is not None else None
        kv = self.kv_blocks() if self.kv_blocks is not None else (mem.kv_blocks_used if mem else None)
        if self.remote_process:
            rss, fds, threads = (mem.rss_bytes, mem.open_fds, mem.threads) if mem else (None, None, None)
        else:
            with self._process.oneshot():
                rss = float(self._process.memory_info().rss)
                fds, threads = float(self._process.num_fds()), float(self._process.num_threads())
        return {"t": time.monotonic(), "gpus": self.nvml.read(), "rss_bytes": rss, "open_fds": fds,
                "threads": threads, "reserved_bytes": mem.reserved_bytes if mem else None,
                "allocated_bytes": mem.allocated_bytes if mem else None,
                "num_ooms": mem.num_ooms if mem else None, "kv_blocks_used": kv}

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="r1deploy-bench-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.samples.append(self.sample())  # the final state always lands, even on a short run

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, Any]:
        return summarize_samples(self.samples, self.nvml.names, self.nvml.reason, self.memory_reason,
                                 self.interval_s)


def summarize_samples(samples: list[Sample], gpu_names: list[str], gpu_reason: str, memory_reason: str,
                      interval_s: float) -> dict[str, Any]:
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def gpu_values(key: str) -> list[float]:
        return [g[key] for s in samples for g in s["gpus"] if g.get(key) is not None]

    frags = [fragmentation_pct(s["reserved_bytes"], s["allocated_bytes"]) for s in samples]
    frags = [f for f in frags if f is not None]
    ooms = [s["num_ooms"] for s in samples if s.get("num_ooms") is not None]
    return {
        "interval_s": interval_s, "samples": len(samples), "gpus": gpu_names,
        "gpu_reason": gpu_reason or None,
        "gpu_util_mean_pct": mean(gpu_values("util_pct")),
        "gpu_util_min_pct": min(gpu_values("util_pct"), default=None),
        "sm_clock_mean_mhz": mean(gpu_values("sm_clock_mhz")),
        "gpu_mem_used_max_bytes": max(gpu_values("mem_used_bytes"), default=None),
        "power_mean_w": mean(gpu_values("power_w")),
        "fragmentation_max_pct": max(frags, default=None),
        "fragmentation_final_pct": frags[-1] if frags else None,
        "memory_reason": (memory_reason or None) if not frags else None,
        # Allocator OOMs counted during the run (the counter is cumulative since process start).
        "allocator_ooms": (ooms[-1] - ooms[0]) if ooms else None,
        "rss_max_bytes": max((s["rss_bytes"] for s in samples if s["rss_bytes"] is not None), default=None),
    }


def fragmentation_pct(reserved: float | None, allocated: float | None) -> float | None:
    """(reserved - allocated) / reserved in %: memory the allocator holds but no tensor uses."""
    if reserved is None or allocated is None or reserved <= 0:
        return None
    return 100.0 * max(reserved - allocated, 0.0) / reserved


def _try(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception:  # noqa: BLE001 - a field this GPU does not support stays None
        return None


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
