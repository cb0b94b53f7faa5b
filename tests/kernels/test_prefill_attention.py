"""Varlen paged prefill attention (chunks on top of cached prefixes) against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, REAL, SMALL, paged_cache, rel_err

from r1deploy.attention.torch_backend import varlen_attention
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE, quantize_kv
from r1deploy.kernels.prefill_attention import prefill_attention


def _check(query_lens: list[int], cached: list[int], shape: dict, dtype: torch.dtype, tol: float,
           fp8_scales: tuple[float, float] | None = None) -> None:
    """fp8_scales (k_scale, v_scale): the cache holds FP8 K / k_scale and V / v_scale, as the engine writes it."""
    seq_lens = [q + c for q, c in zip(query_lens, cached, strict=True)]
    cache, tables = paged_cache(seq_lens, shape["num_kv_heads"], shape["head_dim"], shape["block_size"], dtype)
    scales = {}
    if fp8_scales is not None:
        cache = torch.stack([quantize_kv(cache[i] * 3, s, FP8_KV_DTYPE) for i, s in enumerate(fp8_scales)])
        scales = {"k_scale": fp8_scales[0], "v_scale": fp8_scales[1]}
    q = torch.randn(sum(query_lens), shape["num_heads"], shape["head_dim"], device=DEVICE).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = shape["head_dim"] ** -0.5
    out = prefill_attention(q, cache, tables, starts, lens, max(query_lens), scale, **scales)
    ref = varlen_attention(q.double(), cache if scales else cache.double(), tables, query_lens, seq_lens, scale, **scales)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_prefill_small(dtype: torch.dtype, tol: float) -> None:
    # A fresh prompt, a decode-like single token, chunks over cached prefixes (the last one long enough
    # for the unmasked phase), a tile-crossing chunk.
    _check([5, 1, 20, 33, 40], [0, 8, 13, 3, 37], SMALL, dtype, tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_prefill_fp8_cache(dtype: torch.dtype, tol: float) -> None:
    """An FP8 cache with per-layer scales: the kernel against the reference reading the same bytes."""
    _check([5, 1, 20, 33, 40], [0, 8, 13, 3, 37], SMALL, dtype, tol, fp8_scales=(0.5, 0.25))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("query_lens", "cached"), [([2048], [0]), ([1000, 37, 512, 1, 129], [0, 200, 1536, 700, 16])])
def test_prefill_real(query_lens: list[int], cached: list[int]) -> None:
    _check(query_lens, cached, REAL, torch.bfloat16, 1e-2)
