"""NeoX rotary embedding (rotate_half) with per-token cos/sin rows, rounded like layers/rotary.py.

out = round(round(x * cos) + round(rotate_half(x) * sin)) in x's dtype, the rounding of the PyTorch
path (on the H200 the result still differed from torch's by 2.3e-3 relative in bf16, about one
rounding; not bit-equal, cause not established). cos/sin [T, D] come from the step's positions on the device, once per
step for all layers. One program rotates every head of one token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import pow2


@triton.jit
def _rotary_kernel(
    x_ptr,  # [T, heads, D]
    cos_ptr, sin_ptr,  # [T, D]
    out_ptr,  # [T, heads, D]
    stride_xt, stride_xh, stride_ot, stride_oh, stride_ct, stride_st,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    imask = i < HALF
    mask = (h < NUM_HEADS)[:, None] & imask[None, :]
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + i[None, :]  # [H, D/2]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    cos1 = tl.load(cos_ptr + t * stride_ct + i, mask=imask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + t * stride_ct + HALF + i, mask=imask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + t * stride_st + i, mask=imask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + t * stride_st + HALF + i, mask=imask, other=0.0).to(tl.float32)[None, :]
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    # rotate_half(x) = cat(-x2, x1); each product rounds to the dtype before the sum, like torch does.
    o1 = (a1 * cos1).to(dtype).to(tl.float32) + (-a2 * sin1).to(dtype).to(tl.float32)
    o2 = (a2 * cos2).to(dtype).to(tl.float32) + (a1 * sin2).to(dtype).to(tl.float32)
    dst = out_ptr + t * stride_ot + h[:, None] * stride_oh + i[None, :]
    tl.store(dst, o1.to(dtype), mask=mask)
    tl.store(dst + HALF, o2.to(dtype), mask=mask)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (a strided view of qkv is fine); cos/sin [T, D] in x's dtype -> new [T, heads, D]."""
    num_tokens, num_heads, head_dim = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and head_dim % 2 == 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rotary_kernel[(num_tokens,)](
        x, cos, sin, out,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), sin.stride(0),
        NUM_HEADS=num_heads, HALF=head_dim // 2, BLOCK_H=pow2(num_heads), BLOCK_HALF=pow2(head_dim // 2),
        num_warps=4,
    )
    return out


def rotary_embedding_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, the same as layers/rotary.apply_rotary."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
