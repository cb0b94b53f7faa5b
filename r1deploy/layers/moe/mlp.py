"""SwiGLU MLP: DeepSeek's dense layers (first_k_dense_replace) and its shared experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.layers.activation import silu_and_mul
from r1deploy.layers.linear import Linear, MergedLinear
from r1deploy.layers.parallel import MergedColumnParallelLinear, RowParallelLinear, ShardSpec

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup
    from r1deploy.quant.awq import AWQConfig


class DeepseekMLP(nn.Module):
    """SwiGLU with gate/up as one matmul; checkpoint gate_proj/up_proj fill the `gate_up_proj` shards.

    tp: gate/up column-parallel, down row-parallel; reduce=False leaves the all-reduce to the caller
    (the MoE block folds the shared experts' partial sum into the routed experts' one).
    awq (no tp): AWQ linears where the checkpoint quantises `prefix`.gate_up_proj / .down_proj."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup | None = None,
                 reduce: bool = True, awq: AWQConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if tp is None:
            gate_up_method = awq and awq.linear_method(f"{prefix}.gate_up_proj")
            self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size},
                                             bias=False, quant_method=gate_up_method)
            self.down_proj = Linear(intermediate_size, hidden_size, bias=False,
                                    quant_method=awq and awq.linear_method(f"{prefix}.down_proj"))
        else:
            width = intermediate_size // tp.size
            spec = ShardSpec(intermediate_size, tp.rank * width, width)
            self.gate_up_proj = MergedColumnParallelLinear(hidden_size, {"gate": spec, "up": spec}, bias=False)
            self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
