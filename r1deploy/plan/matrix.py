"""`r1deploy plan --matrix`: the seed guide's hardware selection matrix, regenerated from the model.

One row per size band; each row is a full plan under one standard interactive workload and SLO,
once searching the whole catalog (cheapest) and once on H100 SXM (the common datacenter choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.planner import Plan, make_plan

BANDS = (
    ("1.5B", "r1-distill-qwen-1.5b"),
    ("7B", "r1-distill-qwen-7b"),
    ("8B", "r1-distill-llama-8b"),
    ("14B", "r1-distill-qwen-14b"),
    ("32B", "r1-distill-qwen-32b"),
    ("70B", "r1-distill-llama-70b"),
    ("671B", "deepseek-r1"),
)
# Interactive reasoning chat: 32 users, 2K-token prompts, 4K-token answers; TPOT 50 ms = 20 tok/s per user
# (DeepSeek's own service runs at 20-22 tok/s per user), p99 TTFT 3 s.
MATRIX_WORKLOAD: dict[str, Any] = {"concurrency": 32, "input_len": 2048, "output_len": 4096,
                                   "slo_ttft_ms": 3000.0, "slo_tpot_ms": 50.0}
DATACENTER_GPU = "h100-sxm"


@dataclass(frozen=True)
class MatrixRow:
    band: str
    preset: str
    cheapest: Plan
    datacenter: Plan | None  # None: no H100 deployment meets the SLO


def build_matrix(**options: Any) -> list[MatrixRow]:
    rows = []
    for band, preset in BANDS:
        opts = {**MATRIX_WORKLOAD, **options}
        cheapest = make_plan(preset, "auto", **opts)
        try:
            datacenter = make_plan(preset, DATACENTER_GPU, **opts)
        except UsageError:
            datacenter = None
        rows.append(MatrixRow(band, preset, cheapest, datacenter))
    return rows


def row_dict(row: MatrixRow) -> dict[str, Any]:
    return {"band": row.band, "preset": row.preset, "cheapest": row.cheapest.to_dict(),
            "datacenter": row.datacenter.to_dict() if row.datacenter else None}
