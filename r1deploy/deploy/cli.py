"""`r1deploy plan --emit FORMAT --out DIR`: the flags, and writing each format's files for the plan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from r1deploy.deploy.spec import DEFAULT_HTTP_PORT, DEFAULT_IMAGE, DeployTarget, target_from_plan
from r1deploy.errors import UsageError

FORMATS = ("docker", "compose", "k8s", "systemd", "slurm")


def add_emit_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment files (docs/deploy.md)")
    g.add_argument("--emit", choices=FORMATS, action="append",
                   help="write deployment files for the plan into --out (repeat for several formats)")
    g.add_argument("--out", metavar="DIR", help="with --emit: the directory to write (created if missing)")
    g.add_argument("--image", default=DEFAULT_IMAGE, help=f"with --emit: container image (default {DEFAULT_IMAGE})")
    g.add_argument("--model-path", metavar="PATH",
                   help="with --emit: the checkpoint directory on each node (default /models/<model name>)")
    g.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help="with --emit: the HTTP port (default 8000)")
    g.add_argument("--hpa", type=int, default=0, metavar="MAX_REPLICAS",
                   help="with --emit k8s, one node: add a HorizontalPodAutoscaler on the request queue")


def files_for(fmt: str, target: DeployTarget) -> dict[str, str]:
    """{file name: text} of one format."""
    if fmt == "docker":
        from r1deploy.deploy import docker

        return docker.emit(target)
    if fmt == "compose":
        from r1deploy.deploy import compose

        return compose.emit(target)
    if fmt == "k8s":
        from r1deploy.deploy import k8s

        return k8s.emit(target)
    if fmt == "systemd":
        from r1deploy.deploy import systemd
        from r1deploy.distributed.numa import probe_topology

        return systemd.emit(target, probe_topology())
    from r1deploy.deploy import slurm

    return slurm.emit(target)


def emit_files(plan: dict[str, Any], args: argparse.Namespace) -> int:
    if not args.out:
        raise UsageError("--emit needs --out DIR")
    if args.hpa and "k8s" not in args.emit:
        raise UsageError("--hpa applies to --emit k8s")
    target = target_from_plan(plan, model_path=args.model_path, image=args.image, port=args.port,
                              hpa_max_replicas=args.hpa)
    if target.multi_node and args.hpa:
        raise UsageError("--hpa scales single-node Deployments; this plan spans several nodes")
    files = {name: text for fmt in dict.fromkeys(args.emit) for name, text in files_for(fmt, target).items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
        if name.endswith(".sbatch"):
            (out / name).chmod(0o755)
    print(f"wrote {', '.join(str(out / n) for n in files)} for {target.model} "
          f"({target.nodes} node(s) x {target.gpus_per_node} GPU(s))")
    return 0
