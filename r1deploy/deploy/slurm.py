"""`--emit slurm`: an sbatch script, one task per node, each running the same `r1deploy serve` line."""

from __future__ import annotations

import shlex

from r1deploy.deploy.spec import DeployTarget, gib_ceil
from r1deploy.deploy.templates import render

SCRIPT = "r1deploy.sbatch"


def emit(t: DeployTarget) -> dict[str, str]:
    env = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in t.nccl_env().items())
    script = render("sbatch.sh", model=t.model, model_path=t.model_path, name=t.name, nodes=t.nodes,
                    gpus=t.gpus_per_node, cpus=t.cpu_cores, mem=f"{gib_ceil(t.memory_limit_bytes)}G", port=t.port,
                    master_port=t.master_port, env=env, script=SCRIPT, command=shlex.join(t.serve_args()))
    return {SCRIPT: script}
