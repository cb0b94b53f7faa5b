"""DeepSeek's rotary embedding: YaRN frequencies, the interleaved pair layout, computed in fp32.

Only the qk_rope_head_dim slice of q and the shared k_pe are rotated. DeepSeek rotates adjacent
pairs (x0, x1), (x2, x3), ... as complex numbers; transformers' V3 writes the result de-interleaved
([even rotated ; odd rotated]). q and k get the same permutation, so q.k is unchanged and no weight
needs permuting; we use transformers' V3 order so the cached k_pe matches its cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from r1deploy.core.deepseek_config import YarnScaling, yarn_get_mscale


def yarn_inv_frequencies(dim: int, theta: float, scaling: YarnScaling) -> torch.Tensor:  # [dim/2]
    """High frequencies keep their value, low ones are divided by `factor`, blended by a linear ramp
    over the dimensions between the beta_fast and beta_slow rotation counts."""
    base_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return base_freq / scaling.factor * ramp + base_freq * (1 - ramp)


def yarn_attention_factor(scaling: YarnScaling) -> float:
    """cos/sin scale (1.0 for R1 and V2-Lite, whose mscale == mscale_all_dim). Follows transformers:
    with only one of mscale/mscale_all_dim set it falls back to mscale(factor)."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_get_mscale(scaling.factor)


class DeepseekRotary(nn.Module):
    def __init__(self, dim: int, theta: float, scaling: YarnScaling | None) -> None:
        super().__init__()
        inv_freq = (yarn_inv_frequencies(dim, theta, scaling) if scaling is not None
                    else 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        # Not persistent: derived from the config, never part of a checkpoint; fp32 whatever the model dtype.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_factor = yarn_attention_factor(scaling) if scaling is not None else 1.0

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [T] -> 2 x [T, dim/2] fp32
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, heads, dim], cos/sin [T, dim/2] -> rotated x, same shape and dtype. The math runs in
    fp32 like DeepSeek's reference (transformers rounds cos/sin to the model dtype first)."""
    x32 = x.float()
    if interleave:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]  # pair members
    else:
        x1, x2 = x32.chunk(2, dim=-1)  # NeoX halves (V3 with rope_interleave=false)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
