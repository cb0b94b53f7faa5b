"""SwiGLU activation over a merged gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    if x.is_cuda and x.stride(-1) == 1:
        from r1deploy.kernels.activation import silu_and_mul as silu_and_mul_kernel  # triton only on a GPU

        return silu_and_mul_kernel(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
