"""Per-GPU memory: weights, KV cache per token, peak activations, runtime overhead, and what is left.

Follows vLLM's own sizing (`gpu_worker.determine_available_memory`): KV budget =
total x gpu_memory_utilization - (weights + peak activations + non-torch memory), with CUDA graphs
counted too (newer vLLM reserves them; the old one silently ate into the headroom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1deploy.plan.catalog import GiB, GpuSpec
from r1deploy.plan.model_spec import ModelSpec, Tensor
from r1deploy.plan.parallel import Layout
from r1deploy.plan.precision import Precision

# Runtime overhead per GPU (shared reference planning.md section 3/1):
CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces; gpu_poor measures ~650 MB
NCCL_BUFFER_BYTES = int(0.4 * GiB)  # NCCL communicator buffers when TP/PP/EP > 1; AIConfigurator: 342-392 MB
CUDA_GRAPH_BYTES = int(1.0 * GiB)  # decode CUDA graphs; llm-d measured -0.45 to +1.03 GiB on H100

# Activations: vLLM profiles one forward of max_num_batched_tokens. 8192 is vLLM V1's default token
# budget for online serving; 256 its default max_num_seqs (each sampled sequence gets fp32 logits).
DEFAULT_MAX_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256
ACTIVATION_BYTES = 2  # bf16 activations
HIDDEN_BUFFERS = 4  # residual, normed input, layer output, and one temporary of width hidden_size
# Allocator fragmentation, sampler and kernel workspaces on top of the live tensors: chosen so that
# Llama-3.3-70B at 8,192 tokens lands at ~5 GiB, inside the 4.8-7.4 GiB llm-d measured on H100.
ACTIVATION_WORKSPACE_FACTOR = 2.5


@dataclass(frozen=True)
class MemoryPlan:
    capacity_bytes: int  # what the driver reports
    usable_bytes: int  # capacity x gpu_memory_utilization
    weights_bytes: int  # this GPU (heaviest pipeline stage)
    activation_bytes: int
    overhead_bytes: int
    kv_budget_bytes: int  # may be negative: does not fit
    kv_bytes_per_token: int  # whole model, one token (the headline number)
    kv_bytes_per_token_gpu: int  # what one GPU stores for one token it holds
    kv_capacity_tokens: int  # tokens one instance (tp x pp GPUs) can cache

    @property
    def fits(self) -> bool:
        return self.kv_budget_bytes > 0


def tensor_copies_on_gpu(model: ModelSpec, t: Tensor, layout: Layout, stage_layers: tuple[int, int]) -> float:
    """Copies of `t` on the heaviest GPU: scope count on its stage / how TP shards it."""
    dense, moe = stage_layers
    count = {"model": 1, "layer": dense + moe, "dense": dense, "moe": moe, "mtp": 0}[t.scope]
    if t.shard == "none":
        ways = 1
    elif t.shard == "kv":
        # Each GPU holds ceil(n_kv / tp) KV heads; when tp > n_kv every GPU holds one whole head.
        ways = min(layout.attention_tp, model.num_kv_heads)
    elif t.shard == "attn":
        ways = layout.attention_tp
    else:
        ways = layout.tp
    return t.copies * count / ways


def heaviest_stage(model: ModelSpec, pp: int) -> tuple[int, int]:
    """(dense, MoE) layers on the fullest stage: ceil(L/pp) layers, as many MoE ones as possible."""
    per_stage = math.ceil(model.num_layers / pp)
    moe = min(model.num_moe_layers, per_stage)
    return per_stage - moe, moe


def weights_bytes_total(model: ModelSpec, precision: Precision, include_mtp: bool = False) -> int:
    return int(sum(precision.tensor_bytes(t) * t.copies * model.scope_count(t.scope) for t in model.tensors
                   if include_mtp or t.scope != "mtp"))


def weights_bytes_per_gpu(model: ModelSpec, precision: Precision, layout: Layout,
                          parts: tuple[str, ...] | None = None) -> int:
    """Heaviest GPU. With PP the first stage holds the embedding and the last the lm_head; the
    larger of the two is charged to the heaviest stage."""
    stage = heaviest_stage(model, layout.pp)
    total = 0.0
    model_level = {"embedding": 0.0, "lm_head": 0.0}
    for t in model.tensors:
        if t.scope == "mtp" or (parts is not None and t.part not in parts):
            continue
        size = precision.tensor_bytes(t) * tensor_copies_on_gpu(model, t, layout, stage)
        if t.part in model_level:
            model_level[t.part] += size
        else:
            total += size
    ends = sum(model_level.values()) if layout.pp == 1 else max(model_level.values())
    return int(total + ends)


def kv_bytes_per_token(model: ModelSpec, precision: Precision) -> int:
    return model.kv_elems_per_token() * precision.kv_bytes


def kv_bytes_per_token_per_gpu(model: ModelSpec, precision: Precision, layout: Layout) -> int:
    """MLA: the latent is not split by TP (every attention rank keeps all of it for its requests);
    GQA: ceil(n_kv / tp) heads per GPU, at least one. Both are split by PP (layers per stage)."""
    layers = math.ceil(model.num_layers / layout.pp)
    if model.mla:
        per_layer = model.kv_lora_rank + model.qk_rope_head_dim
    else:
        per_layer = 2 * math.ceil(model.num_kv_heads / layout.tp) * model.head_dim
    return layers * per_layer * precision.kv_bytes


def activation_bytes(model: ModelSpec, layout: Layout, max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
                     max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> int:
    """Peak transient memory of one forward over max_batched_tokens tokens (layers run one at a time,
    so only the widest layer counts): hidden-size buffers + the widest of attention / MLP / MoE
    intermediates on this GPU + fp32 logits for the sampled sequences."""
    tokens, d = max_batched_tokens, model.hidden_size
    heads = model.num_heads / layout.attention_tp
    if model.mla:
        attn = heads * (model.qk_nope_head_dim + model.qk_rope_head_dim + model.v_head_dim) \
            + model.kv_lora_rank + model.qk_rope_head_dim
    else:
        attn = (heads + 2 * max(1.0, model.num_kv_heads / layout.tp)) * model.head_dim
    mlp = 3 * model.intermediate_size / layout.tp  # gate_up output (2I) + activation (I)
    if model.moe:
        # fused-MoE caches: [T, k, 2I] and [T*k, I] of the local shard, plus [T, k, D] for the combine
        moe = model.num_experts_per_tok * (3 * model.moe_intermediate_size / layout.tp + d)
        mlp = max(mlp, moe)
    per_token = HIDDEN_BUFFERS * d + max(attn, mlp)
    logits = max_num_seqs * model.vocab_size / layout.tp * 4
    return int((tokens * per_token * ACTIVATION_BYTES + logits) * ACTIVATION_WORKSPACE_FACTOR)


def overhead_bytes(layout: Layout) -> int:
    nccl = NCCL_BUFFER_BYTES if layout.num_gpus > 1 else 0
    return CUDA_CONTEXT_BYTES + nccl + CUDA_GRAPH_BYTES


def plan_memory(model: ModelSpec, precision: Precision, layout: Layout, gpu: GpuSpec,
                gpu_memory_utilization: float, max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS) -> MemoryPlan:
    usable = int(gpu.memory_bytes * gpu_memory_utilization)
    weights = weights_bytes_per_gpu(model, precision, layout)
    act = activation_bytes(model, layout, max_batched_tokens)
    over = overhead_bytes(layout)
    budget = usable - weights - act - over
    per_gpu_token = kv_bytes_per_token_per_gpu(model, precision, layout)
    # Every GPU of an instance holds a slice of every cached token, except that DP-attention ranks
    # each cache only their own requests: capacity then grows with the number of attention ranks.
    capacity = max(0, budget) // per_gpu_token * layout.attention_dp
    return MemoryPlan(gpu.memory_bytes, usable, weights, act, over, budget,
                      kv_bytes_per_token(model, precision), per_gpu_token, capacity)
