"""`r1deploy doctor`: argparse wiring; host facts come from host.py, judgements from checks.py, output from
report.py. The CLI imports this module at startup, so it stays light: no torch, and pynvml and rich load only
when used."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from r1deploy.doctor.checks import FAIL, check_allreduce, run_checks
from r1deploy.doctor.host import collect_host
from r1deploy.doctor.report import print_report, report_dict
from r1deploy.doctor.requirements import Requirements, load_plan, requirements_from_plan
from r1deploy.errors import UsageError

DEFAULT_CACHE_DIR = Path("~/.cache/r1deploy")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="inspect this host and check it against a plan",
        description="Inspect this host (CPU, RAM, NUMA, cgroup limits, disk with a sequential-read test, "
        "NVIDIA GPUs and their topology) and check it against a plan's host and GPU requirements. "
        "Exit code: 0 when no check fails (warnings allowed), 1 when any check fails, "
        "2 on a usage error.",
    )
    source = p.add_argument_group("plan to check against (none: report the host only)")
    source.add_argument(
        "--plan", type=Path, metavar="PLAN.json", help="a plan printed by `r1deploy plan --json`"
    )
    source.add_argument("--model", help="plan this model now (preset name, config.json or model directory)")
    source.add_argument("--gpu", help="GPU the plan assumes (with --model; default: the planner's)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: host, requirements, checks, summary"
    )
    p.add_argument(
        "--read-test-mib",
        type=int,
        default=256,
        metavar="N",
        help="size of the sequential-read test file written to --path (default 256; 0 skips the test)",
    )
    p.add_argument(
        "--path",
        type=Path,
        metavar="DIR",
        help=f"model/cache directory whose disk is checked (default {DEFAULT_CACHE_DIR} if it exists, "
        "else the current directory)",
    )
    p.add_argument(
        "--allreduce",
        action="store_true",
        help="measure NCCL all-reduce bus bandwidth between this host's GPUs (about 10 s) and compare it "
        "with the link bandwidth the plan assumes",
    )
    p.add_argument(
        "--server",
        type=int,
        metavar="PID",
        help="also check a running `r1deploy serve`: each GPU rank's CPU set and memory policy against its "
        "GPU's NUMA node (serve --numa-bind), and its cgroup limits against the plan",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.read_test_mib < 0:
        raise UsageError("--read-test-mib must be 0 (skip) or a positive number of MiB")
    disk_path = _disk_path(args.path)
    requirements = _requirements(args)
    host = collect_host(disk_path, args.read_test_mib)
    checks = run_checks(host, requirements)
    if args.allreduce:
        checks.append(check_allreduce(host, requirements))
    if args.server is not None:
        from r1deploy.doctor.serving import check_server

        checks += check_server(args.server, host, requirements)
    if args.json:
        print(json.dumps(report_dict(host, requirements, checks), indent=2))
    else:
        print_report(host, requirements, checks)
    return 1 if any(c.status == FAIL for c in checks) else 0


def _disk_path(path: Path | None) -> Path:
    if path is None:
        default = DEFAULT_CACHE_DIR.expanduser()
        return default if default.is_dir() else Path.cwd()
    path = path.expanduser()
    if not path.is_dir():
        raise UsageError(f"--path {path} is not a directory")
    return path


def _requirements(args: argparse.Namespace) -> Requirements | None:
    if args.plan is not None:
        if args.model or args.gpu:
            raise UsageError("give either --plan or --model/--gpu, not both")
        return requirements_from_plan(load_plan(args.plan), source=str(args.plan))
    if args.model or args.gpu:
        # Imported here: only this path needs the planner, and the CLI imports doctor at every start.
        from r1deploy.plan.planner import plan_deployment

        options = {k: v for k, v in (("model", args.model), ("gpu", args.gpu)) if v}
        return requirements_from_plan(plan_deployment(**options), source="the planner")
    return None

