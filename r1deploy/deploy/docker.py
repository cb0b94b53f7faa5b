"""`--emit docker`: a Dockerfile for the planned model on NVIDIA GPUs and Dockerfile.cpu for the embedded model."""

from __future__ import annotations

import json

from r1deploy.deploy.spec import MODEL_CACHE, STARTUP_GRACE_S, DeployTarget, gib_ceil
from r1deploy.deploy.templates import render

CPU_PORT = 8000


def cpu_command(port: int = CPU_PORT) -> list[str]:
    """The CPU image's command: the embedded model, every interface, no GPU."""
    return ["r1deploy", "serve", "--host", "0.0.0.0", "--port", str(port), "--device", "cpu"]  # noqa: S104


def emit(target: DeployTarget) -> dict[str, str]:
    cuda = render("Dockerfile.cuda", model=target.model, image=target.image, port=target.port, cache=MODEL_CACHE,
                  shm=f"{gib_ceil(target.shm_bytes)}g", grace=STARTUP_GRACE_S,
                  cmd=json.dumps(target.serve_args()))
    cpu = render("Dockerfile.cpu", port=CPU_PORT, cmd=json.dumps(cpu_command()))
    return {"Dockerfile": cuda, "Dockerfile.cpu": cpu}
