"""`r1deploy doctor --server PID`: a running `r1deploy serve` checked in place: each rank's CPU set and memory
policy against its GPU's NUMA node (what `serve --numa-bind` sets), and the server's cgroup limits against
the plan's host memory and CPU cores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil

from r1deploy.doctor.checks import FAIL, PASS, WARN, Check
from r1deploy.doctor.gpu_probe import gpu_pids
from r1deploy.doctor.host import HostReport, cgroup_limits, parse_cpulist
from r1deploy.doctor.requirements import Requirements
from r1deploy.doctor.units import gib
from r1deploy.errors import UsageError

BindingReader = Callable[[int], tuple[frozenset[int], str]]


def server_pids(pid: int) -> list[int]:
    """The server and its descendants (the tensor-parallel rank processes)."""
    try:
        process = psutil.Process(pid)
        return [pid, *(child.pid for child in process.children(recursive=True))]
    except psutil.NoSuchProcess:
        raise UsageError(f"--server {pid}: no such process") from None
    except psutil.AccessDenied:
        raise UsageError(f"--server {pid}: not allowed to inspect it (run as its user or root)") from None


def proc_binding(pid: int, proc: Path = Path("/proc")) -> tuple[frozenset[int], str]:
    """(allowed CPUs, memory policy) of a running process, as doctor reads them; the policy is the one most of
    its mappings show in numa_maps ('default', 'prefer:1', 'bind:0-1', ...)."""
    status = (proc / str(pid) / "status").read_text()
    cpus = next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    policies: dict[str, int] = {}
    try:
        for line in (proc / str(pid) / "numa_maps").read_text().splitlines():
            parts = line.split()
            if len(parts) > 1:
                policies[parts[1]] = policies.get(parts[1], 0) + 1
    except OSError:
        pass
    return parse_cpulist(cpus), max(policies, key=policies.__getitem__) if policies else "unknown"


def _policy_nodes(policy: str) -> frozenset[int]:
    """'prefer:1' -> {1}, 'bind:0-1' -> {0, 1}, 'default' -> {}."""
    _, _, nodes = policy.partition(":")
    return parse_cpulist(nodes) if nodes and nodes[0].isdigit() else frozenset()


def check_binding(host: HostReport, pids: list[int], on_gpu: dict[int, int], read: BindingReader) -> list[Check]:
    """One check per rank process on a GPU: bound to that GPU's node (CPUs within it, memory policy naming it)."""
    nodes = {n.id: parse_cpulist(n.cpulist) for n in host.numa_nodes}
    if len(nodes) <= 1:
        return [Check(PASS, "server NUMA binding", "one NUMA node: nothing to bind")]
    ranks = [pid for pid in pids if pid in on_gpu]
    if not ranks:
        return [Check(WARN, "server NUMA binding", f"no process of server {pids[0]} holds a GPU (NVML): not checked")]
    checks = []
    for pid in ranks:
        gpu = on_gpu[pid]
        node = next((g.numa_node for g in host.gpu.gpus if g.index == gpu), None)
        cpus, policy = read(pid)
        name = f"NUMA binding pid {pid}"
        if node is None or node not in nodes:
            checks.append(Check(WARN, name, f"GPU {gpu}'s NUMA node is unknown; CPUs {len(cpus)}, memory {policy}"))
        elif cpus <= nodes[node] and node in _policy_nodes(policy):
            checks.append(Check(PASS, name, f"GPU {gpu} on node {node}: {len(cpus)} CPUs of node {node}, memory "
                                            f"{policy}"))
        else:
            checks.append(Check(WARN, name, f"GPU {gpu} is on node {node}, but the process may run on {len(cpus)} "
                                            f"CPUs ({len(cpus - nodes[node])} off node {node}) with memory {policy}",
                                "start serve with --numa-bind on (or leave it auto); in a container, allow the "
                                "node's CPUs (cpuset) and the set_mempolicy system call"))
    return checks


def check_cgroup(pid: int, req: Requirements | None, proc: Path = Path("/proc"),
                 root: Path = Path("/sys/fs/cgroup")) -> Check:
    """The server's own cgroup limits (not doctor's) against what the plan asks of a node."""
    limits = cgroup_limits(root, proc / str(pid) / "cgroup")
    memory, cpu = limits.memory_limit_bytes, limits.cpu_quota
    text = (f"server {pid}: memory limit {gib(memory) if memory else 'none'}, "
            f"CPU quota {f'{cpu:g} CPUs' if cpu else 'none'}")
    if req is None:
        return Check(PASS, "server cgroup", text)
    if memory is not None and memory < req.ram_bytes:
        return Check(FAIL, "server cgroup", f"{text}; the plan needs {gib(req.ram_bytes)} of host memory",
                     "raise the limit (MemoryMax=, docker --memory, resources.limits.memory) to the plan's")
    if cpu is not None and cpu < req.cpu_cores:
        return Check(WARN, "server cgroup", f"{text}; the plan wants {req.cpu_cores} CPUs",
                     "raise the CPU quota (CPUQuota=, docker --cpus, resources.limits.cpu)")
    return Check(PASS, "server cgroup", f"{text}; within the plan's {gib(req.ram_bytes)} and {req.cpu_cores} CPUs")


def check_server(pid: int, host: HostReport, req: Requirements | None) -> list[Check]:
    pids = server_pids(pid)
    return [*check_binding(host, pids, gpu_pids(), proc_binding), check_cgroup(pid, req)]
