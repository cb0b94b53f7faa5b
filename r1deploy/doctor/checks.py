"""`r1deploy doctor`'s checks: each judges the host facts (host.py) against a plan's Requirements, as one
pass / warn / fail line with advice. Without a plan only the checks that need none run."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from r1deploy.doctor.gpu_probe import NVLINK, GpuInfo
from r1deploy.doctor.host import HostReport
from r1deploy.doctor.requirements import Requirements
from r1deploy.doctor.units import GIB, cc, gib, mbs

if TYPE_CHECKING:  # collectives imports torch; doctor loads it only for --allreduce
    from r1deploy.plan.collectives import AllReduceResult

PASS, WARN, FAIL = "pass", "warn", "fail"
# A measured all-reduce this far below the planner's assumption is worth a warning.
ALLREDUCE_TOLERANCE = 0.8
# FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0).
_FP8_MIN_CAPABILITY = (8, 9)
# NVML's total is the usable memory, a little under the marketed size a plan may assume
# (141 GB H200 -> 140.4 GiB).
_GPU_MEMORY_TOLERANCE = 0.97
# Memory that other processes hold on a GPU above this is worth a warning; drivers reserve a few hundred MiB.
_GPU_BUSY_BYTES = 1 * GIB
# A 1-minute load average above this share of the usable CPUs means someone else is computing here.
_BUSY_LOAD_SHARE = 0.5

_COLOCATION_ADVICE = (
    "keep other work off the serving GPUs (CUDA_VISIBLE_DEVICES) and CPUs: run it in its own "
    "cgroup (systemd-run --scope -p AllowedCPUs=... -p MemoryMax=..., docker --cpuset-cpus/--memory) "
    "or isolate the serving cores (isolcpus, cset shield)"
)


@dataclass(frozen=True)
class Check:
    status: str  # PASS | WARN | FAIL
    name: str
    message: str
    advice: str = ""



def run_checks(host: HostReport, req: Requirements | None) -> list[Check]:
    checks = _plan_checks(host, req) if req else [check_gpu_presence(host)]
    return [*checks, *check_container_limits(host), check_numa(host), check_colocation(host)]


def _plan_checks(host: HostReport, req: Requirements) -> list[Check]:
    checks = check_gpus(host, req)
    if req.nodes > 1:
        checks.append(check_internode(req))
    return [
        *checks,
        check_ram(host, req),
        check_disk_space(host, req),
        check_disk_read(host, req),
        check_cpu_cores(host, req),
    ]


def check_allreduce(
    host: HostReport, req: Requirements | None, measure: Callable[..., AllReduceResult] | None = None
) -> Check:
    """All-reduce bus bandwidth over the GPUs the plan uses on a node, against the planner's assumption:
    one direction of the catalog GPU's NVLink (else PCIe) times its intra-node link efficiency."""
    gpus = host.gpu.gpus
    if len(gpus) < 2:
        return Check(WARN, "all-reduce", f"{len(gpus)} GPU(s) visible: NCCL all-reduce not measured")
    if measure is None:
        from r1deploy.plan.collectives import measure_allreduce  # spawns processes: only when asked

        measure = measure_allreduce
    world = min(len(gpus), req.gpus_per_node) if req and req.gpus_per_node > 1 else len(gpus)
    measured = measure(world, "nccl").bus_bytes_per_s
    text = f"{measured / 1e9:,.0f} GB/s bus bandwidth over {world} GPUs"
    if req is None:
        return Check(PASS, "all-reduce", text)
    from r1deploy.doctor.requirements import assumed_efficiency
    from r1deploy.plan.catalog import Catalog

    assumed = Catalog.load().get(req.gpu).intranode_bytes_s * assumed_efficiency(req).intranode_link
    whose = f"the plan ({req.engine} profile)" if req.engine else "the plan"
    if measured >= ALLREDUCE_TOLERANCE * assumed:
        return Check(PASS, "all-reduce", f"{text}; {whose} assumes {assumed / 1e9:,.0f} GB/s")
    return Check(
        WARN,
        "all-reduce",
        f"{text}, below the {assumed / 1e9:,.0f} GB/s {whose} assumes: TP/EP steps will be slower",
        "check `nvidia-smi topo -m` (NV# links between the GPUs), that NCCL_P2P_DISABLE is unset, and PCIe "
        "ACS/IOMMU settings; then `r1deploy plan --calibration` with the measured link efficiency",
    )


def usable_cpus(host: HostReport) -> float:
    """CPUs this process can actually use: affinity/cpuset, and the cgroup CPU quota if tighter."""
    quota = host.cgroup.cpu_quota
    return min(host.cpu.usable_cpus, quota) if quota else host.cpu.usable_cpus


def usable_ram(host: HostReport) -> int:
    # psutil reports the host's RAM even inside a container; the cgroup limit is what the OOM killer enforces.
    limit = host.cgroup.memory_limit_bytes
    return min(host.memory.total_bytes, limit) if limit else host.memory.total_bytes


def check_gpu_presence(host: HostReport) -> Check:
    gpus = host.gpu.gpus
    if not gpus:
        return Check(
            WARN,
            "GPUs",
            f"no NVIDIA GPU visible ({host.gpu.reason})",
            "fine for planning; serving needs NVIDIA GPUs with a working driver (nvidia-smi)",
        )
    return Check(PASS, "GPUs", f"{len(gpus)}x {gpus[0].name}, driver {host.gpu.driver_version}")


def check_gpus(host: HostReport, req: Requirements) -> list[Check]:
    if req.num_gpus == 0:
        return [Check(PASS, "GPUs", "the plan runs without GPUs")]
    gpus = host.gpu.gpus
    need = req.gpus_per_node
    if not gpus:
        return [
            Check(
                FAIL,
                "GPU count",
                f"no NVIDIA GPU visible ({host.gpu.reason}); the plan needs {need}x {req.gpu}",
                "install the NVIDIA driver (nvidia-smi must work) and, in a container, pass the GPUs in "
                "(docker run --gpus all); or plan for this host with `r1deploy plan --gpu ...`",
            )
        ]
    if len(gpus) < need:
        count = Check(
            FAIL,
            "GPU count",
            f"{len(gpus)} GPUs visible, the plan needs {need} per node",
            "run on a host with more GPUs, or plan with more nodes",
        )
    else:
        count = Check(PASS, "GPU count", f"{len(gpus)} GPUs visible, the plan uses {need} per node")
    used = gpus[:need]
    checks = [count, _check_gpu_memory(used, req), _check_gpu_model(used, req)]
    if req.fp8_compute:
        checks.append(_check_fp8(used))
    if len(used) > 1:
        checks.append(_check_nvlink(host, len(used)))
    return checks


def _check_gpu_memory(gpus: tuple[GpuInfo, ...], req: Requirements) -> Check:
    smallest = min(gpus, key=lambda g: g.memory_bytes)
    have, want = smallest.memory_bytes, req.gpu_memory_bytes
    message = f"GPU {smallest.index} has {gib(have)}, the plan assumes {gib(want)} per GPU"
    if have >= want * _GPU_MEMORY_TOLERANCE:
        return Check(PASS, "GPU memory", message)
    return Check(
        FAIL, "GPU memory", message, "re-plan for this GPU (r1deploy plan --gpu ...), or use larger GPUs"
    )


def _check_gpu_model(gpus: tuple[GpuInfo, ...], req: Requirements) -> Check:
    names = sorted({g.name for g in gpus})
    if all(gpu_name_matches(req.gpu, name) for name in names):
        return Check(PASS, "GPU model", f"{', '.join(names)} matches the plan's {req.gpu}")
    return Check(
        WARN,
        "GPU model",
        f"the plan assumes {req.gpu}, this host has {', '.join(names)}",
        "speed and memory estimates are for the planned GPU; re-plan with --gpu for this one",
    )


def gpu_name_matches(planned: str, nvml_name: str) -> bool:
    """'h200' ~ 'NVIDIA H200', 'H200 SXM 141GB' ~ 'NVIDIA H200', 'rtx-4090' ~ 'NVIDIA GeForce RTX 4090'.

    Every token of the planned name that carries a digit must be a token of the NVML name, or adjacent
    tokens run together ("rtx4090"); whole tokens, so 'h20' does not match 'H200'. Memory sizes ("141GB")
    are left out: NVML names often omit them, and the memory check compares sizes anyway.
    """
    words = _name_tokens(nvml_name)
    joined = {"".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    wanted = [
        t for t in _name_tokens(planned) if any(c.isdigit() for c in t) and not re.fullmatch(r"\d+gb", t)
    ]
    return bool(wanted) and all(t in joined for t in wanted)


def _name_tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]


def _check_fp8(gpus: tuple[GpuInfo, ...]) -> Check:
    lacking = [g for g in gpus if g.compute_capability < _FP8_MIN_CAPABILITY]
    if not lacking:
        return Check(PASS, "FP8", f"compute capability {cc(gpus[0])} runs FP8 matmuls")
    g = lacking[0]
    return Check(
        FAIL,
        "FP8",
        f"the plan computes in FP8; GPU {g.index} ({g.name}) has compute capability {cc(g)}, "
        "FP8 needs 8.9 or newer (Ada, Hopper, Blackwell)",
        "re-plan for this GPU: without FP8 compute the weights run in BF16 and need about twice the memory",
    )


def _check_nvlink(host: HostReport, count: int) -> Check:
    topo = host.gpu.topology
    slow = [(i, j, topo[i][j]) for i in range(count) for j in range(i + 1, count) if topo[i][j] != NVLINK]
    links = min(g.nvlinks_active for g in host.gpu.gpus[:count])
    if not slow:
        return Check(PASS, "NVLink", f"all {count} GPUs are NVLink peers ({links}+ active links each)")
    i, j, path = slow[0]
    return Check(
        WARN,
        "NVLink",
        f"{len(slow)} of {count * (count - 1) // 2} GPU pairs lack NVLink "
        f"(GPU {i}-{j}: PCIe {path}); tensor-parallel all-reduce will be PCIe-bound",
        "prefer NVLink/NVSwitch GPUs for TP>1, or plan fewer GPUs per tensor-parallel group",
    )


def check_internode(req: Requirements) -> Check:
    return Check(
        WARN,
        "inter-node",
        f"the plan spans {req.nodes} nodes and assumes "
        f"{req.internode_bytes_per_s / 1e9:.0f} GB/s between them; not measured here",
        "measure it with nccl-tests (all_reduce_perf) across the nodes before serving",
    )


def check_ram(host: HostReport, req: Requirements) -> Check:
    have, want = usable_ram(host), req.ram_bytes
    limited = " (container limit)" if have < host.memory.total_bytes else ""
    if have < want:
        return Check(
            FAIL,
            "RAM",
            f"{gib(have)}{limited} RAM, the plan needs {gib(want)}",
            "use a host with more memory, or raise the container's memory limit",
        )
    available = host.memory.available_bytes
    if available < want:
        return Check(
            WARN,
            "RAM",
            f"{gib(have)}{limited} RAM, but only {gib(available)} available now; "
            f"the plan needs {gib(want)}",
            "stop other memory-hungry processes first",
        )
    return Check(
        PASS, "RAM", f"{gib(have)}{limited} RAM ({gib(available)} available), the plan needs {gib(want)}"
    )


def check_disk_space(host: HostReport, req: Requirements) -> Check:
    disk, want = host.disk, req.disk_bytes
    where = f"{disk.path} ({disk.mount_point})"
    if disk.free_bytes >= want:
        return Check(
            PASS, "disk space", f"{gib(disk.free_bytes)} free on {where}, the plan needs {gib(want)}"
        )
    if disk.total_bytes < want:
        return Check(
            FAIL,
            "disk space",
            f"{where} holds {gib(disk.total_bytes)} in all, the plan needs {gib(want)}",
            "put the weights on a larger disk and point --path there",
        )
    return Check(
        WARN,
        "disk space",
        f"{gib(disk.free_bytes)} free on {where}, the plan needs {gib(want)}",
        "fine if the weights are already there; otherwise free space or use another disk (--path)",
    )


def check_disk_read(host: HostReport, req: Requirements) -> Check:
    speed, assumed = host.disk.read_bytes_per_s, req.disk_read_bytes_per_s
    if speed is None:
        return Check(
            WARN,
            "disk read",
            f"not measured ({host.disk.read_note}); the plan assumes {mbs(assumed)}",
            "run without --read-test-mib 0 to measure it",
        )
    load_s = req.weights_bytes / req.nodes / speed
    message = (
        f"{mbs(speed)} sequential read ({host.disk.read_note}); the plan assumes {mbs(assumed)}; "
        f"loading {gib(req.weights_bytes // req.nodes)} of weights takes ~{load_s:.0f} s "
        f"(plan: {req.load_time_s:.0f} s)"
    )
    if speed >= assumed:
        return Check(PASS, "disk read", message)
    return Check(
        WARN,
        "disk read",
        message,
        "keep the weights on local NVMe (or RAID0 across drives), "
        "or pre-load them into the page cache when RAM allows",
    )


def check_cpu_cores(host: HostReport, req: Requirements) -> Check:
    have = usable_cpus(host)
    per_gpu = f", {have / req.gpus_per_node:.1f} per GPU" if req.gpus_per_node else ""
    message = f"{have:g} usable CPUs{per_gpu}; the plan wants {req.cpu_cores}"
    if have >= req.cpu_cores:
        return Check(PASS, "CPU cores", message)
    return Check(
        WARN,
        "CPU cores",
        message,
        "tokenization, scheduling and weight loading run on the CPU; give the serving process more cores",
    )


def check_container_limits(host: HostReport) -> list[Check]:
    """A container sees the host's CPUs and RAM in /proc, but its cgroup may allow far less."""
    cpu, logical = host.cgroup.cpu_quota, host.cpu.logical_cores
    advice = (
        "raise the limits (docker --cpus/--cpuset-cpus/--memory, Kubernetes resources.limits) or plan "
        "with these numbers"
    )
    checks = []
    if cpu is not None and cpu < logical:
        checks.append(
            Check(
                WARN,
                "cgroup CPU",
                f"container limited to {cpu:g} CPUs (cgroup v{host.cgroup.version} "
                f"quota) of the host's {logical}",
                advice,
            )
        )
    if host.cpu.usable_cpus < logical:
        checks.append(
            Check(
                WARN,
                "CPU affinity",
                f"this process may run on {host.cpu.usable_cpus} of {logical} CPUs (cpuset or taskset)",
                advice,
            )
        )
    limit = host.cgroup.memory_limit_bytes
    if limit is not None and limit < host.memory.total_bytes:
        checks.append(
            Check(
                WARN,
                "cgroup memory",
                f"container limited to {gib(limit)} of the host's {gib(host.memory.total_bytes)}",
                advice,
            )
        )
    return checks or [Check(PASS, "cgroup limits", "no CPU or memory limit below the host's")]


def check_numa(host: HostReport) -> Check:
    nodes = host.numa_nodes
    if len(nodes) <= 1:
        return Check(PASS, "NUMA", "one NUMA node: nothing to bind")
    gpu_nodes = {g.index: g.numa_node for g in host.gpu.gpus if g.numa_node is not None}
    where = "; ".join(f"GPU {i} on node {n}" for i, n in gpu_nodes.items())
    example = next(iter(gpu_nodes.values()), nodes[0].id)
    return Check(
        PASS,
        "NUMA",
        f"{len(nodes)} NUMA nodes" + (f" ({where})" if where else ""),
        f"bind each GPU worker to its GPU's NUMA node, e.g. numactl --cpunodebind={example} "
        f"--membind={example} for a GPU on node {example}; cross-node traffic slows host-device copies",
    )


def check_colocation(host: HostReport) -> Check:
    busy = [
        f"GPU {g.index} has {gib(g.memory_used_bytes)} in use"
        for g in host.gpu.gpus
        if g.memory_used_bytes > _GPU_BUSY_BYTES
    ]
    cpus = usable_cpus(host)
    if host.load_1m > _BUSY_LOAD_SHARE * cpus:
        busy.append(f"load average {host.load_1m:.1f} on {cpus:g} CPUs")
    if busy:
        return Check(WARN, "co-located work", "; ".join(busy) + " by other processes", _COLOCATION_ADVICE)
    return Check(
        PASS,
        "co-located work",
        f"load average {host.load_1m:.1f} on {cpus:g} CPUs, GPUs idle",
        "if other work will share this host, confine it with cgroups (docker --cpuset-cpus, "
        "systemd-run -p AllowedCPUs=...) or isolcpus",
    )
