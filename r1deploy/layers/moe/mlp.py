"""SwiGLU MLP: DeepSeek's dense layers (first_k_dense_replace) and its shared experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.layers.activation import silu_and_mul
from r1deploy.layers.parallel import MergedColumnParallelLinear, RowParallelLinear, ShardSpec
from r1deploy.quant.methods import NO_QUANT, LinearMethodFor

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup


class DeepseekMLP(nn.Module):
    """SwiGLU with gate/up as one matmul; checkpoint gate_proj/up_proj fill the `gate_up_proj` shards.

    tp: gate/up column-parallel, down row-parallel; reduce=False leaves the all-reduce to the caller
    (the MoE block folds the shared experts' partial sum into the routed experts' one).
    linear_method(name): each projection's quantisation (FP8 block, AWQ) from its checkpoint name `prefix`.{name}."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup | None = None,
                 reduce: bool = True, linear_method: LinearMethodFor = NO_QUANT, prefix: str = "") -> None:
        super().__init__()
        spec = ShardSpec.even(intermediate_size, tp)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, {"gate": spec, "up": spec}, bias=False,
                                                       quant_method=linear_method(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp, reduce=reduce,
                                           quant_method=linear_method(f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
