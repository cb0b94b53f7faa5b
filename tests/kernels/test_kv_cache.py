"""KV-cache scatter against index_copy_."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, REAL, SMALL

from r1deploy.kernels.kv_cache import write_kv_cache, write_kv_cache_ref


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
    write_kv_cache_ref(expected, k, v, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_small(dtype: torch.dtype) -> None:
    _check(23, SMALL, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_write_kv_real() -> None:
    _check(4096, REAL, torch.bfloat16)
