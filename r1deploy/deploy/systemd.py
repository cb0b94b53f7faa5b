"""`--emit systemd`: one unit per node and the environment file they read. Each unit's CPU affinity and NUMA
memory policy come from this host's GPU topology (NVML + sysfs) when it holds the plan's GPUs, else only
`serve --numa-bind auto` binds each rank (run `plan --emit systemd` on the node itself to pin the service too)."""

from __future__ import annotations

import shlex
import shutil

from r1deploy.deploy.spec import DeployTarget, gib_ceil
from r1deploy.deploy.templates import render
from r1deploy.distributed.numa import NumaTopology

ENV_FILE = "r1deploy.env"
HEAD_PLACEHOLDER = "HEAD_NODE_IP"


def cpulist(cpus: frozenset[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def numa_section(t: DeployTarget, topology: NumaTopology) -> str:
    """CPUAffinity / NUMAPolicy for the NUMA nodes of the GPUs the node's ranks use (GPUs 0..n-1), when that
    is fewer nodes than the host has (else there is nothing to confine at the service level)."""
    nodes = topology.gpu_nodes[:t.gpus_per_node]
    if len(nodes) < t.gpus_per_node or None in nodes:
        return ("# CPUAffinity/NUMAPolicy: not set, this host does not show the plan's "
                f"{t.gpus_per_node} GPU(s) with their NUMA nodes; `serve --numa-bind auto` binds each rank\n")
    used = sorted(set(nodes))  # type: ignore[type-var]
    if len(used) == len(topology.node_cpus):
        return "# The GPUs sit on every NUMA node: `serve --numa-bind auto` binds each rank to its GPU's node\n"
    cpus = frozenset().union(*(topology.node_cpus[n] for n in used))
    policy = "preferred" if len(used) == 1 else "bind"
    return (f"# GPUs 0-{t.gpus_per_node - 1} sit on NUMA node(s) {','.join(map(str, used))}\n"
            f"CPUAffinity={cpulist(cpus)}\nNUMAPolicy={policy}\nNUMAMask={','.join(map(str, used))}\n")


def environment_file(t: DeployTarget) -> str:
    lines = ["# Read by the r1deploy units (EnvironmentFile=/etc/r1deploy/r1deploy.env).",
             "# Bearer key clients must send; empty = no key (keep the port private then).",
             "R1DEPLOY_API_KEY="]
    if t.multi_node:
        lines += ["# Node 0's address on the private rank network (every node).",
                  f"R1DEPLOY_MASTER_ADDR={HEAD_PLACEHOLDER}",
                  f"# At its load the plan sends {t.internode_bytes_per_s / 1e9:.0f} GB/s from each node to the others: "
                  "InfiniBand or RoCE; name the HCAs if NCCL picks the wrong ones, e.g. NCCL_IB_HCA=mlx5"]
    lines += [f"{k}={v}" for k, v in t.nccl_env().items()]
    return "\n".join(lines) + "\n"


def unit(t: DeployTarget, node_rank: int, topology: NumaTopology, executable: str) -> str:
    args = [executable, *t.serve_args()[1:]]
    if t.multi_node:
        args += ["--nnodes", str(t.nodes), "--node-rank", str(node_rank)]
    command = shlex.join(args)
    if t.multi_node:  # systemd expands ${VAR} from the EnvironmentFile
        command += " --master-addr ${R1DEPLOY_MASTER_ADDR}"
    return render("r1deploy.service", model=t.model, node_rank=node_rank, nodes=t.nodes,
                  unit=unit_name(t, node_rank), exec_start=command, memory_max=f"{gib_ceil(t.memory_limit_bytes)}G",
                  numa=numa_section(t, topology))


def unit_name(t: DeployTarget, node_rank: int) -> str:
    return f"r1deploy-{t.name}" + (f"-node{node_rank}" if t.multi_node else "") + ".service"


def emit(t: DeployTarget, topology: NumaTopology, executable: str | None = None) -> dict[str, str]:
    executable = executable or shutil.which("r1deploy") or "/usr/local/bin/r1deploy"
    files = {unit_name(t, r): unit(t, r, topology, executable) for r in range(t.nodes)}
    files[ENV_FILE] = environment_file(t)
    return files
