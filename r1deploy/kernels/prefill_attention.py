"""Varlen causal attention over the paged KV cache: prefill, chunked prefill and prefix hits in one launch.

Sequence b's queries are rows query_start_loc[b] .. query_start_loc[b+1] of q; their K/V were already
written to the cache, so query j of b sits at position ctx + j, with ctx = seq_len - query_len (the
cached prefix), and sees keys 0 .. ctx + j, read through the block table. Program (m, h, b) runs
flash attention for one BLOCK_M tile of b's queries on query head h.

FP8 (float8_e4m3fn) caches: K and V are widened to q's dtype (exact) as they are loaded; k_scale folds
into the softmax scale and v_scale into the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import dot_precision, pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q, q_pos, m, l, acc, n0, kv_end, b, kvh, cache_ptr, tables_ptr, qk_scale,
    stride_ckv, stride_cblk, stride_coff, stride_chead, stride_tb, dmask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N; MASKED applies causality and the end."""
    toks = n0 + tl.arange(0, BLOCK_N)
    tmask = toks < kv_end
    phys = tl.load(tables_ptr + b * stride_tb + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
    offs = phys * stride_cblk + (toks % BLOCK_SIZE) * stride_coff + kvh * stride_chead  # [N]
    d = tl.arange(0, BLOCK_D)
    kv_mask = tmask[:, None] & dmask[None, :]
    k = tl.load(cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N]
    if MASKED:
        s = tl.where((toks[None, :] <= q_pos[:, None]) & tmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(cache_ptr + stride_ckv + offs[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    cache_ptr,  # [2, NB, BS, KV, D], head_dim contiguous
    tables_ptr,  # [B, MB] int32
    query_start_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [T, H, D]
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ckv, stride_cblk, stride_coff, stride_chead,
    stride_tb,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    v_scale, FP8: tl.constexpr,
):
    # Reversed so the longest causal tiles (last queries) of each (head, sequence) start first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len
    kvh = h // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    d = tl.arange(0, BLOCK_D)
    rmask = rows < q_len
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # [M, D]
    q_pos = ctx + rows  # [M]

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(seq_len, ctx + (tile + 1) * BLOCK_M)  # the tile's last query sees up to here
    # Keys below the tile's first query position are visible to every row: no mask in that phase.
    open_end = (tl.minimum(ctx + tile * BLOCK_M + 1, kv_end) // BLOCK_N) * BLOCK_N
    for n0 in range(0, open_end, BLOCK_N):
        m, l, acc = _attend_tile(q, q_pos, m, l, acc, n0, kv_end, b, kvh, cache_ptr, tables_ptr, qk_scale,
                                 stride_ckv, stride_cblk, stride_coff, stride_chead, stride_tb, dmask,
                                 BLOCK_SIZE, BLOCK_N, BLOCK_D, PRECISION, False)
    for n0 in range(open_end, kv_end, BLOCK_N):
        m, l, acc = _attend_tile(q, q_pos, m, l, acc, n0, kv_end, b, kvh, cache_ptr, tables_ptr, qk_scale,
                                 stride_ckv, stride_cblk, stride_coff, stride_chead, stride_tb, dmask,
                                 BLOCK_SIZE, BLOCK_N, BLOCK_D, PRECISION, True)

    # Every row sees key 0 at least, so l > 0 on real rows; padded rows are masked at the store.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if FP8:
        out = out * v_scale
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, NB, BS, KV, D], this step's K/V already written
    block_tables: torch.Tensor,  # [B, MB] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    max_query_len: int,  # host-side bound on the grid (prefill runs eagerly)
    scale: float,
    k_scale: float = 1.0,  # FP8 caches: real K = stored * k_scale (ignored for other dtypes)
    v_scale: float = 1.0,
) -> torch.Tensor:  # [T, H, D]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    out = torch.empty_like(q)
    # 128x64 tiles with 8 warps: the usual flash-attention shape for head_dim 128 on Hopper.
    block_m, block_n, warps = (128, 64, 8) if q.is_cuda else (16, 16, 4)
    grid = (triton.cdiv(max_query_len, block_m), num_heads, block_tables.shape[0])
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out, scale * _LOG2E * (k_scale if fp8 else 1.0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        HEAD_DIM=head_dim, GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(head_dim), PRECISION=dot_precision(q.dtype),
        v_scale=float(v_scale), FP8=fp8, num_warps=warps, num_stages=3 if q.is_cuda else 1,
    )
    return out
