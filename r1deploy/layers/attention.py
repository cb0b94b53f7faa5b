"""The paged GQA KV cache: its shape, its size per token, its dtype and FP8 scales. The attention itself
runs in an attention backend (r1deploy/attention: torch_backend.py on the CPU, triton_backend.py on CUDA).

Each layer's KV cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = K, 1 = V).

FP8 KV cache: a cache tensor of dtype float8_e4m3fn (the cache's dtype is the switch; nothing else is
passed) stores K / k_scale and V / v_scale, saturated to +-448, and reads back stored * scale. The
scales are per layer (LlamaAttention.k_scale / v_scale): 1.0 by default, as vLLM's, or calibrated
(set_kv_cache_scales, kv_scales_from_amax).
"""

from __future__ import annotations

import torch

from r1deploy.config import ModelConfig
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE, FP8_KV_MAX

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
