"""Offload on one GPU + host memory. `plan_offload` (--offload experts) and `plan_layer_offload` (--offload layers).

Expert offload: the GPU keeps the non-expert weights, the KV cache and a budget of routed-expert
slots; every expert lives in pinned host memory. Predicts decode tokens/s from the GPU roofline, the PCIe and
host memory bandwidth, and the expected expert-cache hit rate.

Per decode step of B sequences (README "Planner method", expert offload):
  touched per MoE layer T = E x (1 - (1 - k/E)^B)           (roofline.experts_touched, uniform routing)
  hit rate h = min(1, slots / (E x L_moe))                  (LRU, independent uniform routing)
  misses = T x L_moe x (1 - h)
  per miss: copy = expert bytes / PCIe (one direction, x PCIE_COPY_EFFICIENCY unless --pcie-gbs is given)
            host = max(2 x params x B k / T / host FLOP/s, expert bytes / host BW) + activations over PCIe
            which one follows the engine's cpu_compute: "never" (its default) copy, "always" host,
            "auto" the cheaper of the two
  step = GPU roofline step + step overhead + misses x per-miss - min(overlap x misses x per-miss, GPU step)
  decode tokens/s = B / step

Layer offload (weights/layer_stream.py): the GPU keeps the non-layer weights (embedding, lm_head, final norm),
the leading k layers and a ring of S = 2 slots of the largest streamed layer, k the most with
non-layer + layers[:k] + S x max(layers[k:]) <= budget; the other layers stream over PCIe on every step,
overlapped with compute (prefetch one layer ahead), so per decode step of B sequences
  streamed = sum(layers[k:]) bytes; copy = streamed / PCIe (one direction)
  step = max(GPU roofline step, copy) + step overhead;  decode tokens/s = B / step <= B x PCIe / streamed
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import GB, GiB, GpuSpec
from r1deploy.plan.memory import (
    CUDA_GRAPH_BYTES,
    activation_bytes,
    kv_bytes_per_token_per_gpu,
    overhead_bytes,
    weights_bytes_per_gpu,
)
from r1deploy.plan.parallel import Layout
from r1deploy.plan.roofline import ACT_BYTES, decode_stage, experts_touched, stage_cost
from r1deploy.plan.search import Settings

OFFLOAD_MODES = ("experts", "layers")
LAYER_SLOTS = 2  # the runtime ring (OffloadConfig.num_slots)
DEFAULT_HOST_BANDWIDTH_GBS = 200.0  # host DRAM actually streamed by the CPU (e.g. 8-12 DDR5 channels)
DEFAULT_HOST_TFLOPS = 2.0  # CPU BF16/INT8 matmul throughput for small-batch expert GEMMs (AMX-class host)
# Pinned host-to-GPU expert copies during decode moved 40.6 GB/s over an H200's PCIe Gen5 x16 (64 GB/s one
# direction in the catalog): R1 FP8 experts, 44 MB each (benchmarks/results/h200_r1_offload.json).
PCIE_COPY_EFFICIENCY = 0.63
CPU_COMPUTE_MODES = ("never", "always", "auto")  # the engine's OffloadConfig.cpu_compute
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
                 host_tflops: float = DEFAULT_HOST_TFLOPS, prefetch_overlap: float = 0.0,
                 cpu_compute: str = "never") -> OffloadPlan:
    m, w = s.model, s.workload
    if mode not in OFFLOAD_MODES or mode == "layers":  # layers: plan_layer_offload
        raise UsageError(f"--offload {mode!r}: supported here: experts")
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
    if cpu_compute not in CPU_COMPUTE_MODES:
        raise UsageError(f"--cpu-compute must be one of {', '.join(CPU_COMPUTE_MODES)}, got {cpu_compute!r}")

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
    pcie = (pcie_gbs if pcie_gbs is not None else gpu.pcie_gb_s / 2 * PCIE_COPY_EFFICIENCY) * GB
    host_bw, host_flops = host_bandwidth_gbs * GB, host_tflops * 1e12
    copy_s = each / pcie
    tokens_per_expert = b * m.num_experts_per_tok / touched
    params_each = m.routed_expert_params / n_experts
    act_bytes = 2 * tokens_per_expert * m.hidden_size * ACT_BYTES  # hidden states there and back
    host_s = max(2 * params_each * tokens_per_expert / host_flops, each / host_bw) + act_bytes / pcie
    if cpu_compute == "auto":
        path = "pcie_copy" if copy_s <= host_s else "host_compute"
    else:
        path = "host_compute" if cpu_compute == "always" else "pcie_copy"
    per_miss = copy_s if path == "pcie_copy" else host_s
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


@dataclass(frozen=True)
class LayerOffloadPlan:
    mode: str  # "layers"
    gpu: str
    concurrency: int
    gpu_weight_budget_bytes: int  # as asked
    num_layers: int
    resident_layers: int  # the leading layers kept on the GPU
    streamed_layers: int
    ring_slots: int
    slot_bytes: int  # the largest streamed layer
    layer_bytes: tuple[int, ...]  # each decoder layer's weights, in order
    nonlayer_bytes: int  # embedding, lm_head, final norm
    gpu_weights_bytes: int  # non-layer + resident layers + ring
    streamed_bytes_per_step: int  # every streamed layer, once per step
    activation_bytes: int
    overhead_bytes: int  # no CUDA graphs while layers stream
    usable_bytes: int
    kv_budget_bytes: int
    kv_needed_bytes: int
    max_concurrency: int
    gpu_step_s: float  # the one-GPU roofline decode step, all weights resident
    copy_s: float  # streamed bytes / PCIe
    step_s: float  # max(gpu step, copy) + step overhead
    bound: str  # "pcie" or "gpu"
    decode_tokens_per_s: float
    tokens_per_s_per_user: float
    pcie_bytes_per_token: float
    pcie_bytes_per_s_one_direction: float
    host_pinned_bytes: int  # the streamed layers
    host_ram_bytes: int
    feasible: bool
    problem: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_bytes"] = list(self.layer_bytes)
        return d


def layer_bytes(s: Settings) -> tuple[list[int], int]:
    """Each decoder layer's weight bytes on one GPU (dense layers first, as DeepSeek orders them) and the
    non-layer bytes, from the tensor-by-tensor spec at the plan's precision."""
    m = s.model
    per_scope = {"model": 0.0, "layer": 0.0, "dense": 0.0, "moe": 0.0}
    for t in m.tensors:
        if t.scope in per_scope:
            per_scope[t.scope] += s.precision.tensor_bytes(t) * t.copies
    dense = int(per_scope["layer"] + per_scope["dense"])
    moe = int(per_scope["layer"] + per_scope["moe"])
    return [dense] * m.num_dense_layers + [moe] * m.num_moe_layers, int(per_scope["model"])


def plan_layer_offload(s: Settings, gpu: GpuSpec, gpu_weight_budget_gb: float, *,
                       pcie_gbs: float | None = None, ring_slots: int = LAYER_SLOTS) -> LayerOffloadPlan:
    """--offload layers: the runtime's split (weights/layer_stream.resident_prefix) and a PCIe-bounded step."""
    m, w = s.model, s.workload
    if w.concurrency is None:
        raise UsageError("--offload predicts decode at a fixed --concurrency; drop --request-rate")
    if gpu_weight_budget_gb <= 0:
        raise UsageError("--gpu-weight-budget must be positive")
    if pcie_gbs is not None and pcie_gbs <= 0:
        raise UsageError("--pcie-gbs must be positive")
    layers, nonlayer = layer_bytes(s)
    budget = int(gpu_weight_budget_gb * GB)
    problem = None
    k = _resident_prefix(layers, nonlayer, budget, ring_slots)
    if k is None:
        k = 0
        problem = (f"--gpu-weight-budget {gpu_weight_budget_gb:g} GB is below the non-layer weights "
                   f"{nonlayer / GB:,.1f} GB + {ring_slots} layer slots of {max(layers) / GB:,.2f} GB")
    streamed = layers[k:]
    slot = max(streamed) if streamed else 0
    ring = ring_slots if streamed else 0
    on_gpu = nonlayer + sum(layers[:k]) + ring * slot
    layout = Layout(1, 1, 1, 1, False, s.gpus_per_node)
    act = activation_bytes(m, layout)
    over = overhead_bytes(layout) - (CUDA_GRAPH_BYTES if streamed else 0)
    usable = int(gpu.memory_bytes * s.gpu_memory_utilization)
    kv_budget = int(usable - on_gpu - act - over)
    kv_token = kv_bytes_per_token_per_gpu(m, s.precision, layout)
    b = w.concurrency
    kv_needed = b * w.tokens_per_request * kv_token
    max_conc = max(0, kv_budget) // kv_token // w.tokens_per_request
    if problem is None and kv_budget < max(kv_needed, w.max_model_len * kv_token):
        problem = (f"KV cache for {b} x {w.tokens_per_request:,} tokens needs {kv_needed / GB:,.1f} GB but "
                   f"{max(kv_budget, 0) / GB:,.1f} GB is left after {on_gpu / GB:,.1f} GB of weights (budget), "
                   f"activations and overhead on {gpu.name} (fits {max_conc} concurrent); lower "
                   "--gpu-weight-budget or --concurrency")
    pcie = (pcie_gbs if pcie_gbs is not None else gpu.pcie_gb_s / 2) * GB
    streamed_bytes = sum(streamed)
    copy_s = streamed_bytes / pcie
    gpu_step = decode_stage(stage_cost(m, s.precision, layout, gpu, s.eff), b, w.mean_context).total_s
    step = max(gpu_step, copy_s) + s.eff.step_overhead_s
    return LayerOffloadPlan(
        mode="layers", gpu=gpu.name, concurrency=b, gpu_weight_budget_bytes=budget, num_layers=len(layers),
        resident_layers=k, streamed_layers=len(streamed), ring_slots=ring, slot_bytes=slot,
        layer_bytes=tuple(layers), nonlayer_bytes=nonlayer, gpu_weights_bytes=on_gpu,
        streamed_bytes_per_step=streamed_bytes, activation_bytes=act, overhead_bytes=over, usable_bytes=usable,
        kv_budget_bytes=kv_budget, kv_needed_bytes=kv_needed, max_concurrency=max_conc, gpu_step_s=gpu_step,
        copy_s=copy_s, step_s=step, bound="pcie" if copy_s > gpu_step else "gpu", decode_tokens_per_s=b / step,
        tokens_per_s_per_user=1 / step, pcie_bytes_per_token=streamed_bytes / b,
        pcie_bytes_per_s_one_direction=pcie, host_pinned_bytes=streamed_bytes,
        host_ram_bytes=int(streamed_bytes + HOST_RAM_EXTRA_BYTES), feasible=problem is None, problem=problem,
    )


def _resident_prefix(layers: list[int], nonlayer: int, budget: int, slots: int) -> int | None:
    """As weights/layer_stream.resident_prefix (which needs torch): None when not even k = 0 fits."""
    if nonlayer + sum(layers) <= budget:
        return len(layers)
    for k in range(len(layers) - 1, -1, -1):
        if nonlayer + sum(layers[:k]) + slots * max(layers[k:]) <= budget:
            return k
    return None


def layer_offload_rows(o: dict[str, Any]) -> list[tuple[str, str]]:
    """The `r1deploy plan --offload layers` table, label and text per row."""
    def gb(n: float) -> str:
        return f"{n / GB:,.1f} GB"

    return [
        ("GPU", (f"non-layer weights {gb(o['nonlayer_bytes'])} + {o['resident_layers']} of {o['num_layers']} layers "
                 f"resident + {o['ring_slots']} ring slots of {gb(o['slot_bytes'])} = {gb(o['gpu_weights_bytes'])}; "
                 f"KV {gb(o['kv_budget_bytes'])} (needs {gb(o['kv_needed_bytes'])}, holds {o['max_concurrency']:,} "
                 "requests)")),
        ("streamed", (f"{o['streamed_layers']} layers, {gb(o['streamed_bytes_per_step'])} per step over PCIe at "
                      f"{o['pcie_bytes_per_s_one_direction'] / GB:,.0f} GB/s = {o['copy_s'] * 1e3:,.0f} ms")),
        ("decode step", (f"{o['step_s'] * 1e3:,.1f} ms = max(GPU {o['gpu_step_s'] * 1e3:,.1f} ms, copy "
                         f"{o['copy_s'] * 1e3:,.1f} ms) + overhead: {o['bound']}-bound")),
        ("decode tokens/s", f"{o['decode_tokens_per_s']:,.2f} total, {o['tokens_per_s_per_user']:.2f} per user"),
        ("host RAM", f"{o['host_ram_bytes'] / 2**30:,.0f} GiB (streamed layers pinned {gb(o['host_pinned_bytes'])})"),
    ]
