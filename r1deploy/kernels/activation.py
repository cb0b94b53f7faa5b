"""SiLU-and-mul over a merged gate/up projection, rounded like F.silu(gate) * up in the input dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 * I]: gate then up
    out_ptr,  # [T, I]
    stride_x, stride_o,
    INTER: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # F.silu rounds to the dtype first
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    num_rows, width = x.shape
    inter = width // 2
    assert x.stride(-1) == 1
    out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    if num_rows == 0:  # an MoE expert that got no tokens
        return out
    block = 1024
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4,
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, the same as layers/activation.silu_and_mul."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
