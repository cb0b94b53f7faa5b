"""DeepSeekMoE: router (V3 noaux_tc, V2 greedy / group-limited), routed experts, shared experts,
and the dense SwiGLU MLP of the first_k_dense_replace layers.

Routed experts are stored stacked the way transformers 5 stores them (`experts.gate_up_proj`
[E, 2I, H] with gate rows first, `experts.down_proj` [E, H, I]); checkpoints with per-expert
tensors (`experts.{e}.gate_proj.weight`) are stacked at load by `DeepseekExperts.load_expert`.
The CPU path sorts token-expert pairs by expert and runs one GEMM pair per busy expert; the fused
Triton kernel will consume the same sorted layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.layers.activation import silu_and_mul
from r1deploy.layers.linear import Linear, MergedLinear, empty_parameter
from r1deploy.models.deepseek_config import DeepseekConfig


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    scoring_func: str  # "sigmoid" | "softmax"
    topk_method: str  # "noaux_tc" | "greedy" | "group_limited_greedy"
    norm_topk_prob: bool
    routed_scaling_factor: float

    @staticmethod
    def from_config(config: DeepseekConfig) -> RouterSpec:
        return RouterSpec(config.n_routed_experts, config.num_experts_per_tok, config.n_group, config.topk_group,
                          config.scoring_func, config.topk_method, config.norm_topk_prob,
                          config.routed_scaling_factor)


def select_experts(
    scores: torch.Tensor,  # [T, E] fp32, after sigmoid / softmax
    bias: torch.Tensor | None,  # [E] e_score_correction_bias (noaux_tc only)
    spec: RouterSpec,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] fp32, expert ids [T, k] int64
    """The bias only decides *which* experts (noaux_tc); the weights always come from the raw scores."""
    choice = scores + bias if spec.topk_method == "noaux_tc" and bias is not None else scores
    if spec.topk_method != "greedy" and spec.topk_group < spec.n_group:
        grouped = choice.view(-1, spec.n_group, spec.num_experts // spec.n_group)  # [T, G, E/G]
        if spec.topk_method == "noaux_tc":  # V3: a group scores the sum of its best two
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:  # V2 group_limited_greedy: a group scores its best expert
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(spec.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        # -inf, not 0: biased scores can be negative, and a 0 fill would let dropped groups win
        # (the transformers 4.57 bug).
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids


class DeepseekMLP(nn.Module):
    """SwiGLU with gate/up as one matmul; checkpoint gate_proj/up_proj fill the `gate_up_proj` shards."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DeepseekGate(nn.Module):
    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.spec = RouterSpec.from_config(config)
        self.weight = empty_parameter(config.n_routed_experts, config.hidden_size)
        self.e_score_correction_bias: nn.Parameter | None = None
        if config.topk_method == "noaux_tc":
            # fp32 whatever the model dtype: a bf16 bias changes which experts win (transformers PR #42580).
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(config.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [T, hidden] -> [T, k] x2
        logits = F.linear(x.float(), self.weight.float())  # [T, E]; fp32 like transformers
        scores = logits.sigmoid() if self.spec.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        return select_experts(scores, self.e_score_correction_bias, self.spec)


class DeepseekExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = empty_parameter(num_experts, 2 * intermediate_size, hidden_size)  # [E, 2I, H]
        self.down_proj = empty_parameter(num_experts, hidden_size, intermediate_size)  # [E, H, I]

    def load_expert(self, expert: int, projection: str, loaded: torch.Tensor) -> None:
        """One checkpoint tensor `experts.{expert}.{projection}_proj.weight` into the stacks."""
        size = self.intermediate_size
        target = {
            "gate": self.gate_up_proj.data[expert, :size],
            "up": self.gate_up_proj.data[expert, size:],
            "down": self.down_proj.data[expert],
        }[projection]
        if target.shape != loaded.shape:
            raise ValueError(f"expert {expert} {projection}_proj: expected {tuple(target.shape)}, "
                             f"got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        weights: torch.Tensor,  # [T, k] fp32
        ids: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # [T, H]
        if x.is_cuda:
            from r1deploy.kernels.fused_moe import fused_moe  # triton only where there is a GPU
            return fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids)
        top_k = ids.shape[1]
        flat_ids = ids.flatten()  # [T*k]
        order = flat_ids.argsort(stable=True)  # token-expert pairs grouped by expert
        token_of = order // top_k  # [T*k]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync per layer
        sorted_x = x[token_of]  # [T*k, H]
        out = torch.empty(sorted_x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:  # idle experts cost nothing
                continue
            rows = slice(start, start + count)
            hidden = silu_and_mul(F.linear(sorted_x[rows], self.gate_up_proj[expert]))  # [n, I]
            out[rows] = F.linear(hidden, self.down_proj[expert])  # [n, H]
            start += count
        out *= weights.flatten()[order, None]
        # Sum each token's k contributions in fp32, round once.
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.gate = DeepseekGate(config)
        self.experts = DeepseekExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            DeepseekMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        # The shared experts sit outside the weighted sum (unscaled by routed_scaling_factor).
        return out + self.shared_experts(x) if self.shared_experts is not None else out
