"""What every deployment file says, read once from a plan (`r1deploy plan --json`) and the --emit options.

The emitters (docker, compose, k8s, systemd, slurm) only format a DeployTarget; the serve command line they
all run is built here, from the flags `r1deploy serve` really has (server/cli.py, docs/distributed.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.launch import HF_REPOS, PORT, serve_runs_layout

DEFAULT_IMAGE = "r1deploy:latest"
DEFAULT_HTTP_PORT = 8000
MODEL_CACHE = "/models"  # where the model-cache volume is mounted in containers
# Pinned host buffers and NCCL's shared-memory transport live in /dev/shm; Docker's default is 64 MiB.
SHM_BYTES_PER_GPU = 8 << 30
# A host's memory limit is the plan's need plus this share: page cache, tokenizers and Python heap vary.
MEMORY_HEADROOM = 1.25
# Model loading can take minutes (R1 reads ~700 GB); probes and health checks wait this long first.
STARTUP_GRACE_S = 1800


@dataclass(frozen=True)
class DeployTarget:
    name: str  # a DNS-1123 label: Kubernetes object names, the compose project, unit file names
    model: str  # the plan's model (preset name or config path)
    model_path: str  # the checkpoint directory on each node (in containers: under MODEL_CACHE)
    image: str
    port: int
    tp: int
    nodes: int
    gpus_per_node: int  # ranks per node (serve's --nproc-per-node)
    dp_attention: bool
    max_model_len: int
    fp8_kv_cache: bool
    ram_bytes: int  # per node, from the plan
    cpu_cores: int  # per node, from the plan
    disk_bytes: int  # the checkpoint on each node, from the plan
    internode_bytes_per_s: float  # what each node sends to the others at the planned load
    master_port: int = PORT
    hpa_max_replicas: int = 0  # 0: no HorizontalPodAutoscaler

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def memory_limit_bytes(self) -> int:
        return int(self.ram_bytes * MEMORY_HEADROOM)

    @property
    def shm_bytes(self) -> int:
        return SHM_BYTES_PER_GPU * max(self.gpus_per_node, 1)

    def serve_args(self, host: str = "0.0.0.0") -> list[str]:  # noqa: S104 - a container's or node's address
        """`r1deploy serve ...` for every node. The node's rank, node 0's address and the rendezvous port
        come from the launcher's environment (LWS, Slurm, torchrun: distributed/launcher_env.py), so one
        command runs on every node; --master-port is given because LWS sets no port."""
        args = ["r1deploy", "serve", self.model_path, "--host", host, "--port", str(self.port),
                "--max-model-len", str(self.max_model_len)]
        if self.tp > 1:
            args += ["--tp", str(self.tp)]
        if self.dp_attention:
            args.append("--dp-attention")
        if self.multi_node:
            args += ["--nproc-per-node", str(self.gpus_per_node), "--master-port", str(self.master_port)]
        if self.fp8_kv_cache:
            args += ["--kv-cache-dtype", "fp8"]
        return args

    def nccl_env(self) -> dict[str, str]:
        """NCCL settings the plan implies: warnings only in the logs; InfiniBand on between nodes (the plan
        assumes a fast inter-node fabric). The socket interface is chosen by serve itself (the route to node 0)."""
        env: dict[str, str] = {}
        if self.tp > 1:
            env["NCCL_DEBUG"] = "WARN"
        if self.multi_node:
            env["NCCL_IB_DISABLE"] = "0"
        return env


def dns_label(text: str) -> str:
    """'DeepSeek-R1-Distill-Qwen-7B' -> 'deepseek-r1-distill-qwen-7b': lower case, [a-z0-9-], at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:63].strip("-") or "model"


def target_from_plan(plan: dict[str, Any], *, model_path: str | None = None, image: str = DEFAULT_IMAGE,
                     port: int = DEFAULT_HTTP_PORT, hpa_max_replicas: int = 0) -> DeployTarget:
    """The DeployTarget of a plan; UsageError for a layout r1deploy serve does not run (PP, replicas, EP != TP)."""
    if not serve_runs_layout(plan):
        raise UsageError(f"r1deploy serve does not run this layout ({plan['deployment']['layout']}): it runs TP "
                         "over one or more nodes with experts split over the TP ranks, no PP or replicas; "
                         "re-plan with --tp/--num-gpus")
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if hpa_max_replicas < 0:
        raise UsageError("--hpa must be a positive number of replicas")
    model, dep = plan["model"]["name"], plan["deployment"]
    repo = PurePosixPath(HF_REPOS.get(model, model))
    if repo.name == "config.json":  # a plan for a local model directory names its config file
        repo = repo.parent
    tp, nodes = dep["tp"], dep["nodes"]
    if tp % nodes:
        raise UsageError(f"TP {tp} over {nodes} nodes: serve runs the same number of ranks on every node")
    return DeployTarget(
        name=dns_label(repo.name), model=model, model_path=model_path or f"{MODEL_CACHE}/{repo.name}",
        image=image, port=port, tp=tp, nodes=nodes, gpus_per_node=tp // nodes,
        dp_attention=bool(dep["dp_attention"]), max_model_len=int(plan["workload"]["max_model_len"]),
        fp8_kv_cache=plan["precision"]["kv_cache_dtype"] == "fp8", ram_bytes=int(plan["host"]["ram_bytes"]),
        cpu_cores=int(plan["host"]["cpu_cores"]), disk_bytes=int(plan["host"]["disk_bytes"]),
        internode_bytes_per_s=float(plan["host"]["internode_bytes_per_s"]), hpa_max_replicas=hpa_max_replicas)


def gib_ceil(n: int) -> int:
    return max(1, math.ceil(n / (1 << 30)))
