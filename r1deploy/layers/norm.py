"""RMSNorm, rounded like transformers: normalise in fp32, cast back, then scale."""

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
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
