"""load_format="dummy": random weights at the real shapes, for planning, profiling and tests without a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from r1deploy.quant.fp8_block import FP8_DTYPE
from r1deploy.quant.fp8_checkpoint import SCALE_SUFFIX

STD = 0.02
_CHUNK_ELEMENTS = 1 << 26  # fp32 staging for FP8 draws: 256 MB at a time, whatever the parameter's size


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Normal(0, 0.02) matrices, zero biases, unit norm weights; the same seed gives the same model.
    FP8 weights (quant/fp8_linear) are drawn in place on their device: e4m3 values of N(0, 1) with every
    block scale 0.02, so they dequantise to the same N(0, 0.02) up to e4m3 rounding."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        elif name.endswith(SCALE_SUFFIX):
            param.fill_(STD)
        elif param.dtype == FP8_DTYPE:
            _fill_fp8_normal(param, generator)
        else:
            param.normal_(0.0, STD, generator=generator)


def _fill_fp8_normal(param: torch.Tensor, generator: torch.Generator) -> None:
    """N(0, 1) into an FP8 tensor, staged through fp32 a chunk of rows at a time."""
    rows = param.view(-1, param.shape[-1])  # [R, C]
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        staged = torch.empty(chunk.shape, dtype=torch.float32, device=param.device)
        chunk.copy_(staged.normal_(0.0, 1.0, generator=generator))  # |x| < 448 for any draw of N(0, 1)
