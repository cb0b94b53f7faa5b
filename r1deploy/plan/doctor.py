"""`r1deploy doctor`: inspect this host and check it against a deployment plan.

The host facts come from host.py; this module judges them. Requirements come from a plan file
(`r1deploy plan --json`) or from the planner for --model/--gpu; without either, only the
checks that need no plan run. Each check is one pass / warn / fail line with advice. The CLI
imports this module at startup, so it stays light: no torch, and pynvml and rich load only when used.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1deploy.errors import UsageError
from r1deploy.plan.gpu_probe import NVLINK, GpuInfo
from r1deploy.plan.host import HostReport, collect_host

if TYPE_CHECKING:  # collectives imports torch; doctor loads it only for --allreduce
    from r1deploy.plan.collectives import AllReduceResult

PASS, WARN, FAIL = "pass", "warn", "fail"
# A measured all-reduce this far below the planner's assumption is worth a warning.
ALLREDUCE_TOLERANCE = 0.8
_GIB = 1 << 30
DEFAULT_CACHE_DIR = Path("~/.cache/r1deploy")
# FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0).
_FP8_MIN_CAPABILITY = (8, 9)
# NVML's total is the usable memory, a little under the marketed size a plan may assume
# (141 GB H200 -> 140.4 GiB).
_GPU_MEMORY_TOLERANCE = 0.97
# Memory that other processes hold on a GPU above this is worth a warning; drivers reserve a few hundred MiB.
_GPU_BUSY_BYTES = 1 * _GIB
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


@dataclass(frozen=True)
class Requirements:
    """What a plan asks of each host. host.* values are per node, deployment.num_gpus is the total."""

    gpu: str
    num_gpus: int
    nodes: int
    gpu_memory_bytes: int
    fp8_compute: bool
    ram_bytes: int
    disk_bytes: int
    cpu_cores: int
    load_time_s: float
    disk_read_bytes_per_s: float
    internode_bytes_per_s: float
    total_params: int
    weights_bytes: int

    @property
    def gpus_per_node(self) -> int:
        return math.ceil(self.num_gpus / self.nodes)


# Requirements field -> (plan key, expected type). A number is int or float, never bool.
_PLAN_KEYS: dict[str, tuple[str, type]] = {
    "gpu": ("deployment.gpu", str),
    "num_gpus": ("deployment.num_gpus", int),
    "nodes": ("deployment.nodes", int),
    "gpu_memory_bytes": ("deployment.gpu_memory_bytes", int),
    "fp8_compute": ("deployment.fp8_compute", bool),
    "ram_bytes": ("host.ram_bytes", int),
    "disk_bytes": ("host.disk_bytes", int),
    "cpu_cores": ("host.cpu_cores", int),
    "load_time_s": ("host.load_time_s", float),
    "disk_read_bytes_per_s": ("host.disk_read_bytes_per_s", float),
    "internode_bytes_per_s": ("host.internode_bytes_per_s", float),
    "total_params": ("model.total_params", int),
    "weights_bytes": ("memory.weights_bytes", int),
}


# --- CLI -------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="inspect this host and check it against a plan",
        description="Inspect this host (CPU, RAM, NUMA, cgroup limits, disk with a sequential-read test, "
        "NVIDIA GPUs and their topology) and check it against a plan's host and GPU requirements. "
        "Exit code: 0 when no check fails (warnings allowed), 1 when any check fails, "
        "2 on a usage error.",
    )
    source = p.add_argument_group("plan to check against (none: report the host only)")
    source.add_argument(
        "--plan", type=Path, metavar="PLAN.json", help="a plan printed by `r1deploy plan --json`"
    )
    source.add_argument("--model", help="plan this model now (preset name, config.json or model directory)")
    source.add_argument("--gpu", help="GPU the plan assumes (with --model; default: the planner's)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: host, requirements, checks, summary"
    )
    p.add_argument(
        "--read-test-mib",
        type=int,
        default=256,
        metavar="N",
        help="size of the sequential-read test file written to --path (default 256; 0 skips the test)",
    )
    p.add_argument(
        "--path",
        type=Path,
        metavar="DIR",
        help=f"model/cache directory whose disk is checked (default {DEFAULT_CACHE_DIR} if it exists, "
        "else the current directory)",
    )
    p.add_argument(
        "--allreduce",
        action="store_true",
        help="measure NCCL all-reduce bus bandwidth between this host's GPUs (about 10 s) and compare it "
        "with the link bandwidth the plan assumes",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.read_test_mib < 0:
        raise UsageError("--read-test-mib must be 0 (skip) or a positive number of MiB")
    disk_path = _disk_path(args.path)
    requirements = _requirements(args)
    host = collect_host(disk_path, args.read_test_mib)
    checks = run_checks(host, requirements)
    if args.allreduce:
        checks.append(check_allreduce(host, requirements))
    if args.json:
        print(json.dumps(report_dict(host, requirements, checks), indent=2))
    else:
        _print_report(host, requirements, checks)
    return 1 if any(c.status == FAIL for c in checks) else 0


def _disk_path(path: Path | None) -> Path:
    if path is None:
        default = DEFAULT_CACHE_DIR.expanduser()
        return default if default.is_dir() else Path.cwd()
    path = path.expanduser()
    if not path.is_dir():
        raise UsageError(f"--path {path} is not a directory")
    return path


def _requirements(args: argparse.Namespace) -> Requirements | None:
    if args.plan is not None:
        if args.model or args.gpu:
            raise UsageError("give either --plan or --model/--gpu, not both")
        return requirements_from_plan(_load_plan(args.plan), source=str(args.plan))
    if args.model or args.gpu:
        # Imported here: only this path needs the planner, and the CLI imports doctor at every start.
        from r1deploy.plan.planner import plan_deployment

        options = {k: v for k, v in (("model", args.model), ("gpu", args.gpu)) if v}
        return requirements_from_plan(plan_deployment(**options), source="the planner")
    return None


def _load_plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read plan file {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"plan file {path} is not JSON: {exc}") from exc
    if not isinstance(plan, dict):
        raise UsageError(f"plan file {path} must hold one JSON object, as `r1deploy plan --json` prints")
    return plan


def requirements_from_plan(plan: dict[str, Any], source: str) -> Requirements:
    req = Requirements(
        **{field: _plan_value(plan, key, kind, source) for field, (key, kind) in _PLAN_KEYS.items()}
    )
    if req.nodes < 1 or req.num_gpus < 0:
        raise UsageError(
            f"{source}: deployment.nodes must be at least 1 and deployment.num_gpus not negative"
        )
    return req


def _plan_value(plan: dict[str, Any], key: str, kind: type, source: str) -> Any:
    value: Any = plan
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UsageError(f"{source} has no key {key!r} (expected the output of `r1deploy plan --json`)")
        value = value[part]
    numeric = kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (numeric or (kind in (str, bool) and isinstance(value, kind))):
        raise UsageError(
            f"{source}: {key!r} must be {'a number' if kind in (int, float) else kind.__name__}, "
            f"not {value!r}"
        )
    return value


# --- checks ----------------------------------------------------------------------------------------


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
    from r1deploy.plan.catalog import Catalog
    from r1deploy.plan.roofline import Efficiency

    assumed = Catalog.load().get(req.gpu).intranode_bytes_s * Efficiency().intranode_link
    if measured >= ALLREDUCE_TOLERANCE * assumed:
        return Check(PASS, "all-reduce", f"{text}; the plan assumes {assumed / 1e9:,.0f} GB/s")
    return Check(
        WARN,
        "all-reduce",
        f"{text}, below the {assumed / 1e9:,.0f} GB/s the plan assumes: TP/EP steps will be slower",
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
    message = f"GPU {smallest.index} has {_gib(have)}, the plan assumes {_gib(want)} per GPU"
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
        return Check(PASS, "FP8", f"compute capability {_cc(gpus[0])} runs FP8 matmuls")
    g = lacking[0]
    return Check(
        FAIL,
        "FP8",
        f"the plan computes in FP8; GPU {g.index} ({g.name}) has compute capability {_cc(g)}, "
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
            f"{_gib(have)}{limited} RAM, the plan needs {_gib(want)}",
            "use a host with more memory, or raise the container's memory limit",
        )
    available = host.memory.available_bytes
    if available < want:
        return Check(
            WARN,
            "RAM",
            f"{_gib(have)}{limited} RAM, but only {_gib(available)} available now; "
            f"the plan needs {_gib(want)}",
            "stop other memory-hungry processes first",
        )
    return Check(
        PASS, "RAM", f"{_gib(have)}{limited} RAM ({_gib(available)} available), the plan needs {_gib(want)}"
    )


def check_disk_space(host: HostReport, req: Requirements) -> Check:
    disk, want = host.disk, req.disk_bytes
    where = f"{disk.path} ({disk.mount_point})"
    if disk.free_bytes >= want:
        return Check(
            PASS, "disk space", f"{_gib(disk.free_bytes)} free on {where}, the plan needs {_gib(want)}"
        )
    if disk.total_bytes < want:
        return Check(
            FAIL,
            "disk space",
            f"{where} holds {_gib(disk.total_bytes)} in all, the plan needs {_gib(want)}",
            "put the weights on a larger disk and point --path there",
        )
    return Check(
        WARN,
        "disk space",
        f"{_gib(disk.free_bytes)} free on {where}, the plan needs {_gib(want)}",
        "fine if the weights are already there; otherwise free space or use another disk (--path)",
    )


def check_disk_read(host: HostReport, req: Requirements) -> Check:
    speed, assumed = host.disk.read_bytes_per_s, req.disk_read_bytes_per_s
    if speed is None:
        return Check(
            WARN,
            "disk read",
            f"not measured ({host.disk.read_note}); the plan assumes {_mbs(assumed)}",
            "run without --read-test-mib 0 to measure it",
        )
    load_s = req.weights_bytes / req.nodes / speed
    message = (
        f"{_mbs(speed)} sequential read ({host.disk.read_note}); the plan assumes {_mbs(assumed)}; "
        f"loading {_gib(req.weights_bytes // req.nodes)} of weights takes ~{load_s:.0f} s "
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
                f"container limited to {_gib(limit)} of the host's {_gib(host.memory.total_bytes)}",
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
        f"GPU {g.index} has {_gib(g.memory_used_bytes)} in use"
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


# --- output ----------------------------------------------------------------------------------------


def report_dict(host: HostReport, req: Requirements | None, checks: list[Check]) -> dict[str, Any]:
    return {
        "host": asdict(host),
        "requirements": asdict(req) if req else None,
        "checks": [asdict(c) for c in checks],
        "summary": summarize(checks),
    }


def summarize(checks: list[Check]) -> dict[str, int]:
    return {status: sum(c.status == status for c in checks) for status in (PASS, WARN, FAIL)}


def host_facts(host: HostReport) -> list[tuple[str, str]]:
    cpu, disk = host.cpu, host.disk
    mhz = "/".join(f"{m:.0f}" for m in (cpu.mhz_current, cpu.mhz_max) if m) or "?"
    facts = [
        ("host", f"{host.hostname} ({host.platform})"),
        (
            "CPU",
            (
                f"{cpu.model}: {cpu.physical_cores} cores / {cpu.logical_cores} threads, "
                f"{cpu.usable_cpus} usable, {mhz} MHz, L3 {_gib(cpu.l3_bytes) if cpu.l3_bytes else '?'}"
            ),
        ),
        ("RAM", f"{_gib(host.memory.total_bytes)} total, {_gib(host.memory.available_bytes)} available"),
        (
            "NUMA",
            "; ".join(
                f"node {n.id}: CPUs {n.cpulist}" + (f", {_gib(n.memory_bytes)}" if n.memory_bytes else "")
                for n in host.numa_nodes
            )
            or "unknown",
        ),
        ("cgroup", _cgroup_fact(host)),
        (
            "disk",
            f"{disk.path} on {disk.mount_point} ({disk.device}, {disk.fstype}): {_gib(disk.free_bytes)} free "
            f"of {_gib(disk.total_bytes)}; read "
            + (
                f"{_mbs(disk.read_bytes_per_s)} ({disk.read_note})"
                if disk.read_bytes_per_s
                else disk.read_note
            ),
        ),
    ]
    return facts + _gpu_facts(host)


def _cgroup_fact(host: HostReport) -> str:
    cg = host.cgroup
    if cg.version is None:
        return "none found"
    cpu = f"{cg.cpu_quota:g} CPUs" if cg.cpu_quota else "no CPU quota"
    memory = _gib(cg.memory_limit_bytes) if cg.memory_limit_bytes else "no memory limit"
    return f"v{cg.version}: {cpu}, {memory}"


def _gpu_facts(host: HostReport) -> list[tuple[str, str]]:
    report = host.gpu
    if not report.gpus:
        return [("GPUs", f"none ({report.reason})")]
    facts = [("driver", f"{report.driver_version} (CUDA {report.cuda_driver_version})")]
    for g in report.gpus:
        pcie = f"PCIe gen{g.pcie_gen} x{g.pcie_width}" if g.pcie_gen else "PCIe ?"
        numa = f", NUMA node {g.numa_node}" if g.numa_node is not None else ""
        facts.append(
            (
                f"GPU {g.index}",
                (
                    f"{g.name}, {_gib(g.memory_bytes)} ({_gib(g.memory_used_bytes)} used), "
                    f"cc {_cc(g)}, {pcie}, {g.nvlinks_active} NVLinks{numa}"
                ),
            )
        )
    if len(report.gpus) > 1:
        facts.append(
            ("topology", "\n".join(" ".join(f"{cell:>4}" for cell in row) for row in report.topology))
        )
    return facts


def _print_report(host: HostReport, req: Requirements | None, checks: list[Check]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    facts = Table(title="this host", show_header=False, title_justify="left")
    for key, value in host_facts(host):
        facts.add_row(key, value)
    console.print(facts)
    title = (
        f"checks against a plan for {req.total_params / 1e9:.0f}B params on {req.num_gpus}x {req.gpu}"
        f" over {req.nodes} node(s)"
        if req
        else "checks (host only)"
    )
    table = Table("status", "check", "result", "advice", title=title, title_justify="left")
    colours = {PASS: "green", WARN: "yellow", FAIL: "bold red"}
    for c in checks:
        table.add_row(f"[{colours[c.status]}]{c.status}[/]", c.name, c.message, c.advice)
    console.print(table)
    counts = summarize(checks)
    console.print(f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail")
    if req is None:
        console.print(
            "no plan given: check against one with `r1deploy doctor --model deepseek-r1 --gpu h200` "
            "or `r1deploy doctor --plan PLAN.json` (from `r1deploy plan --json`)"
        )


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / (1 << 20):.0f} MiB"


def _mbs(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:,.0f} MB/s"


def _cc(gpu: GpuInfo) -> str:
    return ".".join(map(str, gpu.compute_capability))
