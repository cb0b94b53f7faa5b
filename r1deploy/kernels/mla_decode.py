"""Absorbed MLA decode over the paged latent cache, split along the context (flash-decoding).

The cache holds one 576-wide row per token (R1): [c_kv (dc = kv_lora_rank) ; k_pe (dr)], shared by
every head, so decode is MQA with key [c_kv ; k_pe] and value c_kv. W_UK is folded into the query
(q_lat = W_UK^T q_nope) and W_UV applied to the attended latent, both as torch bmm's around the kernel.
Program (b, head group, split) attends BLOCK_H heads of sequence b over one of NUM_SPLITS equal
slices of its context, reading each cached row once for all of them (the latent tile is both key and
value), and writes an fp32 partial with its log-sum-exp; a second kernel merges the splits. Slices are
cut from the sequence's length on the device (cdiv(seq_len, NUM_SPLITS) tokens each), so the grid
depends only on the batch and head counts (static under CUDA graphs) while every program gets a share
of the actual context, whatever the block table's width. NUM_SPLITS is chosen to fill the GPU about
twice: splitting further only adds partial-result traffic (128 heads x 512 fp32 per split for R1,
about the size of 256 cached tokens).

FP8 (float8_e4m3fn) caches hold row / kv_scale, one scale for the whole row (the latent is both key and
value): tiles are widened to the query's dtype as they are loaded (exact), kv_scale folds into the
softmax scale and into each split's output, so the inner loop does no extra math (as decode_attention).
The query stays in the model dtype.

QUERY_LEN query tokens per sequence (1 for decode, 1+k for a speculative verify step): q's rows are in
sequence order, row r being token r % QUERY_LEN of sequence r // QUERY_LEN, which causally sees all but the
sequence's last QUERY_LEN - 1 - r % QUERY_LEN cached tokens. QUERY_LEN is a compile-time constant: at 1
the kernels are exactly the one-token decode kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import dot_precision, pow2, query_row_sequence

_LOG2E = 1.4426950408889634
MERGE_BLOCK_P = 32  # splits per step of the merge loop
MAX_SPLITS = 16


@triton.jit
def _mla_split_kernel(
    q_ptr,  # [B * QUERY_LEN, H, DC + DR]: [q_lat ; q_pe], in the cache dtype (an FP8 cache: the model dtype)
    cache_ptr,  # [NB, BS, DC + DR]
    tables_ptr,  # [B, MB]
    seq_lens_ptr,  # [B]
    part_out_ptr,  # [B, H, S, DC] fp32, already divided by the split's softmax sum
    part_lse_ptr,  # [B, H, S] fp32, log2-sum-exp2 of the split's scaled scores
    qk_scale,  # softmax scale (mscale^2 included) * log2(e), FP8: * kv_scale
    kv_scale,  # FP8 only: real row = stored * kv_scale
    stride_qb, stride_qh, stride_cblk, stride_coff, stride_tb,
    NUM_HEADS: tl.constexpr, DC: tl.constexpr, DR: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    FP8: tl.constexpr, QUERY_LEN: tl.constexpr,
):
    row = tl.program_id(0)  # query row: sequence b's token row % QUERY_LEN
    hg = tl.program_id(1)
    split = tl.program_id(2)
    b, seq_len = query_row_sequence(row, seq_lens_ptr, QUERY_LEN)
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < NUM_HEADS
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    cmask = c < DC
    rmask = r < DR
    q_rows = q_ptr + row * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_rows + c[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0)  # [H, C]
    q_pe = tl.load(q_rows + DC + r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)  # [H, R]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tmask = toks < end
        phys = tl.load(tables_ptr + b * stride_tb + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        rows = cache_ptr + phys * stride_cblk + (toks % BLOCK_SIZE) * stride_coff  # [N]
        lat = tl.load(rows[:, None] + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)  # [N, C]
        pe = tl.load(rows[:, None] + DC + r[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)  # [N, R]
        if FP8:
            lat, pe = lat.to(q_lat.dtype), pe.to(q_pe.dtype)
        s = tl.dot(q_lat, tl.trans(lat), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(pe), s, input_precision=PRECISION) * qk_scale  # [H, N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=PRECISION)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if FP8:
        out = out * kv_scale
    live = start < seq_len  # splits past the end store nothing; the merge never reads them
    part_row = (row * NUM_HEADS + heads) * NUM_SPLITS + split  # [H]
    tl.store(part_out_ptr + part_row[:, None].to(tl.int64) * DC + c[None, :], out,
             mask=hmask[:, None] & cmask[None, :] & live)
    tl.store(part_lse_ptr + part_row, m + tl.log2(tl.where(l > 0, l, 1.0)), mask=hmask & live)


@triton.jit
def _mla_merge_kernel(
    part_out_ptr,  # [B, H, S, DC] fp32
    part_lse_ptr,  # [B, H, S] fp32
    seq_lens_ptr,  # [B]
    out_ptr,  # [B, H, DC] fp32
    NUM_HEADS: tl.constexpr, DC: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, QUERY_LEN: tl.constexpr,
):
    # Program (query row b, h, channel chunk); splits in chunks of BLOCK_P.
    b = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < DC
    _, seq_len = query_row_sequence(b, seq_lens_ptr, QUERY_LEN)
    used = tl.cdiv(seq_len, tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), 1))  # live splits (0 for an empty row)
    base = (b * NUM_HEADS + h) * NUM_SPLITS
    top_vec = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, used, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        top_vec = tl.maximum(top_vec, tl.load(part_lse_ptr + base + p, mask=p < used, other=float("-inf")))
    top = tl.where(used > 0, tl.max(top_vec, 0), 0.0)
    total_vec = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, used, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < used
        lse = tl.load(part_lse_ptr + base + p, mask=pmask, other=float("-inf"))
        w = tl.where(pmask, tl.exp2(lse - top), 0.0)
        parts = tl.load(part_out_ptr + (base + p).to(tl.int64)[:, None] * DC + c[None, :],
                        mask=pmask[:, None] & cmask[None, :], other=0.0)  # [P, C]
        acc += tl.sum(parts * w[:, None], 0)
        total_vec += w
    total = tl.sum(total_vec, 0)
    out = acc / tl.where(total > 0, total, 1.0)  # an empty row stays 0
    tl.store(out_ptr + (b * NUM_HEADS + h) * DC + c, out, mask=cmask)


def default_num_splits(num_seqs: int, head_groups: int, device: torch.device) -> int:
    """About two programs per multiprocessor, at most MAX_SPLITS splits of a sequence."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, num_seqs * head_groups)))


def mla_decode_attention(
    q: torch.Tensor,  # [B * query_len, H, DC + DR]: [q_lat ; q_pe], each sequence's query_len rows in order
    kv_cache: torch.Tensor,  # [NB, BS, DC + DR]
    block_tables: torch.Tensor,  # [B, MB]
    seq_lens: torch.Tensor,  # [B] on the device, this step's token included
    latent_dim: int,
    scale: float,
    num_splits: int | None = None,  # default: default_num_splits
    block_h: int = 16,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    kv_scale: float = 1.0,  # FP8 caches: real row = stored * kv_scale (ignored for other dtypes)
    query_len: int = 1,
) -> torch.Tensor:  # [B * query_len, H, DC] fp32: softmax(scale * q . k) @ c_kv per head
    """Graph-capturable: shapes and grid from tensor shapes only, no host reads of seq_lens."""
    num_seqs, num_heads, width = q.shape
    _, block_size, cache_width = kv_cache.shape
    assert width == cache_width and kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if not fp8:
        q = q.to(kv_cache.dtype)
    rope_dim = width - latent_dim
    block_h = max(16, min(block_h, pow2(num_heads)))  # tl.dot needs 16 rows
    head_groups = triton.cdiv(num_heads, block_h)
    num_splits = num_splits or default_num_splits(num_seqs, head_groups, q.device)
    part_out = torch.empty(num_seqs, num_heads, num_splits, latent_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(num_seqs, num_heads, latent_dim, dtype=torch.float32, device=q.device)
    block_c = pow2(latent_dim)
    _mla_split_kernel[(num_seqs, head_groups, num_splits)](
        q, kv_cache, block_tables, seq_lens, part_out, part_lse, scale * _LOG2E * (kv_scale if fp8 else 1.0),
        float(kv_scale),
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        NUM_HEADS=num_heads, DC=latent_dim, DR=rope_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_N=block_n or (32 if block_c >= 256 else 64), BLOCK_H=block_h, BLOCK_C=block_c,
        BLOCK_R=max(16, pow2(rope_dim)), PRECISION=dot_precision(q.dtype), FP8=fp8, QUERY_LEN=query_len,
        num_warps=num_warps or (4 if block_c <= 256 else 8), num_stages=num_stages,
    )
    merge_c = min(block_c, 128)
    _mla_merge_kernel[(num_seqs, num_heads, triton.cdiv(latent_dim, merge_c))](
        part_out, part_lse, seq_lens, out,
        NUM_HEADS=num_heads, DC=latent_dim, NUM_SPLITS=num_splits,
        BLOCK_P=min(pow2(num_splits), MERGE_BLOCK_P), BLOCK_C=merge_c, QUERY_LEN=query_len, num_warps=4,
    )
    return out


def mla_absorbed_decode(
    q_nope: torch.Tensor,  # [B, H, dn]
    q_pe: torch.Tensor,  # [B, H, dr], roped
    kv_cache: torch.Tensor,  # [NB, BS, dc + dr]
    block_tables: torch.Tensor,  # [B, MB]
    seq_lens: torch.Tensor,  # [B]
    kv_b_weight: torch.Tensor,  # [H * (dn + dv), dc]
    scale: float,
    num_splits: int | None = None,
    kv_scale: float = 1.0,  # FP8 caches only
    query_len: int = 1,  # q_nope / q_pe rows per sequence (B * query_len rows in all)
) -> torch.Tensor:  # [B * query_len, H, dv] in q_nope's dtype
    """The absorbed decode of attention/mla_torch.absorbed_decode, with the attention in Triton. The two
    absorptions run as batched GEMMs in the model dtype (fp32 accumulate), no weight copies."""
    _, num_heads, nope_dim = q_nope.shape
    latent_dim = kv_b_weight.shape[1]
    w_kv_b = kv_b_weight.view(num_heads, -1, latent_dim)  # [H, dn + dv, dc]
    w_uk, w_uv = w_kv_b[:, :nope_dim], w_kv_b[:, nope_dim:]  # [H, dn, dc], [H, dv, dc]
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, dc]
    # The query is in the cache dtype, except over an FP8 cache, whose tiles the kernel widens to the query's.
    dtype = q_nope.dtype if kv_cache.dtype == torch.float8_e4m3fn else kv_cache.dtype
    query = torch.cat((q_lat.to(dtype), q_pe.to(dtype)), dim=-1)  # [B, H, dc + dr]
    out_lat = mla_decode_attention(query, kv_cache, block_tables, seq_lens, latent_dim, scale, num_splits,
                                   kv_scale=kv_scale, query_len=query_len)
    out = torch.bmm(out_lat.to(w_uv.dtype).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B, dv]
    return out.transpose(0, 1).to(q_nope.dtype)
