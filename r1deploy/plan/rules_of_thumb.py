"""The seed guide's sizing rules of thumb, evaluated next to the planner (shared reference planning.md §4).

(a) GPUs = ceil(params_B x 4 / GPU_GB) x 1.2-1.5: FP32 bytes, no KV cache, non-integer counts.
(b) VRAM = params_B x 2 + batch x seq x 4 / 1024^2 + 10%: a KV term of 4 bytes per token.
(c) "one A100 40GB serves a 70B model in FP16 in real time".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from r1deploy.plan.catalog import GB, Catalog
from r1deploy.plan.memory import weights_bytes_total

if TYPE_CHECKING:
    from r1deploy.plan.planner import Plan

RULE_A_FACTORS = (1.2, 1.5)
RULE_B_MARGIN = 1.1
RULE_C_MODEL = "r1-distill-llama-70b"
RULE_C_GPU = "a100-40gb"


def rule_checks(plan: Plan) -> list[str]:
    from r1deploy.plan.planner import make_plan  # deferred: planner -> report -> here would be circular

    s, c = plan.settings, plan.chosen
    m, gpu, perf = s.model, c.gpu, c.perf
    assert perf is not None
    params_b = m.total_params / 1e9
    gpu_gb = gpu.memory_bytes / GB
    base = math.ceil(params_b * 4 / gpu_gb)
    lo, hi = (base * f for f in RULE_A_FACTORS)
    batch = perf.concurrency / c.layout.replicas
    seq = s.workload.tokens_per_request
    kv_rule = batch * seq * 4 / 1024**2  # the rule's "GB"
    kv_real = batch * seq * c.memory.kv_bytes_per_token / GB
    vram_rule = (params_b * 2 + kv_rule) * RULE_B_MARGIN
    real_total = (weights_bytes_total(m, s.precision) / GB + kv_real)
    lines = [
        (f"(a) ceil({params_b:.1f} x 4 / {gpu_gb:.0f}) x 1.2-1.5 = {base} x 1.2-1.5 = {lo:.1f}-{hi:.1f} GPUs; planner: "
        f"{c.layout.num_gpus} ({c.layout.describe()}). The rule uses FP32 (4 B/param; serving uses "
        f"{s.precision.weights}), has no KV term, and gives counts that are not valid TP sizes."),
        (f"(b) {params_b:.1f} x 2 + {batch:.0f} x {seq} x 4 / 1024^2 = KV term {kv_rule:.2f} GB, total "
        f"{vram_rule:,.0f} GB; real KV for that batch = {batch:.0f} x {seq} x {c.memory.kv_bytes_per_token:,} B = "
        f"{kv_real:,.1f} GB ({kv_real / kv_rule:,.0f}x the rule's term), weights + KV = {real_total:,.0f} GB."),
    ]
    plan70 = make_plan(RULE_C_MODEL, RULE_C_GPU, weights="bf16", concurrency=1, input_len=1024, output_len=1024)
    c70 = plan70.chosen
    w70 = weights_bytes_total(plan70.settings.model, plan70.settings.precision) / GB
    a100 = Catalog.load().get(RULE_C_GPU)
    usable = a100.memory_bytes * s.gpu_memory_utilization / GB
    floor_ms = w70 * GB / (c70.layout.num_gpus * a100.bandwidth_bytes_s) * 1e3
    lines.append(
        f"(c) 70B in FP16 = {w70:.0f} GB of weights vs {usable:.0f} GB usable on one A100 40GB: it does not load. "
        f"Fewest A100 40GB: {c70.layout.num_gpus} ({c70.layout.describe()}), decode floor {w70:.0f} GB / "
        f"({c70.layout.num_gpus} x {a100.memory_bandwidth_tb_s} TB/s) = {floor_ms:.1f} ms/token.")
    return lines
