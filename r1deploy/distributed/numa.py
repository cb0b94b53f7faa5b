"""Bind each rank to its GPU's NUMA node: its threads to that node's CPUs, its host allocations (pinned
buffers, offload tiers) to that node's memory, so host-device copies and weight streaming cross no socket link.

The topology comes from NVML (each GPU's NUMA node) and sysfs (each node's CPUs). The memory policy is
MPOL_PREFERRED, set with the set_mempolicy system call: allocations go to the GPU's node and fall back to
another node only when it is full (MPOL_BIND would turn a full node into an out-of-memory kill). No torch here:
`plan --emit systemd` and `doctor` use the same topology.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from r1deploy.doctor.host import parse_cpulist
from r1deploy.errors import UsageError

NUMA_BIND_MODES = ("auto", "on", "off")
MPOL_PREFERRED = 1
# set_mempolicy's system call number; other architectures bind CPUs only.
SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}


@dataclass(frozen=True)
class NumaTopology:
    node_cpus: Mapping[int, frozenset[int]]  # NUMA node -> its CPUs
    gpu_nodes: tuple[int | None, ...]  # NVML GPU index -> its NUMA node (None: unknown)

    @property
    def multi_node(self) -> bool:
        return len(self.node_cpus) > 1


@dataclass(frozen=True)
class NumaBinding:
    gpu: int  # NVML index
    node: int
    cpus: frozenset[int]  # the node's CPUs this process may use (its cpuset allowing)

    def describe(self) -> str:
        return f"GPU {self.gpu} -> NUMA node {self.node}: {len(self.cpus)} CPUs, memory preferred on node {self.node}"


def probe_topology() -> NumaTopology:
    from r1deploy.doctor.gpu_probe import probe_gpus
    from r1deploy.doctor.host import numa_nodes

    nodes = {n.id: parse_cpulist(n.cpulist) for n in numa_nodes()}
    return NumaTopology(nodes, tuple(g.numa_node for g in probe_gpus().gpus))


def gpu_of_local_rank(local_rank: int, cuda_visible_devices: str | None) -> int | None:
    """The NVML index of the GPU a rank uses (CUDA device `local_rank`), or None when CUDA_VISIBLE_DEVICES
    names GPUs by UUID or MIG instance. Assumes CUDA's order is NVML's PCI order (CUDA_DEVICE_ORDER=PCI_BUS_ID,
    and the usual order on servers with one GPU model)."""
    if cuda_visible_devices is None:
        return local_rank
    visible = [v.strip() for v in cuda_visible_devices.split(",") if v.strip()]
    if local_rank >= len(visible) or not visible[local_rank].isdigit():
        return None
    return int(visible[local_rank])


def choose_binding(topology: NumaTopology, local_rank: int, cuda_visible_devices: str | None,
                   allowed_cpus: frozenset[int]) -> NumaBinding | None:
    """Where rank `local_rank` belongs, or None when its GPU or the GPU's node is unknown."""
    gpu = gpu_of_local_rank(local_rank, cuda_visible_devices)
    if gpu is None or gpu >= len(topology.gpu_nodes):
        return None
    node = topology.gpu_nodes[gpu]
    if node is None or node not in topology.node_cpus:
        return None
    return NumaBinding(gpu, node, topology.node_cpus[node] & allowed_cpus)


def should_bind(mode: str, topology: NumaTopology, device_type: str) -> bool:
    """--numa-bind: off; on (UsageError where nothing can be bound); auto = on for GPUs over several nodes."""
    if mode not in NUMA_BIND_MODES:
        raise UsageError(f"--numa-bind must be one of {', '.join(NUMA_BIND_MODES)}, not {mode!r}")
    if mode == "off" or device_type != "cuda" and mode == "auto":
        return False
    if mode == "on" and device_type != "cuda":
        raise UsageError("--numa-bind on binds each rank to its GPU's NUMA node; this run has no GPU")
    if mode == "on" and not any(n is not None for n in topology.gpu_nodes):
        raise UsageError("--numa-bind on: NVML reports no NUMA node for any GPU (see `r1deploy doctor`)")
    return mode == "on" or topology.multi_node


def set_preferred_node(node: int) -> None:
    """set_mempolicy(MPOL_PREFERRED, {node}) for the calling thread; threads it starts later inherit it."""
    number = SYS_SET_MEMPOLICY.get(platform.machine())
    if number is None:
        raise OSError(f"set_mempolicy: unknown system call number on {platform.machine()}")
    words = node // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // 64] = 1 << (node % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, MPOL_PREFERRED, mask, ctypes.c_ulong(words * 64 + 1)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"set_mempolicy: {os.strerror(errno)}")


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def apply_binding(binding: NumaBinding, *, set_affinity: Callable[[int, frozenset[int]], None] = os.sched_setaffinity,
                  set_memory_node: Callable[[int], None] = set_preferred_node,
                  threads: Callable[[], list[int]] = _threads) -> str:
    """Bind every thread of this process to the binding's CPUs and its memory to the node; returns what was done
    (a CPU set the cpuset forbids entirely, or a failed system call, is reported, not raised)."""
    done = []
    if binding.cpus:
        for tid in threads():
            set_affinity(tid, binding.cpus)
        done.append(f"{len(binding.cpus)} CPUs of node {binding.node}")
    else:
        done.append(f"CPUs left as they are (the cpuset allows none of node {binding.node}'s)")
    try:
        set_memory_node(binding.node)
        done.append(f"memory preferred on node {binding.node}")
    except OSError as exc:
        done.append(f"memory policy not set ({exc})")
    return f"GPU {binding.gpu}: " + ", ".join(done)


def device_type(device: str | None) -> str:
    """'cuda' or 'cpu' (or another torch device type) for a --device value, as the engine chooses it."""
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type


def bind_rank(mode: str, local_rank: int, device_type: str, who: str,
              topology: Callable[[], NumaTopology] = probe_topology) -> NumaBinding | None:
    """serve and the TP workers call this first: binds when --numa-bind says so and prints one line."""
    if mode == "off":
        return None
    found = topology()
    if not should_bind(mode, found, device_type):
        return None
    binding = choose_binding(found, local_rank, os.environ.get("CUDA_VISIBLE_DEVICES"),
                             frozenset(os.sched_getaffinity(0)))
    if binding is None:
        print(f"{who}: --numa-bind: the NUMA node of rank {local_rank}'s GPU is unknown; not bound", flush=True)
        return None
    print(f"{who}: --numa-bind: {apply_binding(binding)}", flush=True)
    return binding

