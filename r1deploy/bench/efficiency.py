"""MBU / MFU and planned-vs-measured, from the planner's bytes and FLOPs per token.

- MBU = bytes a decode step reads / step time / peak bandwidth, where bytes = weights +
  KV bytes per token x mean context x mean concurrency and step time = mean TPOT (Databricks'
  definition). For an MoE the planner's weights_bytes counts every expert, so MBU is an upper bound.
- MFU = 2 x active parameters x (input + output tokens) / duration / peak dense BF16 FLOPs.
  Active parameters (37B for R1, not 671B) because only the routed experts compute.
- mean concurrency = sum of E2E / duration; mean context = input + output / 2 tokens per request.
Peaks come from the planner's GPU catalog for the GPUs NVML sees, so MBU / MFU are only computed
when the model runs on this host's GPUs (in-process, or a server on the same machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1deploy.bench import planlink
from r1deploy.bench.metrics import Summary
from r1deploy.errors import UsageError


def gpu_peaks(names: Sequence[str]) -> tuple[float, float] | None:
    """(bytes/s, FLOP/s) summed over the GPUs, from the planner's catalog; None if any is unknown."""
    try:
        from r1deploy.plan.catalog import Catalog

        catalog = Catalog.load()
    except (ImportError, UsageError):  # no catalog: peaks unknown, MBU / MFU not computed
        return None
    bandwidth = flops = 0.0
    for name in names:
        spec = None
        for candidate in (name, name.removeprefix("NVIDIA "), name.removeprefix("NVIDIA ").replace(" ", "-")):
            try:
                spec = catalog.get(candidate.lower())
                break
            except UsageError:  # unknown under this spelling: try the next
                continue
        if spec is None:
            return None
        bandwidth += spec.bandwidth_bytes_s
        flops += spec.bf16_tflops * 1e12
    return (bandwidth, flops) if names else None


def compute(summary: Summary, plan: dict[str, Any] | None, gpu_names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"mbu_pct": None, "mfu_pct": None, "reason": None, "planned": {}}
    weights = planlink.get(plan, "memory.weights_bytes")
    kv_per_token = planlink.get(plan, "memory.kv_bytes_per_token")
    active = planlink.get(plan, "model.active_params")
    peaks = gpu_peaks(gpu_names)
    tpot = summary.latency("tpot", "mean")
    if plan is None:
        out["reason"] = "no plan for this model (planner unavailable or model unknown to it)"
    elif peaks is None:
        out["reason"] = "no local GPU known to the planner's catalog"
    elif summary.completed:
        bandwidth, flops = peaks
        duration = summary.duration_s
        mean_context = (summary.total_input_tokens + summary.total_output_tokens / 2) / summary.completed
        mean_concurrency = summary.completed * (summary.latency("e2e", "mean") or 0.0) / 1e3 / duration
        if weights and kv_per_token is not None and tpot:
            step_bytes = weights + kv_per_token * mean_context * max(mean_concurrency, 1.0)
            out["mbu_pct"] = 100.0 * step_bytes / (tpot / 1e3) / bandwidth
        if active:
            tokens = summary.total_input_tokens + summary.total_output_tokens
            out["mfu_pct"] = 100.0 * 2 * active * tokens / duration / flops
        out.update(mean_context_tokens=mean_context, mean_concurrency=mean_concurrency)
    out["planned"] = planned_vs_measured(summary, plan)
    out["planned_for"] = planlink.deployment_hint(plan)
    return out


def planned_vs_measured(summary: Summary, plan: dict[str, Any] | None) -> dict[str, Any]:
    """Planner predictions beside the measured medians (the planner's calibration input)."""
    pairs = {
        "ttft_ms": (planlink.get(plan, "performance.ttft_s"), summary.latency("ttft", "p50")),
        "tpot_ms": (planlink.get(plan, "performance.tpot_s"), summary.latency("tpot", "p50")),
        "output_tokens_per_s": (planlink.get(plan, "performance.output_tokens_per_s"), summary.output_throughput),
    }
    out = {}
    for key, (planned, measured) in pairs.items():
        if isinstance(planned, (int, float)) and key.endswith("_ms"):
            planned = planned * 1e3
        out[key] = {"planned": planned, "measured": measured,
                    "measured_over_planned": measured / planned if planned and measured is not None else None}
    return out
