"""Paged GQA attention in plain PyTorch: the CPU's backend and the one reference of the Triton kernels
(tests/kernels compare kernels/kv_cache.py, decode_attention.py and prefill_attention.py against these).

Every query token attends over its sequence's cached tokens, gathered through the block table; the new
tokens of a sequence are its last query_len cached tokens, so chunked prefill, prefix reuse, decode and a
verify step are all the same computation (bottom-right causal alignment). Computation runs in q's dtype
widened to at least fp32; an FP8 cache reads back stored * scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from r1deploy.attention.base import AttentionBackend, AttentionMetadata
from r1deploy.kernels.kv_quant import dequantize_kv, gather_cache, is_fp8, quantize_kv


def write_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """k, v [T, KV, D] to flat slots (block_id * block_size + offset) of kv_cache [2, NB, BS, KV, D]; a negative
    slot (a CUDA graph's padding row) is dropped. An FP8 cache stores k / k_scale and v / v_scale, saturated."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    slots = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    keep = slot_mapping >= 0
    k, v = quantize_kv(k[keep], k_scale, kv_cache.dtype), quantize_kv(v[keep], v_scale, kv_cache.dtype)
    if is_fp8(kv_cache.dtype):  # index_copy_ has no FP8 kernel on the CPU: copy the bytes
        slots, k, v = slots.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    slots[0].index_copy_(0, slot_mapping[keep], k)
    slots[1].index_copy_(0, slot_mapping[keep], v)


def decode_attention(
    q: torch.Tensor,  # [B * query_len, H, D]: each sequence's query_len rows, in order
    kv_cache: torch.Tensor,  # [2, NB, BS, KV, D]
    block_tables: torch.Tensor,  # [B, MB]
    seq_lens: torch.Tensor,  # [B], this step's tokens included
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    query_len: int = 1,
    gather_blocks: int | None = None,  # table columns to read (default: all)
) -> torch.Tensor:  # [B * query_len, H, D]
    """Every sequence's blocks gathered at once; row j of a sequence sees its first seq_len - (query_len - 1 - j)
    tokens. A row that sees nothing (a graph's empty padding row) comes out as zeros."""
    num_rows, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = block_tables.shape[0], kv_cache.shape[3]
    acc = torch.promote_types(q.dtype, torch.float32)
    tables = block_tables[:, : gather_blocks or block_tables.shape[1]].long()  # [B, MB]
    keys = dequantize_kv(gather_cache(kv_cache, (0, tables)).flatten(1, 2), k_scale, acc)  # [B, S, KV, D]
    values = dequantize_kv(gather_cache(kv_cache, (1, tables)).flatten(1, 2), v_scale, acc)
    queries = q.view(num_seqs, query_len, num_kv_heads, num_heads // num_kv_heads, head_dim).to(acc)
    scores = torch.einsum("bqkgd,bskd->bqkgs", queries, keys) * scale  # [B, Q, KV, G, S]
    visible = seq_lens.view(-1, 1) - (query_len - 1 - torch.arange(query_len, device=q.device))  # [B, Q]
    valid = torch.arange(keys.shape[1], device=q.device) < visible[..., None]  # [B, Q, S]
    probs = scores.masked_fill(~valid[:, :, None, None, :], float("-inf")).softmax(dim=-1)
    probs = probs.nan_to_num(0.0)  # rows with no visible token
    out = torch.einsum("bqkgs,bskd->bqkgd", probs, values)
    return out.reshape(num_rows, num_heads, head_dim).to(q.dtype)


def varlen_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, NB, BS, KV, D], this step's K/V already written
    block_tables: torch.Tensor,  # [B, MB]
    query_lens: Sequence[int],  # host lengths: per-sequence slices
    seq_lens: Sequence[int],
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [T, H, D]
    """One SDPA per sequence over its cached tokens, in q's dtype: query j of a sequence sits at position
    seq_len - query_len + j and sees keys up to there."""
    block_size = kv_cache.shape[2]
    out = torch.zeros_like(q)
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if not query_len:
            continue
        table = block_tables[i, : -(-seq_len // block_size)].long()
        keys = dequantize_kv(gather_cache(kv_cache, (0, table)).flatten(0, 1)[:seq_len], k_scale, q.dtype)
        values = dequantize_kv(gather_cache(kv_cache, (1, table)).flatten(0, 1)[:seq_len], v_scale, q.dtype)
        queries = q[start : start + query_len]  # [L, H, D]
        # SDPA's is_causal aligns top-left, which is only right when nothing was cached.
        mask = None
        if query_len != seq_len:
            key_pos = torch.arange(seq_len, device=q.device)
            query_pos = torch.arange(query_len, device=q.device) + (seq_len - query_len)
            mask = key_pos[None, :] <= query_pos[:, None]  # [L, S]
        attn = F.scaled_dot_product_attention(
            queries.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),  # [H | KV, L | S, D]
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )
        out[start : start + query_len] = attn.transpose(0, 1)
        start += query_len
    return out


class TorchAttentionBackend(AttentionBackend):
    """Runs anywhere; on CUDA a debugging reference, run eagerly (the write drops padding rows by a boolean
    mask, and the varlen path loops over sequences on the host)."""

    name: ClassVar[str] = "torch"
    supports_cuda_graphs: ClassVar[bool] = False

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
        metadata: AttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> torch.Tensor:
        write_kv(kv_cache, k, v, metadata.slot_mapping, k_scale, v_scale)
        if metadata.decode_query_len:
            return decode_attention(q, kv_cache, metadata.block_tables, metadata.seq_lens, scale, k_scale, v_scale,
                                    metadata.decode_query_len, metadata.gather_blocks)
        return varlen_attention(q, kv_cache, metadata.block_tables, metadata.query_lens_cpu, metadata.seq_lens_cpu,
                                scale, k_scale, v_scale)
