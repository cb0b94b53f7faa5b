"""Paged GQA decode attention, split along the context (flash-decoding).

QUERY_LEN query tokens per sequence (1 for decode, 1+k for a speculative verify step), rows of q in
sequence order: row r is token r % QUERY_LEN of sequence r // QUERY_LEN and, causally, sees the first
seq_len - (QUERY_LEN - 1 - r % QUERY_LEN) cached tokens. Program (r, g, p) attends the G query heads of
KV head g (packed into one tile, so each K/V row is read once) over context partition p of row r, and
writes an fp32 partial output with its log-sum-exp; a second kernel merges the partitions of each head.
QUERY_LEN is a compile-time constant: at 1 the kernels are exactly the one-token decode kernels.
The grid depends only on the block table's width (static under CUDA graphs), never on seq_lens'
values: partitions past a sequence's end run zero iterations and are masked out in the merge.

FP8 (float8_e4m3fn) caches: K and V are widened to q's dtype (exact) as they are loaded; k_scale folds
into the softmax scale and v_scale into the partition's output, so the inner loop does no extra math.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import dot_precision, pow2, query_row_sequence

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_partition_kernel(
    q_ptr,  # [B * QUERY_LEN, H, D]
    cache_ptr,  # [2, NB, BS, KV, D], head_dim contiguous
    tables_ptr,  # [B, MB] int32
    seq_lens_ptr,  # [B] int32
    part_out_ptr,  # [B * QUERY_LEN, H, P, D] fp32, already divided by the partition's softmax sum
    part_lse_ptr,  # [B * QUERY_LEN, H, P] fp32, log2-sum-exp2 of the partition's scaled scores
    qk_scale,  # softmax scale * log2(e): scores live in the exp2 domain
    stride_qb, stride_qh,
    stride_ckv, stride_cblk, stride_coff, stride_chead,
    stride_tb,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_PARTS: tl.constexpr, PARTITION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    v_scale, FP8: tl.constexpr, QUERY_LEN: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    b, seq_len = query_row_sequence(row, seq_lens_ptr, QUERY_LEN)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [G, D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tmask = toks < end
        phys = tl.load(tables_ptr + b * stride_tb + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        rows = phys * stride_cblk + (toks % BLOCK_SIZE) * stride_coff + kvh * stride_chead  # [N]
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + stride_ckv + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m = m_new

    # Partitions past seq_len store nothing (the merge never reads them): a static-width graph table
    # leaves most partitions of short sequences empty, and their writes would cost bandwidth.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if FP8:
        out = out * v_scale
    live = start < seq_len
    part_row = (row * NUM_HEADS + heads) * NUM_PARTS + part  # [G]
    tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + d[None, :], out,
             mask=gmask[:, None] & dmask[None, :] & live)
    tl.store(part_lse_ptr + part_row, m + tl.log2(tl.where(l > 0, l, 1.0)), mask=gmask & live)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,  # [B * QUERY_LEN, H, P, D] fp32
    part_lse_ptr,  # [B * QUERY_LEN, H, P] fp32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B * QUERY_LEN, H, D]
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_PARTS: tl.constexpr, PARTITION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, QUERY_LEN: tl.constexpr,
):
    b = tl.program_id(0)  # the query row
    h = tl.program_id(1)
    _, seq_len = query_row_sequence(b, seq_lens_ptr, QUERY_LEN)
    used = tl.cdiv(seq_len, PARTITION)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    pmask = p < used
    base = (b * NUM_HEADS + h) * NUM_PARTS
    lse = tl.load(part_lse_ptr + base + p, mask=pmask, other=float("-inf"))  # [P]
    top = tl.where(used > 0, tl.max(lse, 0), 0.0)
    w = tl.where(pmask, tl.exp2(lse - top), 0.0)
    parts = tl.load(part_out_ptr + (base + p)[:, None] * HEAD_DIM + d[None, :],
                    mask=pmask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [P, D]
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # a padded (empty) row stays 0
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_attention(
    q: torch.Tensor,  # [B * query_len, H, D]: each sequence's query_len new tokens, in order
    kv_cache: torch.Tensor,  # [2, NB, BS, KV, D]
    block_tables: torch.Tensor,  # [B, MB] int32; MB (static) bounds every sequence's length
    seq_lens: torch.Tensor,  # [B] int32 on the device, K/V of this step included
    scale: float,
    partition_size: int = 256,
    k_scale: float = 1.0,  # FP8 caches: real K = stored * k_scale (ignored for other dtypes)
    v_scale: float = 1.0,
    query_len: int = 1,
) -> torch.Tensor:  # [B * query_len, H, D]
    """Graph-capturable: shapes and grid come from tensor shapes only, no host reads of seq_lens."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    num_seqs, num_heads, head_dim = q.shape  # num_seqs: query rows (B * query_len)
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert kv_cache.stride(-1) == 1 and q.stride(-1) == 1 and partition_size % block_size == 0
    group = num_heads // num_kv_heads
    num_parts = math.ceil(block_tables.shape[1] * block_size / partition_size)
    part_out = torch.empty(num_seqs, num_heads, num_parts, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, num_parts, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = pow2(head_dim)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_parts)](
        q, kv_cache, block_tables, seq_lens, part_out, part_lse, scale * _LOG2E * (k_scale if fp8 else 1.0),
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=block_size,
        NUM_PARTS=num_parts, PARTITION=partition_size, BLOCK_N=max(16, min(64, partition_size)),  # dots need K >= 16
        BLOCK_G=max(16, pow2(group)), BLOCK_D=block_d, PRECISION=dot_precision(q.dtype),
        v_scale=float(v_scale), FP8=fp8, QUERY_LEN=query_len, num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out, part_lse, seq_lens, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_PARTS=num_parts, PARTITION=partition_size,
        BLOCK_P=pow2(num_parts), BLOCK_D=block_d, QUERY_LEN=query_len, num_warps=4,
    )
    return out
