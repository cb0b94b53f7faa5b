"""`--emit compose`: compose.yaml for one node: GPU reservations, shared memory, the model-cache volume, the port."""

from __future__ import annotations

from typing import Any

import yaml

from r1deploy.deploy.spec import MODEL_CACHE, STARTUP_GRACE_S, DeployTarget, gib_ceil
from r1deploy.errors import UsageError


def compose_dict(target: DeployTarget) -> dict[str, Any]:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{target.port}/health/ready', timeout=4)"
    service: dict[str, Any] = {
        "image": target.image,
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "command": target.serve_args(),
        "ports": [f"{target.port}:{target.port}"],
        "shm_size": f"{gib_ceil(target.shm_bytes)}gb",
        # Pinned (page-locked) host buffers for copies and offload tiers need an unlimited memlock.
        "ulimits": {"memlock": -1},
        "volumes": [f"model-cache:{MODEL_CACHE}"],
        "environment": {"R1DEPLOY_API_KEY": "${R1DEPLOY_API_KEY:-}", **target.nccl_env()},
        "mem_limit": f"{gib_ceil(target.memory_limit_bytes)}g",
        "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": target.gpus_per_node, "capabilities": ["gpu"]}]}}},
        "healthcheck": {"test": ["CMD", "python", "-c", probe], "interval": "30s", "timeout": "5s",
                        "retries": 3, "start_period": f"{STARTUP_GRACE_S}s"},
        "restart": "on-failure",
        # serve drains in-flight requests on SIGTERM (--drain-timeout, 30 s by default)
        "stop_grace_period": "45s",
    }
    return {"name": target.name, "services": {"r1deploy": service}, "volumes": {"model-cache": {}}}


def emit(target: DeployTarget) -> dict[str, str]:
    if target.multi_node:
        raise UsageError(f"the plan spans {target.nodes} nodes; compose runs one host: use --emit k8s or slurm")
    header = f"# r1deploy serve for {target.model}, written by `r1deploy plan --emit compose`: docker compose up -d\n"
    return {"compose.yaml": header + yaml.safe_dump(compose_dict(target), sort_keys=False)}
