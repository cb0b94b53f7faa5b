"""AWQ INT4 matmuls on the repacked layout: y = x @ W.T + b, W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g].

Layout (quant/awq.repack_awq, made once after loading): weight_packed int32 [N, K / 8] holds each row's
inputs in chunks of one group (W = g / 8 words); word j of chunk c holds input c g + i W + j in nibble i.
So a chunk is 64 contiguous bytes of one row (g = 128), nibble i of its W words covers W consecutive
inputs (x for it is one contiguous load), and one scale / zero (weight_scales fp16, weight_zeros uint8,
both [N, K / g]) applies to the chunk's whole partial sum.

`awq_gemm` multiplies without writing W (decode): a CUDA-core GEMV for one token row, a tensor-core tile
kernel for more. Neither converts a nibble with an int-to-float instruction, whose throughput would bound
them; they build the float's bits. The GEMV shifts the nibble into mantissa bits 19..22 of 1.0, giving
1 + q / 16 in two instructions, and corrects with the chunk's sum of x; the tile kernel, which needs
q - z itself, ORs it under 2^23's exponent and subtracts 2^23 + z. `awq_dequantize` writes W in the
activation dtype for a cuBLAS GEMM (prefill).
The torch references are awq_format.dequantize_awq_packed and `awq_gemm_ref` here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import dot_precision
from r1deploy.kernels.awq_format import dequantize_awq_packed

_MAGIC = tl.constexpr(8388608.0)  # 2^23: a float whose low mantissa bits are the OR-ed integer
_MAGIC_BITS = tl.constexpr(0x4B000000)  # 2^23's bits


@triton.jit
def _nibble_minus_zero(packed, i: tl.constexpr, magic_zero):
    """q - z in fp32 for nibble i of every word; magic_zero is 2^23 + z, broadcastable to packed."""
    return (((packed >> (4 * i)) & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - magic_zero


@triton.jit
def _nibble_one_plus(packed, i: tl.constexpr):
    """1 + q / 16 in fp32 for nibble i of every word: the nibble shifted into mantissa bits 19..22 of 1.0.
    Two instructions (shift, and-or), where the 2^23 trick needs a subtraction as well."""
    if 4 * i <= 19:
        moved = packed << (19 - 4 * i)
    else:
        moved = packed >> (4 * i - 19)
    return ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _store_rows(total, rows, rmask, m, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + rows, total.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _awq_gemv_kernel(
    x_ptr,  # [M, K]
    packed_ptr,  # [N, K / 8] int32
    zeros_ptr,  # [N, K / G] uint8
    scales_ptr,  # [N, K / G] fp16
    bias_ptr,  # [N] or a dummy
    out_ptr,  # [M, N] in x's dtype
    partial_ptr,  # [SPLIT_K, M, N] fp32 (SPLIT_K > 1)
    counter_ptr,  # [M * cdiv(N, BLOCK_N)] int32 zeros (SEMAPHORE): programs of a tile that have finished
    M, N, K, stride_xm, groups_per_split,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    SEMAPHORE: tl.constexpr,
):
    """Program (m, n tile, s): BLOCK_N output rows of token m over groups [s, s + 1) * groups_per_split.
    Decode's M is 1..4, so the grid is cut along K too, or a 3,584-row output would keep only a few dozen
    programs streaming weights. Per row and word the 8 nibble products accumulate in fp32 ([BLOCK_N, W]
    partial sums), each chunk's are scaled once, and the words are summed once at the end.
    SEMAPHORE: the last program of a tile to finish sums the SPLIT_K fp32 partials (in split order, so the
    result is deterministic), adds the bias and stores; else the launcher sums them."""
    m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    WORDS: tl.constexpr = GROUP // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    words = tl.arange(0, WORDS)
    n_groups = K // GROUP
    row_words = packed_ptr + rows[:, None].to(tl.int64) * (K // 8) + words[None, :]  # [BLOCK_N, W]
    acc = tl.zeros([BLOCK_N, WORDS], tl.float32)
    first = pid_k * groups_per_split
    for g in range(first, tl.minimum(first + groups_per_split, n_groups)):
        packed = tl.load(row_words + g * WORDS, mask=rmask[:, None], other=0)
        scale = tl.load(scales_ptr + rows * n_groups + g, mask=rmask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + rows * n_groups + g, mask=rmask, other=0).to(tl.float32)
        x_chunk = x_ptr + m * stride_xm + g * GROUP + words  # nibble i's inputs: x_chunk + i * W
        # part = sum_i x_i (1 + q_i / 16) and x_sum = sum_i x_i per word give
        # sum_i x_i (q_i - z) s = s (16 part - (16 + z) x_sum)
        x_i = tl.load(x_chunk).to(tl.float32)
        part = _nibble_one_plus(packed, 0) * x_i[None, :]
        x_sum = x_i
        for i in tl.static_range(1, 8):
            x_i = tl.load(x_chunk + i * WORDS).to(tl.float32)
            part += _nibble_one_plus(packed, i) * x_i[None, :]
            x_sum += x_i
        acc += (16.0 * scale)[:, None] * part - (scale * (16.0 + zero))[:, None] * x_sum[None, :]
    total = tl.sum(acc, axis=1)  # [BLOCK_N]
    if SPLIT_K == 1:
        _store_rows(total, rows, rmask, m, N, bias_ptr, out_ptr, HAS_BIAS)
    else:
        tl.store(partial_ptr + (pid_k * M + m).to(tl.int64) * N + rows, total, mask=rmask)
        if SEMAPHORE:
            tl.debug_barrier()  # every thread's partial is written before the tile's count moves
            tile = counter_ptr + m * tl.num_programs(1) + pid_n
            if tl.atomic_add(tile, 1, sem="acq_rel") == SPLIT_K - 1:
                total = tl.zeros([BLOCK_N], tl.float32)
                for s in range(SPLIT_K):
                    total += tl.load(partial_ptr + (s * M + m).to(tl.int64) * N + rows, mask=rmask, other=0.0,
                                     cache_modifier=".cg")
                _store_rows(total, rows, rmask, m, N, bias_ptr, out_ptr, HAS_BIAS)
                tl.atomic_xchg(tile, 0)  # ready for the next launch (CUDA-graph replays included)


@triton.jit
def _awq_tile_kernel(
    x_ptr,  # [M, K]
    packed_ptr, zeros_ptr, scales_ptr, bias_ptr,  # as _awq_gemv_kernel
    out_ptr,  # [M, N] in x's dtype (SPLIT_K == 1)
    partial_ptr,  # [SPLIT_K, M, N] fp32 (SPLIT_K > 1)
    M, N, K, stride_xm, groups_per_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Tensor cores for 5..32 token rows. Each chunk is dequantised in fp32 and rounded once to x's dtype:
    nibble by nibble into [BLOCK_N, W] tiles, each multiplied with its W inputs, where W >= 16 (g >= 128);
    else whole, unpacked in input order."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    WORDS: tl.constexpr = GROUP // 8
    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask, rmask = tokens < M, rows < N
    words = tl.arange(0, WORDS)
    shifts = 4 * tl.arange(0, 8)
    n_groups = K // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid_k * groups_per_split
    for g in range(first, tl.minimum(first + groups_per_split, n_groups)):
        packed = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 8) + g * WORDS + words[None, :],
                         mask=rmask[:, None], other=0)  # [BLOCK_N, W]
        scale = tl.load(scales_ptr + rows * n_groups + g, mask=rmask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + rows * n_groups + g, mask=rmask, other=0).to(tl.int32)
        x_chunk = x_ptr + tokens[:, None].to(tl.int64) * stride_xm + g * GROUP
        if WORDS >= 16:  # one K=W dot per nibble: no [BLOCK_N, 8, W] -> [BLOCK_N, G] relayout
            magic_zero = (zero.to(tl.float32) + _MAGIC)[:, None]
            for i in tl.static_range(8):
                x_i = tl.load(x_chunk + i * WORDS + words[None, :], mask=tmask[:, None], other=0.0)  # [BLOCK_M, W]
                w_i = (_nibble_minus_zero(packed, i, magic_zero) * scale[:, None]).to(x_i.dtype)  # [BLOCK_N, W]
                acc += tl.dot(x_i, tl.trans(w_i), input_precision=PRECISION)
        else:  # a dot needs K >= 16: unpack the whole chunk in input order (nibble-major [BLOCK_N, 8, W])
            q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_N, GROUP))
            x = tl.load(x_chunk + tl.arange(0, GROUP)[None, :], mask=tmask[:, None], other=0.0)  # [BLOCK_M, G]
            w = ((q - zero[:, None]).to(tl.float32) * scale[:, None]).to(x.dtype)  # [BLOCK_N, G]
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    out_rows = tokens[:, None].to(tl.int64) * N + rows[None, :]
    mask = tmask[:, None] & rmask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_rows, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + pid_k.to(tl.int64) * M * N + out_rows, acc, mask=mask)


@triton.jit
def _sum_partials_kernel(
    partial_ptr,  # [SPLIT_K, M * N] fp32
    bias_ptr,  # [N] or a dummy
    out_ptr,  # [M * N]
    total_size, N,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total_size
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT_K):
        total += tl.load(partial_ptr + s * total_size + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _awq_dequant_kernel(
    packed_ptr, zeros_ptr, scales_ptr,
    out_ptr,  # [N, K]
    N, K,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (n tile, group): one chunk of BLOCK_N rows, exact in fp32, then one rounding."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    rmask = rows < N
    WORDS: tl.constexpr = GROUP // 8
    n_groups = K // GROUP
    packed = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 8) + g * WORDS + tl.arange(0, WORDS)[None, :],
                     mask=rmask[:, None], other=0)
    scale = tl.load(scales_ptr + rows * n_groups + g, mask=rmask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + rows * n_groups + g, mask=rmask, other=0).to(tl.int32)
    shifts = 4 * tl.arange(0, 8)
    q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_N, GROUP))
    w = (q - zero[:, None]).to(tl.float32) * scale[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + g * GROUP + tl.arange(0, GROUP)[None, :],
             w.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def _check(packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int]:
    n, k = packed.shape[0], packed.shape[1] * 8
    assert packed.dtype == torch.int32 and zeros.dtype == torch.uint8 and scales.dtype == torch.float16
    assert packed.is_contiguous() and zeros.is_contiguous() and scales.is_contiguous()
    assert group_size % 16 == 0 and k % group_size == 0
    assert tuple(zeros.shape) == tuple(scales.shape) == (n, k // group_size)
    return k, n


@dataclass(frozen=True)
class AwqDecodeTuning:
    """Launch shape of the decode kernels on a GPU. The defaults are the fastest of benchmarks/h200_quant.py's
    sweep on the H200 at the R1-Distill-Qwen-7B projections (benchmarks/results/h200_quant_awq.json)."""

    # Up to this many token rows the CUDA-core GEMV kernel (a program row per token, so its cost grows
    # with each row: at 2 rows the tile kernel is already faster); above, the tensor-core tile kernel.
    gemv_max_tokens: int = 1
    gemv_block_n: int = 128  # output rows per program
    gemv_num_warps: int = 4
    programs_per_sm: int = 8  # the K split aims at this many programs per SM
    semaphore: bool = True  # split-K partials summed by the tile's last program, not by a second kernel
    tile_block_n: int = 64
    tile_block_m: int = 0  # 0: 16 token rows per tile up to 16 rows, 32 above


DECODE_TUNING = AwqDecodeTuning()
_COUNTERS = 1 << 16  # per device: enough for 4 tokens x 16,384 row tiles


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """Zeroed once; each semaphore launch leaves its counters at zero again."""
    return torch.zeros(_COUNTERS, dtype=torch.int32, device=device)


def awq_gemm(
    x: torch.Tensor,  # [M, K]
    packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,  # quant/awq.repack_awq's layout
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
    split_k: int | None = None,  # None: chosen from the grid and the SM count (1 on the CPU)
    tuning: AwqDecodeTuning | None = None,  # None: DECODE_TUNING
) -> torch.Tensor:  # [M, N] in x's dtype
    """Fused dequantise-and-multiply for small M (decode): the GEMV kernel up to tuning.gemv_max_tokens
    rows, the tensor-core tile kernel above."""
    k, n = _check(packed, zeros, scales, group_size)
    assert x.shape[-1] == k and x.stride(-1) == 1
    tuning = tuning or DECODE_TUNING
    m = x.shape[0]
    gemv = m <= tuning.gemv_max_tokens
    if x.is_cuda:
        tile_m = tuning.tile_block_m or (16 if m <= 16 else 32)
        block_m, block_n = (1, tuning.gemv_block_n) if gemv else (tile_m, tuning.tile_block_n)
    else:
        block_m, block_n = (1, 16) if gemv else (16, 16)
    n_groups = k // group_size
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:
        split_k = 1
        if x.is_cuda:  # each program keeps at least 2 groups
            split_k = max(1, min(triton.cdiv(tuning.programs_per_sm * _sm_count(x.device), grid_mn), n_groups // 2))
    groups_per_split = triton.cdiv(n_groups, split_k)
    split_k = triton.cdiv(n_groups, groups_per_split)  # no empty splits
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    semaphore = False
    if gemv:
        semaphore = split_k > 1 and tuning.semaphore and grid[0] * grid[1] <= _COUNTERS
        counters = _counters(x.device) if semaphore else out
        _awq_gemv_kernel[grid](
            x, packed, zeros, scales, bias_arg, out, partial, counters, m, n, k, x.stride(0), groups_per_split,
            GROUP=group_size, BLOCK_N=block_n, SPLIT_K=split_k, HAS_BIAS=has_bias, SEMAPHORE=semaphore,
            num_warps=tuning.gemv_num_warps if x.is_cuda else 1,
        )
    else:
        _awq_tile_kernel[grid](
            x, packed, zeros, scales, bias_arg, out, partial, m, n, k, x.stride(0), groups_per_split,
            GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k, HAS_BIAS=has_bias,
            PRECISION=dot_precision(x.dtype), num_warps=4, num_stages=3 if x.is_cuda else 1,
        )
    if split_k > 1 and not semaphore:
        block = 1024
        _sum_partials_kernel[(triton.cdiv(m * n, block),)](
            partial, bias_arg, out, m * n, n, SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def awq_dequantize(
    packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:  # [N, K] in dtype
    """W for a dense GEMM (prefill): y = x @ W.T."""
    k, n = _check(packed, zeros, scales, group_size)
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    block_n = 32
    _awq_dequant_kernel[(triton.cdiv(n, block_n), k // group_size)](
        packed, zeros, scales, out, n, k, GROUP=group_size, BLOCK_N=block_n, num_warps=4,
    )
    return out


def awq_gemm_ref(
    x: torch.Tensor, packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: dequantise (exact, then x's dtype) and multiply."""
    return torch.nn.functional.linear(x, dequantize_awq_packed(packed, zeros, scales, group_size, x.dtype), bias)
