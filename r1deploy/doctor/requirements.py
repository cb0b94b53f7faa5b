"""What a plan asks of each host, read from `r1deploy plan --json` output (a file or the planner's dict)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1deploy.errors import UsageError


@dataclass(frozen=True)
class Requirements:
    """What a plan asks of each host. host.* values are per node, deployment.num_gpus is the total."""

    gpu: str
    num_gpus: int
    nodes: int
    gpu_memory_bytes: int
    fp8_compute: bool
    ram_bytes: int
    disk_bytes: int
    cpu_cores: int
    load_time_s: float
    disk_read_bytes_per_s: float
    internode_bytes_per_s: float
    total_params: int
    weights_bytes: int
    # The engine profile the plan predicts (deployment.engine; None: the datasheet roofline or an older plan)
    # and the model's calibration family ("moe" for MoE/MLA models): which factors the link checks assume.
    engine: str | None = None
    family: str = "dense"

    @property
    def gpus_per_node(self) -> int:
        return math.ceil(self.num_gpus / self.nodes)


# Requirements field -> (plan key, expected type). A number is int or float, never bool.
_PLAN_KEYS: dict[str, tuple[str, type]] = {
    "gpu": ("deployment.gpu", str),
    "num_gpus": ("deployment.num_gpus", int),
    "nodes": ("deployment.nodes", int),
    "gpu_memory_bytes": ("deployment.gpu_memory_bytes", int),
    "fp8_compute": ("deployment.fp8_compute", bool),
    "ram_bytes": ("host.ram_bytes", int),
    "disk_bytes": ("host.disk_bytes", int),
    "cpu_cores": ("host.cpu_cores", int),
    "load_time_s": ("host.load_time_s", float),
    "disk_read_bytes_per_s": ("host.disk_read_bytes_per_s", float),
    "internode_bytes_per_s": ("host.internode_bytes_per_s", float),
    "total_params": ("model.total_params", int),
    "weights_bytes": ("memory.weights_bytes", int),
}


def load_plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read plan file {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"plan file {path} is not JSON: {exc}") from exc
    if not isinstance(plan, dict):
        raise UsageError(f"plan file {path} must hold one JSON object, as `r1deploy plan --json` prints")
    return plan


def requirements_from_plan(plan: dict[str, Any], source: str) -> Requirements:
    engine = (plan.get("deployment") or {}).get("engine")
    if engine is not None:
        from r1deploy.plan.engines import ENGINE_NAMES

        if engine not in ENGINE_NAMES:
            raise UsageError(f"{source}: deployment.engine {engine!r} is not one of {', '.join(ENGINE_NAMES)}")
    model = plan.get("model") or {}
    family = "moe" if model.get("moe") or model.get("attention") == "MLA" else "dense"
    req = Requirements(
        **{field: _plan_value(plan, key, kind, source) for field, (key, kind) in _PLAN_KEYS.items()},
        engine=engine, family=family,
    )
    if req.nodes < 1 or req.num_gpus < 0:
        raise UsageError(
            f"{source}: deployment.nodes must be at least 1 and deployment.num_gpus not negative"
        )
    return req


def assumed_efficiency(req: Requirements) -> Any:
    """The efficiency factors the plan was made with: its engine's profile (deployment.engine), else the
    planner's defaults."""
    from r1deploy.plan.roofline import Efficiency

    if req.engine is None:
        return Efficiency()
    from r1deploy.plan.engines import load_engine

    return load_engine(req.engine).family_eff(req.family)


def _plan_value(plan: dict[str, Any], key: str, kind: type, source: str) -> Any:
    value: Any = plan
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UsageError(f"{source} has no key {key!r} (expected the output of `r1deploy plan --json`)")
        value = value[part]
    numeric = kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (numeric or (kind in (str, bool) and isinstance(value, kind))):
        raise UsageError(
            f"{source}: {key!r} must be {'a number' if kind in (int, float) else kind.__name__}, "
            f"not {value!r}"
        )
    return value

