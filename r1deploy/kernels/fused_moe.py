"""Fused MoE for the stacked DeepSeek experts: tokens sorted by expert, one grouped GEMM for gate-up
(SiLU-and-mul fused in its epilogue), one for down (routing weight multiplied in), then a combine.

`moe_align` (torch, no host syncs) sorts the T*k token-expert pairs by expert and pads each expert's
list to a multiple of BLOCK_M, like vLLM's moe_align_block_size, so that every BLOCK_M-row tile of
the sorted list belongs to one expert. The grid is sized for the worst case (T*k + E*(BLOCK_M-1)
rows), a function of the shapes only; tiles past the padded total exit at once. Intermediates are
indexed by pair (token * k + slot), not by sorted position, so the combine is a plain sum over k.

Rounding mirrors the torch path of layers/moe/experts.ExpertsMethod: gate-up rounded to the model dtype,
SiLU rounded, its product with up rounded; down rounded to the dtype, then times the fp32 weight,
the k contributions summed in fp32 and rounded once.

FP8 experts (W8A16): b float8_e4m3fn with fp32 block scales, one per (SCALE_N x SCALE_K) weight
tile. Each B tile is loaded as FP8 (half the bytes of bf16: decode is memory-bound), multiplied by
its tile's scale in fp32, rounded to the activation dtype and dotted as usual: exactly the weights
quant/fp8_block.dequantize_fp8_block gives, so the CPU path dequantises and shares the arithmetic.
The gate-up scales hold the gate's tile rows then the up's ([E, 2 * ceil(I/SN), ceil(H/SK)]), so
gate and up never share a tile whatever I is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import dot_precision


def moe_align(
    ids: torch.Tensor,  # [T, k] expert of each token-expert pair
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns sorted_pairs [T*k + E*(block_m-1)] int32 (pair ids grouped by expert, each expert's run
    padded to a multiple of block_m with the out-of-range id T*k), expert_of_block [len/block_m] int32
    (-1 past the padded total) and num_padded [1] int32 (the padded total)."""
    flat = ids.flatten().long()
    num_pairs = flat.numel()
    max_rows = num_pairs + num_experts * (block_m - 1)
    max_blocks = triton.cdiv(max_rows, block_m)
    # scatter_add, not bincount: bincount sizes its output from the data, a host sync under graphs.
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)  # [E]
    order = flat.argsort(stable=True)  # pairs grouped by expert, in token order within an expert
    sorted_experts = flat[order]
    count_start = counts.cumsum(0) - counts  # where each expert's run starts in `order`
    rank = torch.arange(num_pairs, device=ids.device) - count_start[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank
    sorted_pairs = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[dest] = order.int()
    block_starts = torch.arange(max_blocks, device=ids.device) * block_m
    expert_of_block = torch.searchsorted(padded_end, block_starts, right=True)
    expert_of_block = torch.where(expert_of_block < num_experts, expert_of_block, -1).int()
    return sorted_pairs, expert_of_block, padded_end[-1:].int()


@triton.jit
def _load_b(b_ptrs, mask, s_ptrs, cmask, kb, B_SCALED: tl.constexpr, dtype: tl.constexpr):
    """A [BK, BN] weight tile in the activation dtype; FP8 tiles times their block scale (s_ptrs
    [BN]: each column's scale row; kb: the scale column, one per tile as BLOCK_K divides SCALE_K)."""
    b = tl.load(b_ptrs, mask=mask, other=0.0)
    if B_SCALED:
        scale = tl.load(s_ptrs + kb, mask=cmask, other=0.0)
        b = (b.to(tl.float32) * scale[None, :]).to(dtype)
    return b


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]: row = pair // A_DIV (tokens for gate-up, pairs for down)
    b_ptr,  # [E, N_total, K] stacked expert weights, the layout of F.linear
    b_scale_ptr,  # [E, scale rows, ceil(K/SCALE_K)] fp32 block scales (B_SCALED only)
    c_ptr,  # [num_pairs, N]
    weight_ptr,  # [num_pairs] fp32 routing weights (MUL_WEIGHT only)
    sorted_pairs_ptr, expert_of_block_ptr, num_padded_ptr,
    num_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
    A_DIV: tl.constexpr,
    FUSE_SILU: tl.constexpr,  # b holds gate rows [0, N) then up rows [N, 2N); c = silu(gate) * up
    MUL_WEIGHT: tl.constexpr,
    B_SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_of_block_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    rmask = pairs < num_pairs
    a_rows = (pairs // A_DIV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None] * stride_am  # [M, 1]
    b_base = b_ptr + expert * stride_be + cols.to(tl.int64)[None, :] * stride_bn  # [1, N]
    s_base = b_scale_ptr + expert * stride_bse + (cols // SCALE_N) * stride_bsn  # [N]: each column's scale row
    s_up = s_base + tl.cdiv(N, SCALE_N) * stride_bsn  # the up rows' tiles follow the gate's
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        bmask = kmask[:, None] & cmask[None, :]
        a = tl.load(a_base + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)  # [M, BK]
        b = _load_b(b_base + kk[:, None], bmask, s_base, cmask, k0 // SCALE_K, B_SCALED, dtype)  # [BK, N]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if FUSE_SILU:
            b_up = _load_b(b_base + N * stride_bn + kk[:, None], bmask, s_up, cmask, k0 // SCALE_K, B_SCALED, dtype)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
    out = acc.to(dtype).to(tl.float32)  # F.linear's rounding
    if FUSE_SILU:
        act = (out / (1.0 + tl.exp(-out))).to(dtype).to(tl.float32)  # F.silu rounds to the dtype
        out = act * acc_up.to(dtype).to(tl.float32)
    if MUL_WEIGHT:
        out = out * tl.load(weight_ptr + pairs, mask=rmask, other=0.0)[:, None]
    c = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c, out.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _block_m(num_pairs: int, num_experts: int) -> int:
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def grouped_gemm(
    a: torch.Tensor,  # [rows, K]
    b: torch.Tensor,  # [E, N_total, K]
    out: torch.Tensor,  # [num_pairs, N]
    sorted_pairs: torch.Tensor, expert_of_block: torch.Tensor, num_padded: torch.Tensor,
    block_m: int, a_div: int, fuse_silu: bool, weights: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,  # [E, scale rows, ceil(K/scale_block[1])] fp32, b FP8
    scale_block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and out.stride(-1) == 1
    num_pairs, n = out.shape
    k = a.shape[1]
    block_n = 64 if fuse_silu else 128
    block_k = 64 if k >= 64 else 32 if k >= 32 else 16
    if b_scale is not None:  # one scale column per K tile: the tile must not straddle two
        block_k = min(block_k, scale_block[1])
        assert scale_block[1] % block_k == 0 and b_scale.stride(-1) == 1, "K scale tiles: a power of 2 >= 16"
    scales = b_scale if b_scale is not None else b  # a placeholder pointer when unscaled
    grid = (expert_of_block.shape[0], triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, b, scales, out, weights if weights is not None else out, sorted_pairs, expert_of_block, num_padded,
        num_pairs, n, k, a.stride(0), b.stride(0), b.stride(1), scales.stride(0), scales.stride(1), out.stride(0),
        A_DIV=a_div, FUSE_SILU=fuse_silu, MUL_WEIGHT=weights is not None,
        B_SCALED=b_scale is not None, SCALE_N=scale_block[0], SCALE_K=scale_block[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(a.dtype),
        num_warps=4, num_stages=3,
    )
    return out


def fused_moe(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [E, 2I, H], gate rows first
    down: torch.Tensor,  # [E, H, I]
    weights: torch.Tensor,  # [T, k] fp32 routing weights
    ids: torch.Tensor,  # [T, k] expert ids
    block_m: int | None = None,
    gate_up_scale: torch.Tensor | None = None,  # [E, 2 * ceil(I/bn), ceil(H/bk)]: gate_up is FP8
    down_scale: torch.Tensor | None = None,  # [E, ceil(H/bn), ceil(I/bk)]: down is FP8
    scale_block: tuple[int, int] = (128, 128),  # (bn, bk), the checkpoint's weight_block_size
) -> torch.Tensor:  # [T, H] in x's dtype
    """Graph-capturable: no host reads of the routing (grid from shapes only)."""
    num_tokens, hidden = x.shape
    num_experts, inter = down.shape[0], down.shape[2]
    top_k = ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    block_m = block_m or _block_m(num_pairs, num_experts)
    sorted_pairs, expert_of_block, num_padded = moe_align(ids, num_experts, block_m)
    hidden_act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [T*k, I]
    grouped_gemm(x, gate_up, hidden_act, sorted_pairs, expert_of_block, num_padded, block_m,
                 a_div=top_k, fuse_silu=True, b_scale=gate_up_scale, scale_block=scale_block)
    partial = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)  # [T*k, H], weighted
    grouped_gemm(hidden_act, down, partial, sorted_pairs, expert_of_block, num_padded, block_m,
                 a_div=1, fuse_silu=False, weights=weights.flatten().float().contiguous(),
                 b_scale=down_scale, scale_block=scale_block)
    # Combine: each token's k weighted contributions summed in fp32, rounded once.
    return partial.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch on any device, the algorithm of the torch path of layers/moe/experts.ExpertsMethod:
    pairs sorted by expert, one GEMM pair per busy expert, weighted, summed per token in fp32."""
    top_k = ids.shape[1]
    inter = down.shape[2]
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    token_of = order // top_k
    out = torch.zeros(flat.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    for expert in flat.unique().tolist():
        rows = order[flat[order] == expert]
        h = torch.nn.functional.linear(x[rows // top_k], gate_up[expert])
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out[rows] = torch.nn.functional.linear(act, down[expert]).float()
    out *= weights.flatten()[:, None].float()
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out[order]).to(x.dtype)
