"""Paged GQA attention: plain PyTorch on the CPU, the Triton kernels of r1deploy.kernels on CUDA.

Each layer's KV cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = K, 1 = V). A step first writes its new K/V at `batch.slot_mapping`, then every query
token attends over its sequence's cached tokens, gathered through the block table. The new tokens
of a sequence are its last `query_len` cached tokens, so chunked prefill, prefix reuse and decode
are all the same computation.

FP8 KV cache: a cache tensor of dtype float8_e4m3fn (the cache's dtype is the switch; nothing else is
passed) stores K / k_scale and V / v_scale, saturated to +-448, and reads back stored * scale. The
scales are per layer (LlamaAttention.k_scale / v_scale): 1.0 by default, as vLLM's, or calibrated
(set_kv_cache_scales, kv_scales_from_amax).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from r1deploy.config import ModelConfig
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE, FP8_KV_MAX, dequantize_kv, is_fp8, quantize_kv

if TYPE_CHECKING:  # the engine imports the models, so only type-check this edge
    from r1deploy.engine.batch import ForwardBatch


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """EngineConfig.kv_cache_dtype -> the cache tensors' dtype ('auto' = the model's dtype)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


def kv_scales_from_amax(k_amax: float, v_amax: float) -> tuple[float, float]:
    """Calibrated per-layer scales from observed |K| / |V| maxima (vLLM's amax / 448 rule)."""
    return max(k_amax, 1e-8) / FP8_KV_MAX, max(v_amax, 1e-8) / FP8_KV_MAX


def set_kv_cache_scales(model: torch.nn.Module, scales: dict[int, tuple[float, float]]) -> None:
    """Per-layer (k_scale, v_scale) for the FP8 KV cache, by layer index (e.g. from a calibration run)."""
    layers = model.model.layers
    for index, (k_scale, v_scale) in scales.items():
        if not (k_scale > 0 and v_scale > 0):
            raise ValueError(f"layer {index}: KV scales must be > 0, got {(k_scale, v_scale)}")
        attn = layers[index].self_attn
        attn.k_scale, attn.v_scale = float(k_scale), float(v_scale)


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token costs across all layers (K and V)."""
    return 2 * config.num_hidden_layers * config.kv_size * dtype.itemsize


def write_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """k, v [T, KV, D] go to flat slots (block_id * block_size + offset); on CUDA a slot of -1 is skipped.
    An FP8 cache stores k / k_scale and v / v_scale, saturated."""
    if kv_cache.is_cuda:
        from r1deploy.kernels.kv_cache import write_kv_cache  # triton only where there is a GPU

        write_kv_cache(kv_cache, k, v, slot_mapping, k_scale, v_scale)
        return
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    slots = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    k, v = quantize_kv(k, k_scale, kv_cache.dtype), quantize_kv(v, v_scale, kv_cache.dtype)
    if is_fp8(kv_cache.dtype):  # index_copy_ has no FP8 kernel on the CPU: copy the bytes
        slots, k, v = slots.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    slots[0].index_copy_(0, slot_mapping, k)
    slots[1].index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KV, D] for this step's tokens -> attention output [T, H, D].
    k_scale / v_scale matter only for an FP8 cache (the cache's dtype decides)."""
    write_kv(kv_cache, k, v, batch.slot_mapping, k_scale, v_scale)
    decode = all(n == 1 for n in batch.query_lens_cpu)
    if q.is_cuda:
        return _triton_attention(q, kv_cache, batch, scale, decode, k_scale, v_scale)
    if decode:
        return _decode_attention(q, kv_cache, batch, scale, k_scale, v_scale)
    return _prefill_attention(q, kv_cache, batch, scale, k_scale, v_scale)


def _triton_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: float, decode: bool,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    from r1deploy.kernels.decode_attention import decode_attention
    from r1deploy.kernels.prefill_attention import prefill_attention

    if decode:
        # Graph-capturable: the grid comes from block_tables' (static) width, lengths stay on the device.
        return decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, scale,
                                k_scale=k_scale, v_scale=v_scale)
    return prefill_attention(
        q, kv_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens, max(batch.query_lens_cpu), scale,
        k_scale=k_scale, v_scale=v_scale,
    )


def _decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    # One query per sequence: gather every sequence's blocks at once and mask past seq_len.
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    max_blocks = math.ceil(max(batch.seq_lens_cpu) / batch.block_size)
    tables = batch.block_tables[:, :max_blocks].long()  # [B, MB]
    keys = dequantize_kv(kv_cache[0][tables].flatten(1, 2), k_scale, torch.float32)  # [B, S, KV, D]
    values = dequantize_kv(kv_cache[1][tables].flatten(1, 2), v_scale, torch.float32)
    queries = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).float()  # [B, KV, G, D]
    scores = torch.einsum("bkgd,bskd->bkgs", queries, keys) * scale  # [B, KV, G, S]
    valid = torch.arange(keys.shape[1], device=q.device)[None, :] < batch.seq_lens[:, None]  # [B, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgs,bskd->bkgd", scores.softmax(dim=-1), values)  # [B, KV, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(batch.query_lens_cpu, batch.seq_lens_cpu, strict=True)):
        table = batch.block_tables[i, : math.ceil(seq_len / batch.block_size)].long()
        keys = dequantize_kv(kv_cache[0][table].flatten(0, 1)[:seq_len], k_scale, q.dtype)  # [S, KV, D]
        values = dequantize_kv(kv_cache[1][table].flatten(0, 1)[:seq_len], v_scale, q.dtype)
        queries = q[start : start + query_len]  # [L, H, D]
        # Queries sit at the last query_len positions: query j sees keys up to seq_len - query_len + j.
        # SDPA's is_causal aligns top-left, which is only right when nothing was cached.
        mask = None
        if query_len != seq_len:
            key_pos = torch.arange(seq_len, device=q.device)
            query_pos = torch.arange(query_len, device=q.device) + (seq_len - query_len)
            mask = key_pos[None, :] <= query_pos[:, None]  # [L, S]
        attn = F.scaled_dot_product_attention(
            queries.transpose(0, 1),  # [H, L, D]
            keys.transpose(0, 1),  # [KV, S, D]
            values.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[start : start + query_len] = attn.transpose(0, 1)
        start += query_len
    return out
