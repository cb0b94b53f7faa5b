"""AWQ INT4 (AutoAWQ GEMM format) matmuls: y = x @ W, W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n].

`awq_gemm` dequantises in registers and multiplies (decode: the weights, a quarter of fp16's bytes,
are read once per 16-token tile); `awq_dequantize` writes W in the activation dtype for a cuBLAS GEMM
(prefill, where the matmul is compute-bound). Packing: int32 column c of qweight / qzeros holds
logical columns 8c .. 8c + 7; column 8c + j sits in nibble (j // 2) + 4 * (j % 2) (AutoAWQ's
[0, 2, 4, 6, 1, 3, 5, 7] order). The torch references are r1deploy.quant.awq.dequantize_awq and
`awq_gemm_ref` here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import dot_precision


@triton.jit
def _awq_shifts(n):
    """Bit offset of logical column n inside its packed int32 (AutoAWQ's order)."""
    j = n % 8
    return ((j // 2) + (j % 2) * 4) * 4


@triton.jit
def _awq_unpack(packed, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 [ROWS, BLOCK_N / 8] -> int32 [ROWS, BLOCK_N] of 0..15, logical column order: each packed word
    is loaded once (not once per nibble) and split into its 8 columns in registers."""
    shifts = _awq_shifts(tl.arange(0, 8))  # [8]
    return tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 0xF, (ROWS, BLOCK_N))


@triton.jit
def _awq_gemm_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K, N / 8] int32
    qzeros_ptr,  # [K / G, N / 8] int32
    scales_ptr,  # [K / G, N] fp16
    out_ptr,  # [SPLIT_K, M, N] fp32 partial sums (SPLIT_K > 1), else [M, N] in x's dtype
    M, N, K,
    stride_xm, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (m, n, s) sums K tiles s, s + SPLIT_K, ...: decode's M is 1..32, so the grid is cut along K
    as well, or a 3,584-wide output would keep only 28-56 of the 132 SMs streaming weights."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    packed_cols = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    ks = tl.arange(0, BLOCK_K)
    rmask, cmask = rows < M, cols < N
    n_packed = N // 8
    pmask = packed_cols < n_packed
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):  # BLOCK_K divides GROUP: one group per K tile
        kk = k0 + ks
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + kk[None, :],
                    mask=rmask[:, None], other=0.0)  # [M, K]; K is a multiple of BLOCK_K
        packed = tl.load(qweight_ptr + kk[:, None].to(tl.int64) * n_packed + packed_cols[None, :],
                         mask=pmask[None, :], other=0)  # [K, N / 8]
        g = k0 // GROUP
        zeros = tl.load(qzeros_ptr + g * n_packed + packed_cols, mask=pmask, other=0)  # [N / 8]
        scales = tl.load(scales_ptr + g * N + cols, mask=cmask, other=0.0).to(tl.float32)  # [N]
        q = _awq_unpack(packed, BLOCK_K, BLOCK_N)  # [K, N]
        z = tl.reshape(_awq_unpack(zeros[None, :], 1, BLOCK_N), (BLOCK_N,))  # [N]
        w = ((q - z[None, :]).to(tl.float32) * scales[None, :]).to(x.dtype)  # [K, N], exact then one rounding
        acc += tl.dot(x, w, input_precision=PRECISION)
    out_ptr += pid_k.to(tl.int64) * M * N
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _awq_gemv_kernel(
    x_ptr,  # [M, K], M <= GEMV_MAX_TOKENS
    qweight_ptr,  # [K, N / 8] int32
    qzeros_ptr,  # [K / G, N / 8] int32
    scales_ptr,  # [K / G, N] fp16
    out_ptr,  # [SPLIT_K, M, N] fp32 partial sums (SPLIT_K > 1), else [M, N] in x's dtype
    M, N, K,
    stride_xm,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One token row per program, on the CUDA cores: at one to a few tokens a tensor-core tile would be
    mostly padding and its B operand a shared-memory round trip per K tile. The packed words stay
    [K, N / 8] and each is split into its 8 columns along a third axis, so nothing is reshaped until the
    one store at the end; products accumulate per element (a [K, N / 8, 8] accumulator) and are summed
    over K once, after the loop, so no K tile needs a cross-warp reduction."""
    m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PACKED: tl.constexpr = BLOCK_N // 8
    packed_cols = pid_n * PACKED + tl.arange(0, PACKED)  # [P]
    n_packed = N // 8
    pmask = packed_cols < n_packed
    shifts = _awq_shifts(tl.arange(0, 8))  # [8]
    cols = packed_cols[:, None] * 8 + tl.arange(0, 8)[None, :]  # [P, 8] logical columns
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K, PACKED, 8], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):  # BLOCK_K divides GROUP: one group per K tile
        kk = k0 + ks
        packed = tl.load(qweight_ptr + kk[:, None].to(tl.int64) * n_packed + packed_cols[None, :],
                         mask=pmask[None, :], other=0)  # [K, P]
        x = tl.load(x_ptr + m * stride_xm + kk).to(tl.float32)  # [K]
        g = k0 // GROUP
        zeros = tl.load(qzeros_ptr + g * n_packed + packed_cols, mask=pmask, other=0)  # [P]
        scales = tl.load(scales_ptr + g * N + cols, mask=pmask[:, None], other=0.0).to(tl.float32)  # [P, 8]
        q = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [K, P, 8]
        z = (zeros[:, None] >> shifts[None, :]) & 0xF  # [P, 8]
        w = (q - z[None, :, :]).to(tl.float32) * scales[None, :, :]  # exact: as dequantised, before rounding
        acc += w * x[:, None, None]
    out_ptr += pid_k.to(tl.int64) * M * N
    tl.store(out_ptr + m * N + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=pmask[:, None])


@triton.jit
def _awq_dequant_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,  # out [K, N]
    N, K,
    GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (kk < K)[:, None] & (cols < N)[None, :]
    n_packed = N // 8
    shifts = _awq_shifts(cols)
    packed = tl.load(qweight_ptr + kk[:, None].to(tl.int64) * n_packed + (cols // 8)[None, :], mask=mask, other=0)
    g = kk // GROUP
    zeros = tl.load(qzeros_ptr + g[:, None] * n_packed + (cols // 8)[None, :], mask=mask, other=0)
    scales = tl.load(scales_ptr + g[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q = (packed >> shifts[None, :]) & 0xF
    z = (zeros >> shifts[None, :]) & 0xF
    w = (q - z).to(tl.float32) * scales
    tl.store(out_ptr + kk[:, None].to(tl.int64) * N + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _check(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int]:
    k, n = qweight.shape[0], qweight.shape[1] * 8
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32
    assert qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()
    assert k % group_size == 0 and tuple(qzeros.shape) == (k // group_size, n // 8)
    assert tuple(scales.shape) == (k // group_size, n)
    return k, n


@dataclass(frozen=True)
class AwqDecodeTuning:
    """Launch shape of the decode kernels on a GPU. The defaults are the fastest of benchmarks/h200_quant.py's
    sweep on the H200 at the R1-Distill-Qwen-7B projections (benchmarks/results/h200_quant_awq.json)."""

    gemv_max_tokens: int = 4  # up to this many token rows: the CUDA-core GEMV kernel; above: tensor cores
    gemv_block_n: int = 256  # 128-byte rows of packed weights per load
    gemv_block_k: int = 32  # at most the group size (it must divide it)
    gemv_num_warps: int = 4
    tile_block_n: int = 128
    programs_per_sm: int = 4  # the K split aims at this many programs per SM


DECODE_TUNING = AwqDecodeTuning()


def awq_gemm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    split_k: int | None = None,  # None: chosen from the grid and the SM count (1 on the CPU)
    tuning: AwqDecodeTuning | None = None,  # None: DECODE_TUNING
) -> torch.Tensor:  # [M, N] in x's dtype
    """Fused dequantise-and-multiply, for small M (decode): the GEMV kernel up to
    tuning.gemv_max_tokens rows, the tensor-core tile kernel above."""
    k, n = _check(qweight, qzeros, scales, group_size)
    assert x.shape[-1] == k and x.stride(-1) == 1
    tuning = tuning or DECODE_TUNING
    m = x.shape[0]
    block_k = min(64, group_size)  # group sizes are multiples of 16; 64 and 128 take 64-deep tiles
    while group_size % block_k:
        block_k //= 2
    gemv = m <= tuning.gemv_max_tokens
    if gemv and x.is_cuda:
        block_k = min(block_k, tuning.gemv_block_k)
    if x.is_cuda:
        block_m, block_n = (1, tuning.gemv_block_n) if gemv else (16, tuning.tile_block_n)
    else:
        block_m, block_n = (1, 32) if gemv else (16, 32)
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:  # each program keeps at least 4 K tiles so the partial sums stay small
        split_k = 1
        if x.is_cuda:
            split_k = max(1, min(triton.cdiv(tuning.programs_per_sm * _sm_count(x.device), grid_mn),
                                 k // (4 * block_k)))
    if split_k > 1:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    if gemv:
        _awq_gemv_kernel[grid](
            x, qweight, qzeros, scales, out, m, n, k, x.stride(0),
            GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
            num_warps=tuning.gemv_num_warps if x.is_cuda else 1, num_stages=4 if x.is_cuda else 1,
        )
    else:
        _awq_gemm_kernel[grid](
            x, qweight, qzeros, scales, out, m, n, k, x.stride(0), n,
            GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
            PRECISION=dot_precision(x.dtype), num_warps=4, num_stages=4 if x.is_cuda else 1,
        )
    return out.sum(0).to(x.dtype) if split_k > 1 else out


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:  # [K, N] in dtype
    """W for a dense GEMM (prefill)."""
    k, n = _check(qweight, qzeros, scales, group_size)
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_k, block_n = 32, 64
    _awq_dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, qzeros, scales, out, n, k, GROUP=group_size, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
    )
    return out


def awq_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Plain PyTorch: dequantise (exact, then x's dtype) and matmul."""
    from r1deploy.quant.awq import dequantize_awq

    return x @ dequantize_awq(qweight, qzeros, scales, group_size, x.dtype)
