"""Tensor parallelism over several nodes, with torchrun's semantics: world size = tp, every node runs
`nproc_per_node` ranks, node R holds ranks R x nproc_per_node ... (R + 1) x nproc_per_node - 1, and node 0
holds rank 0 (the scheduler and HTTP server). Every rank joins the rendezvous that rank 0 hosts at
master_addr:master_port; a node other than 0 only runs its workers and waits for rank 0 to stop them.

The rank network carries unauthenticated tensors (step messages, activations): it must be private.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from r1deploy.engine_config import ParallelConfig
from r1deploy.errors import UsageError

# Interface variables each backend reads; set to the interface that routes to master_addr unless given.
IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass(frozen=True)
class MultiNodeConfig(ParallelConfig):
    """ParallelConfig plus the node layout (ParallelConfig itself describes one node)."""

    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 0  # 0: tensor_parallel_size // nnodes
    numa_bind: str = "off"  # auto | on | off: each rank bound to its GPU's NUMA node (distributed/numa.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.numa_bind not in ("auto", "on", "off"):
            raise ValueError(f"numa_bind must be auto, on or off, not {self.numa_bind!r}")
        NodeLayout.of(self)  # validates


@dataclass(frozen=True)
class NodeLayout:
    world_size: int
    nnodes: int
    node_rank: int
    nproc_per_node: int

    @staticmethod
    def of(parallel: ParallelConfig) -> NodeLayout:
        """The layout of `parallel` (a plain ParallelConfig: every rank on this node)."""
        tp = parallel.tensor_parallel_size
        nnodes, node_rank = getattr(parallel, "nnodes", 1), getattr(parallel, "node_rank", 0)
        nproc = getattr(parallel, "nproc_per_node", 0) or max(1, tp // max(nnodes, 1))
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise UsageError(f"--node-rank {node_rank} must be in [0, --nnodes {nnodes})")
        if nproc * nnodes != tp:
            raise UsageError(f"--tp {tp} over --nnodes {nnodes} x --nproc-per-node {nproc}: the product must "
                             "equal --tp (every node runs the same number of ranks)")
        if nnodes > 1 and parallel.master_port == 0:
            raise UsageError("--nnodes > 1 needs --master-port (the same on every node)")
        return NodeLayout(tp, nnodes, node_rank, nproc)

    @property
    def first_rank(self) -> int:
        return self.node_rank * self.nproc_per_node

    @property
    def ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.first_rank, self.first_rank + self.nproc_per_node)


def route_interface(master_addr: str) -> tuple[str, str] | None:
    """(interface name, local address) this host reaches master_addr through, or None if unknown.
    A UDP connect sends nothing: it only asks the kernel's routing table."""
    import psutil

    try:
        family, _, _, _, address = socket.getaddrinfo(master_addr, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(address)
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local for a in addresses):
            return name, local
    return None


def bind_rank_network(master_addr: str, who: str) -> None:
    """Make gloo and NCCL use the interface that routes to master_addr (the rank network), not whatever
    the hostname resolves to; an operator's GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME win. Workers inherit it."""
    route = route_interface(master_addr)
    if route is None:
        print(f"{who}: no local interface routes to {master_addr}; set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME",
              file=sys.stderr, flush=True)
        return
    name, local = route
    for variable in IFNAME_VARIABLES:
        os.environ.setdefault(variable, name)
    chosen = ", ".join(f"{v}={os.environ[v]}" for v in IFNAME_VARIABLES)
    print(f"{who}: rank network via {name} ({local}, the route to {master_addr}): {chosen}", flush=True)
