"""The node layout a launcher gives `r1deploy serve` through its environment, so one image or command runs
under torchrun, LeaderWorkerSet and Slurm without a wrapper script. Explicit flags win over the environment.

serve starts one process per GPU itself, so each launcher runs one serve per node:
- torchrun --nproc-per-node 1: WORLD_SIZE = nodes, RANK = this node, MASTER_ADDR / MASTER_PORT. torchrun's own
  agent holds a store on MASTER_PORT (TORCHELASTIC_RUN_ID set), so serve's ranks meet on MASTER_PORT + 1.
- LeaderWorkerSet: LWS_GROUP_SIZE = nodes, LWS_WORKER_INDEX = this node (0 = the leader),
  LWS_LEADER_ADDRESS = node 0; no port (give --master-port).
- Slurm, inside `srun` with one task per node: SLURM_NNODES, SLURM_NODEID; node 0's address from MASTER_ADDR or
  the first host of SLURM_JOB_NODELIST; the port from MASTER_PORT.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from r1deploy.errors import UsageError

# serve's own defaults for the four layout flags, used when neither a flag nor a launcher sets them.
DEFAULTS = {"nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": 0}
FLAGS = {"nnodes": "--nnodes", "node_rank": "--node-rank", "master_addr": "--master-addr",
         "master_port": "--master-port"}


@dataclass(frozen=True)
class LauncherLayout:
    launcher: str
    nnodes: int
    node_rank: int
    master_addr: str | None
    master_port: int | None
    sources: Mapping[str, str]  # field -> the variable(s) it came from, for messages

    def values(self) -> dict[str, object]:
        """The fields this launcher sets: node 0's address and port only for several nodes (one node
        keeps its ranks on loopback)."""
        values: dict[str, object] = {"nnodes": self.nnodes, "node_rank": self.node_rank}
        if self.nnodes > 1:
            values.update({k: v for k, v in (("master_addr", self.master_addr), ("master_port", self.master_port))
                           if v is not None})
        return values


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"${name}={env[name]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'a1,a2' -> 'a1'."""
    match = re.match(r"([^,\[]*)(?:\[([^\],-]+)[^\]]*\]([^,]*))?", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise UsageError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, first, suffix = match.groups()
    return prefix + (first or "") + (suffix or "")


def _torchrun(env: Mapping[str, str]) -> LauncherLayout:
    per_node = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    if per_node > 1 or local_rank > 0:
        raise UsageError("run one serve per node under torchrun (--nproc-per-node 1): serve starts a process per "
                         f"GPU itself; this is LOCAL_RANK {local_rank} of {per_node} on this node")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if port is not None and "TORCHELASTIC_RUN_ID" in env:
        port += 1  # torchrun's agent serves its rendezvous store on MASTER_PORT itself
    return LauncherLayout("torchrun", _int(env, "WORLD_SIZE"), _int(env, "RANK"), env.get("MASTER_ADDR"), port,
                          {"nnodes": "$WORLD_SIZE", "node_rank": "$RANK", "master_addr": "$MASTER_ADDR",
                           "master_port": "$MASTER_PORT" + (" + 1" if "TORCHELASTIC_RUN_ID" in env else "")})


def _lws(env: Mapping[str, str]) -> LauncherLayout:
    return LauncherLayout("LeaderWorkerSet", _int(env, "LWS_GROUP_SIZE"), _int(env, "LWS_WORKER_INDEX"),
                          env.get("LWS_LEADER_ADDRESS"), None,
                          {"nnodes": "$LWS_GROUP_SIZE", "node_rank": "$LWS_WORKER_INDEX",
                           "master_addr": "$LWS_LEADER_ADDRESS"})


def _slurm(env: Mapping[str, str]) -> LauncherLayout:
    nnodes_var = "SLURM_NNODES" if "SLURM_NNODES" in env else "SLURM_JOB_NUM_NODES"
    nnodes = _int(env, nnodes_var)
    if "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > nnodes:
        raise UsageError(f"run one serve task per node under Slurm (--ntasks-per-node=1): serve starts a process "
                         f"per GPU itself; this step has SLURM_NTASKS={env['SLURM_NTASKS']} on {nnodes} node(s)")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    return LauncherLayout("Slurm", nnodes, _int(env, "SLURM_NODEID"), addr, port,
                          {"nnodes": f"${nnodes_var}", "node_rank": "$SLURM_NODEID",
                           "master_addr": "$MASTER_ADDR" if "MASTER_ADDR" in env else "$SLURM_JOB_NODELIST",
                           "master_port": "$MASTER_PORT"})


def detect(env: Mapping[str, str]) -> LauncherLayout | None:
    """The launcher whose variables are set; torchrun first (it may run inside Slurm or a pod), then LWS,
    then a Slurm job step (SLURM_STEP_ID: inside srun, not the batch script's own shell)."""
    if "WORLD_SIZE" in env and "RANK" in env:
        return _torchrun(env)
    if "LWS_GROUP_SIZE" in env and "LWS_WORKER_INDEX" in env:
        return _lws(env)
    if "SLURM_STEP_ID" in env and "SLURM_NODEID" in env and ({"SLURM_NNODES", "SLURM_JOB_NUM_NODES"} & env.keys()):
        return _slurm(env)
    return None


def resolve(flags: Mapping[str, object | None], env: Mapping[str, str]) -> tuple[dict[str, object], list[str]]:
    """The four layout values (nnodes, node_rank, master_addr, master_port) from the flags given (None: not
    given), else the launcher's environment, else serve's defaults; plus one line per flag that overrode a
    different launcher value and one saying what the launcher set."""
    layout = detect(env)
    from_env = layout.values() if layout else {}
    values, notes = {}, []
    for field, default in DEFAULTS.items():
        given = flags.get(field)
        values[field] = given if given is not None else from_env.get(field, default)
        if given is not None and field in from_env and from_env[field] != given:
            assert layout is not None
            notes.append(f"{FLAGS[field]} {given} given: it wins over {layout.launcher}'s "
                         f"{layout.sources[field]} ({from_env[field]})")
    used = [f"{FLAGS[f]} {v} ({layout.sources[f]})" for f, v in from_env.items()
            if layout and flags.get(f) is None]
    if used:
        assert layout is not None
        notes.append(f"{layout.launcher} launch: " + ", ".join(used))
    return values, notes
