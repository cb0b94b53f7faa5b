"""RMSNorm with an optional fused residual add, rounded exactly like layers/norm.py (and transformers).

With a residual: s = round(x + residual) is the new residual, then out = round(w * round(s32 * rstd)),
with rstd from the fp32 mean of s32^2. Without one, s = x. One program normalises one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]
    res_ptr,  # [T, N] residual in (unused without HAS_RESIDUAL)
    w_ptr,  # [N]
    out_ptr,  # [T, N]
    res_out_ptr,  # [T, N] x + residual (unused without HAS_RESIDUAL)
    stride_x, stride_r, stride_o, stride_ro,
    eps,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the model's h + f(h), in its dtype
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x32 * x32, 0) / N + eps))  # IEEE, like the CPU path
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N], same dtype as x
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or (norm(x + residual), x + residual) when a residual is given."""
    num_rows, n = x.shape
    assert x.stride(-1) == 1 and weight.dtype == x.dtype
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res_in = residual if residual is not None else x
    _rms_norm_kernel[(num_rows,)](
        x, res_in, weight, out, res_out,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0), eps,
        N=n, BLOCK=pow2(n), HAS_RESIDUAL=residual is not None, num_warps=8 if n >= 2048 else 4,
    )
    return out if residual is None else (out, res_out)
