"""FP8 (e4m3) KV-cache values: what a cache of dtype float8_e4m3fn stores and how it reads back.

The cache's dtype is the switch (nothing else is passed): an FP8 cache stores value / scale, saturated
to +-448, and reads back stored * scale, with one scale per layer (K and V apart for GQA, one for MLA's
latent row). The kernels do the same arithmetic in Triton; these are their plain-PyTorch forms.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # largest finite e4m3fn value


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What the cache stores for x: x itself in an ordinary dtype; x / scale saturated, in FP8."""
    if not is_fp8(dtype):
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(dtype)


def dequantize_kv(stored: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache contents back to dtype: FP8 values (exact in bf16/fp16/fp32) times the layer's scale."""
    if not is_fp8(stored.dtype):
        return stored.to(dtype)
    return (stored.to(dtype) * scale) if scale != 1.0 else stored.to(dtype)


def gather_cache(cache: torch.Tensor, index: torch.Tensor | tuple) -> torch.Tensor:
    """cache[index] for any cache dtype: an FP8 cache is indexed through its bytes (advanced indexing has no
    float8 kernel on every device), then viewed back as FP8."""
    if not is_fp8(cache.dtype):
        return cache[index]
    return cache.view(torch.uint8)[index].view(cache.dtype)
