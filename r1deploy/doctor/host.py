"""What this host offers a deployment: CPU, memory, NUMA, cgroup limits, the model disk and GPUs.

Pure data collection for `r1deploy doctor`: every function returns frozen dataclasses and judges
nothing; the checks live in checks.py. Linux sources (/proc, /sys) are read directly because they
are exact and cheap; anything missing (another OS, a locked-down container) becomes None.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from r1deploy.doctor.gpu_probe import GpuReport, probe_gpus

MIB = 1 << 20
# A cgroup v1 "no limit" is PAGE_COUNTER_MAX rounded to a page, just under 2**63;
# anything this big is unlimited.
_UNLIMITED = 1 << 62
_READ_BLOCK = 16 * MIB
_FILL_BLOCK = 4 * MIB


@dataclass(frozen=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cores: int
    # CPUs this process may run on (affinity / cpuset): a container sees all host CPUs but may use fewer.
    usable_cpus: int
    mhz_current: float | None
    mhz_max: float | None
    l3_bytes: int | None  # all L3 instances together (one per socket or per CCD)


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpulist: str  # kernel format, e.g. "0-31,64-95": what numactl --physcpubind accepts
    cpu_count: int
    memory_bytes: int | None


@dataclass(frozen=True)
class CgroupLimits:
    version: int | None  # 1, 2, or None when no cgroup filesystem is mounted
    cpu_quota: float | None  # CPUs' worth of time per period; None = unlimited
    memory_limit_bytes: int | None  # None = unlimited


@dataclass(frozen=True)
class DiskInfo:
    path: str
    mount_point: str
    device: str
    fstype: str
    total_bytes: int
    free_bytes: int
    read_bytes_per_s: float | None  # single-stream sequential read; None when not measured
    read_note: str  # how it was measured, or why not


@dataclass(frozen=True)
class HostReport:
    hostname: str
    platform: str
    cpu: CpuInfo
    memory: MemoryInfo
    numa_nodes: tuple[NumaNode, ...]
    cgroup: CgroupLimits
    disk: DiskInfo
    load_1m: float
    gpu: GpuReport


def collect_host(path: Path, read_test_mib: int) -> HostReport:
    """Everything doctor reports; `path` is the model/cache directory whose disk is measured."""
    return HostReport(
        hostname=platform.node(),
        platform=platform.platform(),
        cpu=cpu_info(),
        memory=memory_info(),
        numa_nodes=numa_nodes(),
        cgroup=cgroup_limits(),
        disk=disk_info(path, read_test_mib),
        load_1m=psutil.getloadavg()[0],
        gpu=probe_gpus(),
    )


# --- CPU -------------------------------------------------------------------------------------------


def cpu_info() -> CpuInfo:
    logical = psutil.cpu_count(logical=True) or 1
    freq = psutil.cpu_freq()
    return CpuInfo(
        model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False) or logical,
        logical_cores=logical,
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical,
        mhz_current=round(freq.current, 1) if freq and freq.current else None,
        # VMs often report max 0: the hypervisor hides the frequency range.
        mhz_max=round(freq.max, 1) if freq and freq.max else None,
        l3_bytes=_l3_from_sysfs(Path("/sys/devices/system/cpu")) or _l3_from_lscpu(),
    )


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if match:
        return match.group(1).strip()
    # Arm servers (e.g. Grace) have no "model name" in /proc/cpuinfo; lscpu maps the part number to a name.
    return _lscpu().get("Model name") or platform.processor() or "unknown"


def _l3_from_sysfs(cpu_root: Path) -> int | None:
    """Sum of distinct L3 instances: CPUs sharing one L3 list the same shared_cpu_list."""
    instances: dict[str, int] = {}
    for index in cpu_root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            instances[(index / "shared_cpu_list").read_text().strip()] = parse_size(
                (index / "size").read_text()
            )
        except (OSError, ValueError):
            continue
    return sum(instances.values()) or None


def _l3_from_lscpu() -> int | None:
    # New lscpu prints the total ("32 MiB (1 instance)"), old lscpu one instance ("32768K");
    # both beat nothing.
    value = _lscpu().get("L3 cache")
    if not value:
        return None
    try:
        return parse_size(value.split("(")[0])
    except ValueError:
        return None


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def parse_size(text: str) -> int:
    """'32768K', '32 MiB', '1.5 GiB' -> bytes. sysfs and lscpu use binary units whatever the suffix says."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " KMGT".index(unit.upper() or " "))


# --- memory and NUMA -------------------------------------------------------------------------------


def memory_info() -> MemoryInfo:
    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=vm.total, available_bytes=vm.available)


def numa_nodes(node_root: Path = Path("/sys/devices/system/node")) -> tuple[NumaNode, ...]:
    nodes = []
    for node_dir in sorted(node_root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpulist = (node_dir / "cpulist").read_text().strip()
        except OSError:
            continue
        nodes.append(
            NumaNode(
                id=int(node_dir.name[4:]),
                cpulist=cpulist,
                cpu_count=count_cpulist(cpulist),
                memory_bytes=_node_memory(node_dir),
            )
        )
    return tuple(nodes)


def parse_cpulist(cpulist: str) -> frozenset[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11} (the kernel's list format)."""
    cpus: set[int] = set()
    for part in filter(None, cpulist.strip().split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def count_cpulist(cpulist: str) -> int:
    """'0-3,8,10-11' -> 7."""
    return len(parse_cpulist(cpulist))


def _node_memory(node_dir: Path) -> int | None:
    try:
        match = re.search(r"MemTotal:\s*(\d+)\s*kB", (node_dir / "meminfo").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


# --- cgroups ---------------------------------------------------------------------------------------


def cgroup_limits(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> CgroupLimits:
    """The tightest CPU and memory limit on this process's cgroup path (a parent's limit applies to children).

    The path in /proc/self/cgroup may be relative to the host root while /sys/fs/cgroup shows only the
    container's subtree (or the reverse), so every ancestor that exists under `root` is read.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return CgroupLimits(version=None, cpu_quota=None, memory_limit_bytes=None)
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    if (root / "cgroup.controllers").is_file() and "" in paths:
        dirs = _ancestors(root, paths[""])
        return CgroupLimits(
            version=2, cpu_quota=_min(map(_v2_cpu, dirs)), memory_limit_bytes=_min(map(_v2_memory, dirs))
        )
    if "cpu" in paths or "memory" in paths:
        cpu_dirs = _ancestors(_v1_mount(root, "cpu"), paths.get("cpu", "/"))
        memory_dirs = _ancestors(_v1_mount(root, "memory"), paths.get("memory", "/"))
        return CgroupLimits(
            version=1,
            cpu_quota=_min(map(_v1_cpu, cpu_dirs)),
            memory_limit_bytes=_min(map(_v1_memory, memory_dirs)),
        )
    return CgroupLimits(version=None, cpu_quota=None, memory_limit_bytes=None)


def _ancestors(mount: Path | None, cgroup_path: str) -> list[Path]:
    if mount is None:
        return []
    parts = [p for p in cgroup_path.split("/") if p]
    candidates = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in candidates if d.is_dir()]


def _v1_mount(root: Path, controller: str) -> Path | None:
    # v1 mounts controllers alone ("memory") or co-mounted ("cpu,cpuacct").
    for mount in sorted(root.glob("*")):
        if controller in mount.name.split(","):
            return mount
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_cpu(d: Path) -> float | None:
    quota, _, period = (_read(d / "cpu.max") or "max").partition(" ")
    return None if quota == "max" else int(quota) / int(period or 100000)


def _v2_memory(d: Path) -> int | None:
    value = _read(d / "memory.max") or "max"
    return None if value == "max" else int(value)


def _v1_cpu(d: Path) -> float | None:
    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) < 0:
        return None
    return int(quota) / int(period)


def _v1_memory(d: Path) -> int | None:
    value = _read(d / "memory.limit_in_bytes")
    return None if value is None or int(value) >= _UNLIMITED else int(value)


def _min(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


# --- disk ------------------------------------------------------------------------------------------


def disk_info(path: Path, read_test_mib: int) -> DiskInfo:
    path = path.resolve()
    usage = shutil.disk_usage(path)
    mount_point, device, fstype = _mount_of(path)
    speed, note = measure_sequential_read(path, read_test_mib)
    return DiskInfo(
        path=str(path),
        mount_point=mount_point,
        device=device,
        fstype=fstype,
        total_bytes=usage.total,
        free_bytes=usage.free,
        read_bytes_per_s=speed,
        read_note=note,
    )


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, device, fstype) of the partition whose mount point is the longest prefix of `path`."""
    best = ("?", "?", "?")
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if (path == mount or mount in path.parents) and (
            best[0] == "?" or len(part.mountpoint) > len(best[0])
        ):
            best = (part.mountpoint, part.device, part.fstype)
    return best


def measure_sequential_read(directory: Path, mib: int) -> tuple[float | None, str]:
    """Write `mib` MiB to a temp file in `directory`, drop it from the page cache, time reading it back.

    Returns (bytes per second or None, a note saying how it was measured or why it was not).
    """
    if mib <= 0:
        return None, "skipped (--read-test-mib 0)"
    size = mib * MIB
    if shutil.disk_usage(directory).free < 2 * size:
        return None, f"skipped: less than {2 * mib} MiB free in {directory}"
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".r1deploy-readtest-")
        try:
            _fill(fd, size)
            cache_dropped = _drop_page_cache(fd)
            seconds = _time_read(fd, size)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return None, f"not measured: {exc}"
    note = (
        f"{mib} MiB, page cache dropped"
        if cache_dropped
        else f"{mib} MiB, page cache not bypassed: optimistic"
    )
    return size / seconds, note


def _fill(fd: int, size: int) -> None:
    # Random bytes, so a compressing filesystem (zfs, btrfs) cannot make the read faster than real weights.
    block = os.urandom(min(_FILL_BLOCK, size))
    written = 0
    while written < size:
        written += os.write(fd, block[: size - written])


def _drop_page_cache(fd: int) -> bool:
    """Flush the file to disk, then ask the kernel to forget its cached pages, so the read hits the device."""
    os.fsync(fd)
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def _time_read(fd: int, size: int) -> float:
    buffer = bytearray(_READ_BLOCK)
    os.lseek(fd, 0, os.SEEK_SET)
    start = time.perf_counter()
    done = 0
    while done < size:
        n = os.readv(fd, [buffer])
        if not n:
            raise OSError(f"read test file ended after {done} of {size} bytes")
        done += n
    return max(time.perf_counter() - start, 1e-9)
