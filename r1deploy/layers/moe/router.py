"""DeepSeek's router: scores (sigmoid for V3 / R1, softmax for V2), the optional e_score_correction_bias
(noaux_tc) and the greedy / group-limited top-k. Every dispatcher runs it on the tokens it routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.layers.linear import empty_parameter

if TYPE_CHECKING:
    from r1deploy.core.deepseek_config import DeepseekConfig


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


class Router(nn.Module):
    """The checkpoint's `mlp.gate` (weight [E, hidden], V3's e_score_correction_bias)."""

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
