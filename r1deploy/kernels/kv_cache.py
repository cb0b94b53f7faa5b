"""Scatter this step's K/V (GQA) or latents (MLA) into the paged cache at flat slots
(block_id * block_size + offset).

A negative slot is skipped: CUDA-graph batches pad their unused rows with slot -1, and the
grid is the (static) token count, so the kernel is capturable.

An FP8 (float8_e4m3fn) cache stores k / k_scale and v / v_scale (MLA: latent and k_pe / one scale),
computed in fp32 and saturated to +-448 before the (round-to-nearest-even) cast; the cache's dtype
switches it on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1deploy.kernels._common import pow2


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr,  # [T, KV, D] each, head_dim contiguous
    cache_ptr,  # [2, NB, BS, KV, D]
    slots_ptr,  # [T] int64
    k_scale, v_scale,  # FP8 only: stored = value / scale
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cblk, stride_coff, stride_chead,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cblk + (slot % BLOCK_SIZE) * stride_coff
    dst = dst + h[:, None] * stride_chead + d[None, :]  # [KV, D]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    if FP8:
        k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -448.0), 448.0)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """kv_cache [2, NB, BS, KV, D] in place; k, v [T, KV, D] (strided views of qkv are fine); slot_mapping [T].
    k_scale / v_scale are used only by an FP8 cache."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, float(k_scale), float(v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2], NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=pow2(num_kv_heads), BLOCK_D=pow2(head_dim), FP8=kv_cache.dtype == torch.float8_e4m3fn, num_warps=4,
    )


@triton.jit
def _write_latent_kernel(
    latent_ptr,  # [T, DC]
    k_pe_ptr,  # [T, DR]
    cache_ptr,  # [NB, BS, DC + DR]
    slots_ptr,  # [T] int64
    scale,  # FP8 only: stored = value / scale, one scale for the whole row
    stride_lt, stride_pt, stride_cblk, stride_coff,
    DC: tl.constexpr, DR: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cblk + (slot % BLOCK_SIZE) * stride_coff
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    latent = tl.load(latent_ptr + t * stride_lt + c, mask=c < DC)
    k_pe = tl.load(k_pe_ptr + t * stride_pt + r, mask=r < DR)
    if FP8:
        latent = tl.minimum(tl.maximum(latent.to(tl.float32) / scale, -448.0), 448.0)
        k_pe = tl.minimum(tl.maximum(k_pe.to(tl.float32) / scale, -448.0), 448.0)
    tl.store(dst + c, latent.to(cache_ptr.dtype.element_ty), mask=c < DC)
    tl.store(dst + DC + r, k_pe.to(cache_ptr.dtype.element_ty), mask=r < DR)


def write_latent_cache(
    kv_cache: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
    scale: float = 1.0,
) -> None:
    """kv_cache [NB, BS, DC + DR] in place; latent [T, DC] and k_pe [T, DR] (strided row views are fine);
    slot_mapping [T], negative slots skipped. One row per token, no concatenated copy.
    scale is used only by an FP8 cache."""
    num_tokens, latent_dim = latent.shape
    rope_dim = k_pe.shape[1]
    assert latent.stride(-1) == 1 and k_pe.stride(-1) == 1 and kv_cache.stride(-1) == 1
    _write_latent_kernel[(num_tokens,)](
        latent, k_pe, kv_cache, slot_mapping, float(scale),
        latent.stride(0), k_pe.stride(0), kv_cache.stride(0), kv_cache.stride(1),
        DC=latent_dim, DR=rope_dim, BLOCK_SIZE=kv_cache.shape[1], BLOCK_C=pow2(latent_dim),
        BLOCK_R=pow2(rope_dim), FP8=kv_cache.dtype == torch.float8_e4m3fn, num_warps=4,
    )
