"""Routed experts held resident in the model dtype (bf16 / fp16 / fp32) or as DeepSeek's block-scaled FP8.

FP8 stacks stay float8_e4m3fn with fp32 block scales (`gate_up_proj_scale_inv` [E, 2 * ceil(I/bn), ceil(H/bk)]:
the gate's tile rows, then the up's; `down_proj_scale_inv` [E, ceil(H/bn), ceil(I/bk)]): the fused kernel
reads FP8 and scales each tile, the torch path dequantises the busy experts per call.
"""

from __future__ import annotations

import torch

from r1deploy.layers.moe.experts import DeepseekExperts, ExpertsMethod
from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_expert


class UnquantizedExperts(ExpertsMethod):
    def create_weights(self, layer: DeepseekExperts) -> None:
        rows, hidden, inter = layer.num_local, layer.hidden_size, layer.intermediate_size
        layer.gate_up_proj = layer.stack(rows, 2 * inter, hidden, dtype=None)  # [E/N, 2I, H]
        layer.down_proj = layer.stack(rows, hidden, inter, dtype=None)  # [E/N, H, I]

    def expert_weights(self, layer: DeepseekExperts, expert: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.gate_up_proj[expert], layer.down_proj[expert]

    def kernel_args(self, layer: DeepseekExperts) -> dict:
        return {"gate_up": layer.gate_up_proj, "down": layer.down_proj}


class Fp8BlockExperts(ExpertsMethod):
    def __init__(self, block: tuple[int, int]) -> None:
        self.block = tuple(block)

    def create_weights(self, layer: DeepseekExperts) -> None:
        rows, hidden, inter = layer.num_local, layer.hidden_size, layer.intermediate_size
        bn, bk = self.block
        layer.gate_up_proj = layer.stack(rows, 2 * inter, hidden, dtype=FP8_DTYPE)
        layer.down_proj = layer.stack(rows, hidden, inter, dtype=FP8_DTYPE)
        inter_rows, hidden_rows = -(-inter // bn), -(-hidden // bn)
        inter_cols, hidden_cols = -(-inter // bk), -(-hidden // bk)
        layer.gate_up_proj_scale_inv = layer.stack(rows, 2 * inter_rows, hidden_cols, dtype=torch.float32)
        layer.down_proj_scale_inv = layer.stack(rows, hidden_rows, inter_cols, dtype=torch.float32)

    def expert_weights(self, layer: DeepseekExperts, expert: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_expert(layer.gate_up_proj[expert], layer.down_proj[expert],
                                 layer.gate_up_proj_scale_inv[expert], layer.down_proj_scale_inv[expert], dtype, self.block)

    def kernel_args(self, layer: DeepseekExperts) -> dict:
        return {"gate_up": layer.gate_up_proj, "down": layer.down_proj, "gate_up_scale": layer.gate_up_proj_scale_inv,
                "down_scale": layer.down_proj_scale_inv, "scale_block": self.block}


def resident_method(fp8_block: tuple[int, int] | None) -> ExpertsMethod:
    """FP8 stacks with fp8_block's tiles (an FP8 checkpoint the loader keeps in FP8), else the model dtype."""
    return UnquantizedExperts() if fp8_block is None else Fp8BlockExperts(fp8_block)
