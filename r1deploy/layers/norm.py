"""RMSNorm, rounded like transformers: normalise in fp32, cast back, then scale. rms_norm_torch is the plain-PyTorch
form (the CPU's path and the reference of kernels/rmsnorm.py); CUDA runs the Triton kernel."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x) [T, hidden]; with a residual, (norm(x + residual), x + residual), the add in x's dtype
        exactly as `h = h + f(h)` then `norm(h)` rounds it."""
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1 and self.weight.dtype == x.dtype:
            from r1deploy.kernels.rmsnorm import rms_norm  # triton only where there is a GPU

            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_torch(x, self.weight, self.eps, residual)


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or (norm(x + residual), x + residual) with the add in x's dtype."""
    s = x if residual is None else x + residual
    s32 = s.float()
    out = weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return out if residual is None else (out, s)
