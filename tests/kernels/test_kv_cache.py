"""KV-cache scatter against index_copy_ (FP8 latent caches: against the quantise-then-copy reference)."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, REAL, SMALL

from r1deploy.attention.mla_torch import write_latent_cache as write_latent_cache_torch
from r1deploy.attention.torch_backend import write_kv as write_kv_torch
from r1deploy.kernels.kv_cache import write_kv_cache, write_latent_cache


def _check(num_tokens: int, shape: dict, dtype: torch.dtype) -> None:
    kv, d, bs = shape["num_kv_heads"], shape["head_dim"], shape["block_size"]
    num_blocks = num_tokens // bs + 4
    cache = torch.randn(2, num_blocks, bs, kv, d, device=DEVICE).to(dtype)
    expected = cache.clone()
    # k and v as the model has them: strided views into one fused projection output.
    qkv = torch.randn(num_tokens, 3 * kv * d, device=DEVICE).to(dtype)
    k = qkv[:, kv * d : 2 * kv * d].view(num_tokens, kv, d)
    v = qkv[:, 2 * kv * d :].view(num_tokens, kv, d)
    slots = torch.randperm(num_blocks * bs, device=DEVICE)[:num_tokens]
    slots[::5] = -1  # padded rows of a CUDA-graph batch write nothing
    write_kv_cache(cache, k, v, slots)
    write_kv_torch(expected, k, v, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_small(dtype: torch.dtype) -> None:
    _check(23, SMALL, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_write_kv_real() -> None:
    _check(4096, REAL, torch.bfloat16)


def _check_latent(num_tokens: int, latent_dim: int, rope_dim: int, dtype: torch.dtype,
                  cache_dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    block_size = 16
    num_blocks = num_tokens // block_size + 4
    cache = torch.randn(num_blocks, block_size, latent_dim + rope_dim, device=DEVICE).to(cache_dtype or dtype)
    expected = cache.clone()
    # latent and k_pe as MLA has them: column slices of kv_a_proj's output rows; * 200 * scale saturates
    # some values of an FP8 cache (|stored| > 448).
    projected = (torch.randn(num_tokens, latent_dim + rope_dim + 8, device=DEVICE) * 200 * scale).to(dtype)
    latent, k_pe = projected[:, :latent_dim], projected[:, latent_dim : latent_dim + rope_dim]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::4] = -1  # padded rows of a CUDA-graph batch write nothing
    write_latent_cache(cache, latent, k_pe, slots, scale)
    write_latent_cache_torch(expected, latent, k_pe, slots, scale)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))  # bytes: FP8 has no torch.equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_latent_small(dtype: torch.dtype) -> None:
    _check_latent(19, 24, 8, dtype)  # widths that are not powers of two


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_write_latent_fp8_small(dtype: torch.dtype, scale: float) -> None:
    _check_latent(19, 24, 8, dtype, torch.float8_e4m3fn, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_write_latent_real(cache_dtype: torch.dtype) -> None:
    _check_latent(4096, 512, 64, torch.bfloat16, cache_dtype)  # R1: 576 values per token
