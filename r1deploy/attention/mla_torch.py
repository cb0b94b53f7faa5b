"""Multi-head latent attention in plain PyTorch: the CPU's MLA backend and the one reference of the Triton
MLA kernels (kernels/kv_cache.write_latent_cache, kernels/mla_decode.py).

Notation: dc = kv_lora_rank, dn = qk_nope, dr = qk_rope, dv = v_head_dim. Two equivalent forms over a
cache of [c_kv ; k_pe] rows (layers/mla.py explains the choice):
- expanded (prefill): kv_b_proj turns every cached latent into per-head K and V, then causal attention;
- absorbed (decode, verify): W_UK folded into the query, W_UV applied after attending, so attention is MQA
  with one (dc + dr)-wide key and a dc-wide value read straight from the cache.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from r1deploy.attention.base import MLABackend, MLAMetadata
from r1deploy.kernels.kv_quant import dequantize_kv, gather_cache, is_fp8, quantize_kv


def write_latent_cache(
    kv_cache: torch.Tensor,  # [num_blocks, block_size, dc + dr]
    latent: torch.Tensor,  # [T, dc]
    k_pe: torch.Tensor,  # [T, dr]
    slot_mapping: torch.Tensor,  # [T]; a negative slot (a CUDA graph's padding row) is dropped
    scale: float = 1.0,  # FP8 caches only: stored = value / scale, saturated
) -> None:
    slots = kv_cache.view(-1, kv_cache.shape[-1])  # [num_blocks * block_size, dc + dr]
    keep = slot_mapping >= 0
    rows = quantize_kv(torch.cat((latent[keep], k_pe[keep]), dim=-1), scale, kv_cache.dtype)  # [T, dc + dr]
    if is_fp8(kv_cache.dtype):  # index_copy_ has no FP8 kernel on the CPU: copy the bytes
        slots, rows = slots.view(torch.uint8), rows.view(torch.uint8)
    slots.index_copy_(0, slot_mapping[keep], rows)


def expanded_attention(
    q_nope: torch.Tensor,  # [L, H, dn]
    q_pe: torch.Tensor,  # [L, H, dr]
    cached: torch.Tensor,  # [S, dc + dr]: the sequence's dequantised latents; the L queries are its last L
    kv_b_weight: torch.Tensor,  # [H * (dn + dv), dc]
    scale: float,
) -> torch.Tensor:  # [L, H, dv]
    num_queries, num_heads, nope_dim = q_nope.shape
    seq_len = cached.shape[0]
    latent_dim = kv_b_weight.shape[1]
    latent, k_pe = cached.to(q_nope.dtype).split([latent_dim, cached.shape[1] - latent_dim], dim=-1)
    kv = F.linear(latent, kv_b_weight).view(seq_len, num_heads, -1)  # [S, H, dn + dv]
    k_nope, v = kv.split([nope_dim, kv.shape[-1] - nope_dim], dim=-1)
    k = torch.cat((k_nope, k_pe[:, None, :].expand(-1, num_heads, -1)), dim=-1)  # [S, H, dn + dr]
    q = torch.cat((q_nope, q_pe), dim=-1)  # [L, H, dn + dr]
    # Query j sits at position S - L + j and sees keys up to there (bottom-right causal alignment;
    # SDPA's is_causal aligns top-left, which is only right when nothing was cached).
    mask = None
    if num_queries != seq_len:
        key_pos = torch.arange(seq_len, device=q.device)
        mask = key_pos[None, :] <= (torch.arange(num_queries, device=q.device) + seq_len - num_queries)[:, None]
    value_dim = v.shape[-1]
    if mask is None and value_dim < q.shape[-1]:
        # SDPA's flash kernel needs one head dim for q, k and v (R1: 192 vs 128); zero columns of v
        # give zero output columns, sliced off, instead of the math fallback's [H, L, S] scores.
        v = F.pad(v, (0, q.shape[-1] - value_dim))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # [H, L|S, .]
        attn_mask=mask, is_causal=mask is None, scale=scale)
    return out.transpose(0, 1)[..., :value_dim]  # [L, H, dv]


def latent_attention(
    q: torch.Tensor,  # [B * query_len, H, dc + dr]: [q_lat ; q_pe], each sequence's rows in order
    kv_cache: torch.Tensor,  # [num_blocks, block_size, dc + dr]
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B], this step's tokens included
    latent_dim: int,
    scale: float,
    kv_scale: float = 1.0,  # FP8 caches only
    query_len: int = 1,
    max_seq_len: int | None = None,  # bound on seq_lens: how many cached rows to gather (default: the table)
) -> torch.Tensor:  # [B * query_len, H, dc], in q's dtype widened to at least fp32
    """MQA of all heads over each sequence's cached rows, value = c_kv; row j of a sequence sees its first
    seq_len - (query_len - 1 - j) rows. A row that sees nothing (a graph's padding row) is zeros."""
    num_rows, num_heads, width = q.shape
    num_seqs, block_size = block_tables.shape[0], kv_cache.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    num_blocks = block_tables.shape[1] if max_seq_len is None else math.ceil(max_seq_len / block_size)
    cached = dequantize_kv(gather_cache(kv_cache, block_tables[:, :num_blocks].long()).flatten(1, 2), kv_scale, acc)
    query = q.to(acc).view(num_seqs, query_len, num_heads, width)
    scores = torch.einsum("bqhc,bsc->bqhs", query, cached) * scale  # [B, Q, H, S]
    visible = seq_lens.view(-1, 1) - (query_len - 1 - torch.arange(query_len, device=q.device))  # [B, Q]
    valid = torch.arange(cached.shape[1], device=q.device) < visible[..., None]  # [B, Q, S]
    probs = scores.masked_fill(~valid[:, :, None, :], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    out = torch.einsum("bqhs,bsc->bqhc", probs, cached[..., :latent_dim])  # [B, Q, H, dc]
    return out.reshape(num_rows, num_heads, latent_dim)


def absorbed_decode(
    q_nope: torch.Tensor,  # [B * query_len, H, dn]: each sequence's last query_len tokens
    q_pe: torch.Tensor,  # [B * query_len, H, dr]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, dc + dr]
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    max_seq_len: int,
    kv_b_weight: torch.Tensor,  # [H * (dn + dv), dc]
    scale: float,
    kv_scale: float = 1.0,  # FP8 caches only
    query_len: int = 1,
) -> torch.Tensor:  # [B * query_len, H, dv]
    _, num_heads, nope_dim = q_nope.shape
    latent_dim = kv_b_weight.shape[1]
    acc = torch.promote_types(q_nope.dtype, torch.float32)  # fp32 math for bf16 models
    w_kv_b = kv_b_weight.to(acc).view(num_heads, -1, latent_dim)  # [H, dn + dv, dc]
    w_uk, w_uv = w_kv_b[:, :nope_dim], w_kv_b[:, nope_dim:]  # [H, dn, dc], [H, dv, dc]
    q_lat = torch.einsum("bhn,hnc->bhc", q_nope.to(acc), w_uk)  # [R, H, dc]
    query = torch.cat((q_lat, q_pe.to(acc)), dim=-1)  # [R, H, dc + dr]
    out_lat = latent_attention(query, kv_cache, block_tables, seq_lens, latent_dim, scale, kv_scale, query_len,
                               max_seq_len)
    return torch.einsum("bhc,hvc->bhv", out_lat, w_uv).to(q_nope.dtype)  # [R, H, dv]


def new_output(q_nope: torch.Tensor, kv_b_weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised [T, H, dv] for the attention output (dv from kv_b_proj's [H * (dn + dv), dc])."""
    num_tokens, num_heads, nope_dim = q_nope.shape
    return q_nope.new_empty(num_tokens, num_heads, kv_b_weight.shape[0] // num_heads - nope_dim)


def expanded_prefills(
    out: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, metadata: MLAMetadata,
    kv_b_weight: torch.Tensor, scale: float, kv_scale: float,
) -> None:
    """The prefilling sequences' rows of out [T, H, dv], one expanded attention each (both backends: the
    expanded form is compute-bound GEMMs and SDPA, which PyTorch already runs at speed)."""
    block_size = kv_cache.shape[1]
    for seq, start, query_len, seq_len in metadata.prefills:
        table = metadata.block_tables[seq, : math.ceil(seq_len / block_size)].long()
        cached = dequantize_kv(gather_cache(kv_cache, table).flatten(0, 1)[:seq_len], kv_scale, q_nope.dtype)
        rows = slice(start, start + query_len)
        out[rows] = expanded_attention(q_nope[rows], q_pe[rows], cached, kv_b_weight, scale)


class TorchMLABackend(MLABackend):
    """Runs anywhere; on CUDA a debugging reference, run eagerly (padding rows dropped by a boolean mask)."""

    name: ClassVar[str] = "torch"
    supports_cuda_graphs: ClassVar[bool] = False

    def forward(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
        kv_cache: torch.Tensor, metadata: MLAMetadata, kv_b_weight: torch.Tensor, scale: float,
        kv_scale: float = 1.0,
    ) -> torch.Tensor:
        write_latent_cache(kv_cache, latent, k_pe, metadata.slot_mapping, kv_scale)
        out = new_output(q_nope, kv_b_weight)
        if metadata.decode_tokens is not None:
            rows = metadata.decode_tokens
            out[rows] = absorbed_decode(q_nope[rows], q_pe[rows], kv_cache, metadata.decode_block_tables,
                                        metadata.decode_seq_lens, metadata.decode_max_len, kv_b_weight, scale,
                                        kv_scale, metadata.decode_query_len)
        expanded_prefills(out, q_nope, q_pe, kv_cache, metadata, kv_b_weight, scale, kv_scale)
        return out
