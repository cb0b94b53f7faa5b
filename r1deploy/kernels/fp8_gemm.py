"""Block-scaled FP8 (W8A8) GEMM, DeepSeek's fp8_gemm semantics, and the activation quantiser.

Activations: one fp32 scale per token per 128 channels, amax floored at 1e-4, e4m3 values
(`act_quant`). Weights: float8_e4m3fn [N, K] with weight_scale_inv [ceil(N/128), ceil(K/128)] (edge
tiles partial: N = 576 gives 5 scale rows). The GEMM accumulates each 128-wide K block's dot in fp32,
scales it by its token's and its weight tile's scales, and sums the blocks in fp32
(quant/fp8_block.fp8_block_gemm is the reference). Hopper runs the fp8 dots on tensor cores.
The kernels accept operands already decoded to fp32 (exactly the FP8 values) as well, with the
same math: that is how they are checked in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
QUANT_BLOCK = 128
_AMAX_FLOOR = 1e-4


@triton.jit
def _act_quant_kernel(
    x_ptr,  # [M, K]
    y_ptr,  # [M, K] e4m3 (or fp32: the decoded values)
    s_ptr,  # [M, K / 128] fp32
    stride_xm, stride_ym, stride_sm,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xm + cols).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-4), 448.0)
    y = tl.math.div_rn(x, scale).to(tl.float8e4nv)  # IEEE division, as torch: "/" is approximate on GPU
    tl.store(y_ptr + row * stride_ym + cols, y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + row * stride_sm + kb, scale)


def act_quant(x: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] (K % 128 == 0) -> ([..., K] e4m3, [..., K/128] fp32); out_dtype=float32 gives the
    decoded e4m3 values instead (for the interpreter)."""
    k = x.shape[-1]
    if k % QUANT_BLOCK:
        raise ValueError(f"last dimension {k} is not a multiple of {QUANT_BLOCK}")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    s = torch.empty(rows.shape[0], k // QUANT_BLOCK, dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _act_quant_kernel[(rows.shape[0], k // QUANT_BLOCK)](
            rows, y, s, rows.stride(0), y.stride(0), s.stride(0), BLOCK=QUANT_BLOCK, num_warps=1)
    return y.view(x.shape), s.view(*x.shape[:-1], k // QUANT_BLOCK)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,  # [M, K] e4m3 (or decoded fp32)
    a_s_ptr,  # [M, KB] fp32
    b_ptr,  # [N, K] e4m3 (or decoded fp32)
    b_s_ptr,  # [ceil(N/128), KB] fp32
    c_ptr,  # [M, N]
    M, N, K,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_base = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
    a_s_base = a_s_ptr + rows * stride_asm
    b_s_base = b_s_ptr + (cols // 128) * stride_bsn  # each column's weight tile row
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        kk = kb * BLOCK_K + ks
        kmask = kk < K
        a = tl.load(a_base + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        partial = tl.dot(a, b, input_precision=PRECISION)  # this K block's sum, fp32
        a_s = tl.load(a_s_base + kb, mask=rmask, other=0.0)
        b_s = tl.load(b_s_base + kb, mask=cmask, other=0.0)
        acc += partial * a_s[:, None] * b_s[None, :]
    c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def fp8_gemm(
    a: torch.Tensor,  # [M, K] e4m3, from act_quant (or its decoded fp32 values)
    a_scale: torch.Tensor,  # [M, K/128]
    b: torch.Tensor,  # [N, K] e4m3 weight (or its decoded fp32 values)
    b_scale: torch.Tensor,  # [ceil(N/128), K/128] weight_scale_inv
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [M, N] = a @ b.T with the block scales
    m, k = a.shape
    n = b.shape[0]
    assert b.shape[1] == k and k % QUANT_BLOCK == 0
    assert tuple(a_scale.shape) == (m, k // QUANT_BLOCK) and tuple(b_scale.shape) == (triton.cdiv(n, 128), k // 128)
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and a_scale.stride(-1) == 1 and b_scale.stride(-1) == 1
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 128  # within one weight tile row: one b scale per column, as in DeepSeek's kernel
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        a, a_scale.float(), b, b_scale.float(), out, m, n, k,
        a.stride(0), a_scale.stride(0), b.stride(0), b_scale.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=QUANT_BLOCK, GROUP_M=8,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        # fp32 (decoded) operands take 4x FP8's shared memory per stage: fewer stages fit in 227 KB
        num_warps=4 if block_m <= 64 else 8, num_stages=(4 if block_m <= 64 else 3) if a.element_size() == 1 else 2,
    )
    return out


def fp8_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), K/128]
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [..., N]
    """y = x W^T with x quantised per token per 128 channels: act_quant then fp8_gemm."""
    q, s = act_quant(x, out_dtype=weight.dtype if weight.dtype != torch.float32 else torch.float32)
    k = x.shape[-1]
    out = fp8_gemm(q.reshape(-1, k), s.reshape(-1, k // QUANT_BLOCK), weight, weight_scale_inv,
                   out_dtype or x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


def fp8_gemm_ref(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain PyTorch, the semantics of quant/fp8_block.fp8_block_gemm (fp32 sums per 128-wide K
    block, scaled by the token's and the weight tile's scales, summed in fp32)."""
    num_k_blocks = a_scale.shape[-1]
    partial = torch.einsum("mkc,nkc->mnk", a.float().unflatten(-1, (num_k_blocks, -1)),
                           b.float().unflatten(-1, (num_k_blocks, -1)))  # [M, N, KB]
    b_rows = b_scale.float().repeat_interleave(QUANT_BLOCK, dim=0)[: b.shape[0]]  # [N, KB]
    return (partial * a_scale.float()[:, None, :] * b_rows[None, :, :]).sum(-1).to(out_dtype)
