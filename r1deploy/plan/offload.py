"""Expert offload on one GPU: the GPU keeps the non-expert weights, the KV cache and a budget of routed-expert
slots; every expert lives in pinned host memory. Predicts decode tokens/s from the GPU roofline, the PCIe and
host memory bandwidth, and the expected expert-cache hit rate.

Per decode step of B sequences (README "Planner method", expert offload):
  touched per MoE layer T = E x (1 - (1 - k/E)^B)           (roofline.experts_touched, uniform routing)
  hit rate h = min(1, slots / (E x L_moe))                  (LRU, independent uniform routing)
  misses = T x L_moe x (1 - h)
  per miss: copy = expert bytes / PCIe (one direction)
            host = max(2 x params x B k / T / host FLOP/s, expert bytes / host BW) + activations over PCIe
            the cheaper of the two
  step = GPU roofline step + step overhead + misses x per-miss - min(overlap x misses x per-miss, GPU step)
  decode tokens/s = B / step
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import GB, GiB, GpuSpec
from r1deploy.plan.memory import (
    activation_bytes,
    kv_bytes_per_token_per_gpu,
    overhead_bytes,
    weights_bytes_per_gpu,
)
from r1deploy.plan.parallel import Layout
from r1deploy.plan.roofline import ACT_BYTES, decode_stage, experts_touched, stage_cost
from r1deploy.plan.search import Settings

OFFLOAD_MODES = ("experts",)
DEFAULT_HOST_BANDWIDTH_GBS = 200.0  # host DRAM actually streamed by the CPU (e.g. 8-12 DDR5 channels)
DEFAULT_HOST_TFLOPS = 2.0  # CPU BF16/INT8 matmul throughput for small-batch expert GEMMs (AMX-class host)
HOST_RAM_EXTRA_BYTES = 16 * GiB + 6 * GiB  # OS + engine (host.py's per-node and per-GPU allowances)
_NON_EXPERT = ("attention", "dense_mlp", "shared_experts", "router", "norm", "embedding", "lm_head")


@dataclass(frozen=True)
class OffloadPlan:
    mode: str
    gpu: str
    concurrency: int
    gpu_weight_budget_bytes: int  # as asked
    expert_bytes_total: int  # all routed experts, all MoE layers
    expert_bytes_each: float
    expert_slots: int  # experts the budget holds on the GPU (capped at all of them)
    experts_total: int  # E x MoE layers
    experts_on_host_only_bytes: int  # expert bytes not resident on the GPU
    nonexpert_bytes: int
    activation_bytes: int
    overhead_bytes: int
    usable_bytes: int
    kv_budget_bytes: int
    kv_needed_bytes: int
    max_concurrency: int  # requests of input + output tokens the KV budget holds
    touched_per_layer: float
    hit_rate: float
    misses_per_step: float
    miss_path: str  # "pcie_copy" or "host_compute"
    copy_s_per_expert: float
    host_s_per_expert: float
    gpu_step_s: float
    miss_s: float
    step_s: float
    decode_tokens_per_s: float
    tokens_per_s_per_user: float
    pcie_bytes_per_token: float
    pcie_bytes_per_s_one_direction: float
    host_bandwidth_bytes_per_s: float
    host_flops: float
    prefetch_overlap: float
    host_pinned_bytes: int
    host_ram_bytes: int
    feasible: bool
    problem: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_offload(s: Settings, gpu: GpuSpec, gpu_weight_budget_gb: float, *, mode: str = "experts",
                 host_bandwidth_gbs: float = DEFAULT_HOST_BANDWIDTH_GBS, pcie_gbs: float | None = None,
                 host_tflops: float = DEFAULT_HOST_TFLOPS, prefetch_overlap: float = 0.0) -> OffloadPlan:
    m, w = s.model, s.workload
    if mode not in OFFLOAD_MODES:
        raise UsageError(f"--offload {mode!r}: supported: {', '.join(OFFLOAD_MODES)}")
    if not m.moe:
        raise UsageError(f"--offload experts needs a MoE model; {m.name} is dense")
    if w.concurrency is None:
        raise UsageError("--offload predicts decode at a fixed --concurrency; drop --request-rate")
    for flag, value in (("--gpu-weight-budget", gpu_weight_budget_gb), ("--host-bandwidth-gbs", host_bandwidth_gbs),
                        ("--host-tflops", host_tflops)):
        if value < 0 or (value == 0 and flag != "--gpu-weight-budget"):
            raise UsageError(f"{flag} must be positive")
    if pcie_gbs is not None and pcie_gbs <= 0:
        raise UsageError("--pcie-gbs must be positive")
    if not 0 <= prefetch_overlap <= 1:
        raise UsageError("--prefetch-overlap must be in [0, 1]")

    layout = Layout(1, 1, 1, 1, False, s.gpus_per_node)
    n_experts = m.n_routed_experts * m.num_moe_layers
    expert_total = weights_bytes_per_gpu(m, s.precision, layout, parts=("routed_experts",))
    each = expert_total / n_experts
    budget = int(gpu_weight_budget_gb * GB)
    slots = min(n_experts, int(budget // each))
    resident = slots * each
    nonexpert = weights_bytes_per_gpu(m, s.precision, layout, parts=_NON_EXPERT)
    act, over = activation_bytes(m, layout), overhead_bytes(layout)
    usable = int(gpu.memory_bytes * s.gpu_memory_utilization)
    kv_budget = int(usable - nonexpert - act - over - resident)
    kv_token = kv_bytes_per_token_per_gpu(m, s.precision, layout)
    b = w.concurrency
    kv_needed = b * w.tokens_per_request * kv_token
    max_conc = max(0, kv_budget) // kv_token // w.tokens_per_request
    problem = None
    if kv_budget < max(kv_needed, w.max_model_len * kv_token):
        problem = (f"KV cache for {b} x {w.tokens_per_request:,} tokens needs {kv_needed / GB:,.1f} GB but "
                   f"{max(kv_budget, 0) / GB:,.1f} GB is left after non-expert weights {nonexpert / GB:,.1f} GB, "
                   f"expert slots {resident / GB:,.1f} GB, activations and overhead on {gpu.name} "
                   f"(fits {max_conc} concurrent); lower --gpu-weight-budget or --concurrency")

    # Misses: T x L touched experts per step, each resident with probability h.
    touched = m.n_routed_experts * experts_touched(m, b)
    hit = min(1.0, slots / n_experts)
    misses = touched * m.num_moe_layers * (1 - hit)
    pcie = (pcie_gbs if pcie_gbs is not None else gpu.pcie_gb_s / 2) * GB
    host_bw, host_flops = host_bandwidth_gbs * GB, host_tflops * 1e12
    copy_s = each / pcie
    tokens_per_expert = b * m.num_experts_per_tok / touched
    params_each = m.routed_expert_params / n_experts
    act_bytes = 2 * tokens_per_expert * m.hidden_size * ACT_BYTES  # hidden states there and back
    host_s = max(2 * params_each * tokens_per_expert / host_flops, each / host_bw) + act_bytes / pcie
    path = "pcie_copy" if copy_s <= host_s else "host_compute"
    per_miss = min(copy_s, host_s)
    gpu_step = decode_stage(stage_cost(m, s.precision, layout, gpu, s.eff), b, w.mean_context).total_s
    miss_s = misses * per_miss
    step = gpu_step + s.eff.step_overhead_s + miss_s - min(prefetch_overlap * miss_s, gpu_step)
    pcie_per_step = misses * (each if path == "pcie_copy" else act_bytes)
    return OffloadPlan(
        mode=mode, gpu=gpu.name, concurrency=b, gpu_weight_budget_bytes=budget, expert_bytes_total=expert_total,
        expert_bytes_each=each, expert_slots=slots, experts_total=n_experts,
        experts_on_host_only_bytes=int(expert_total - resident), nonexpert_bytes=nonexpert, activation_bytes=act,
        overhead_bytes=over, usable_bytes=usable, kv_budget_bytes=kv_budget, kv_needed_bytes=kv_needed,
        max_concurrency=max_conc, touched_per_layer=touched, hit_rate=hit, misses_per_step=misses, miss_path=path,
        copy_s_per_expert=copy_s, host_s_per_expert=host_s, gpu_step_s=gpu_step, miss_s=miss_s, step_s=step,
        decode_tokens_per_s=b / step, tokens_per_s_per_user=1 / step, pcie_bytes_per_token=pcie_per_step / b,
        pcie_bytes_per_s_one_direction=pcie, host_bandwidth_bytes_per_s=host_bw, host_flops=host_flops,
        prefetch_overlap=prefetch_overlap, host_pinned_bytes=expert_total,
        host_ram_bytes=int(expert_total + HOST_RAM_EXTRA_BYTES), feasible=problem is None, problem=problem,
    )
