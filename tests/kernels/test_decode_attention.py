"""Paged decode attention (flash-decoding, GQA-packed) against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, REAL, SMALL, paged_cache, rel_err

from r1deploy.attention.torch_backend import decode_attention as decode_attention_torch
from r1deploy.kernels.decode_attention import decode_attention
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE, quantize_kv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check(seq_lens: list[int], shape: dict, dtype: torch.dtype, partition: int, table_width: int | None,
           tol: float, fp8_scales: tuple[float, float] | None = None) -> None:
    """fp8_scales (k_scale, v_scale): the cache holds FP8 K / k_scale and V / v_scale, as the engine writes it."""
    cache, tables = paged_cache(seq_lens, shape["num_kv_heads"], shape["head_dim"], shape["block_size"], dtype,
                                table_width=table_width)
    scales = {}
    if fp8_scales is not None:
        cache = torch.stack([quantize_kv(cache[i] * 3, s, FP8_KV_DTYPE) for i, s in enumerate(fp8_scales)])
        scales = {"k_scale": fp8_scales[0], "v_scale": fp8_scales[1]}
    q = torch.randn(len(seq_lens), shape["num_heads"], shape["head_dim"], device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = shape["head_dim"] ** -0.5
    out = decode_attention(q, cache, tables, lens, scale, partition_size=partition, **scales)
    ref = decode_attention_torch(q.double(), cache if scales else cache.double(), tables, lens, scale, **scales)
    assert rel_err(out, ref) < tol
    assert bool((out[lens == 0] == 0).all())  # graph-padding rows come out as zeros, not NaN


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_small(dtype: torch.dtype, tol: float) -> None:
    # Partitions of 8 tokens: one sequence spans 5, one fits in one, one is empty (a padded graph row);
    # the table is wider than any sequence, as a CUDA graph's static table is.
    _check([37, 1, 0, 8], SMALL, dtype, partition=8, table_width=12, tol=tol)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("seq_lens", [[4096], [1, 17, 300, 2048, 4095, 513, 0, 64]])
def test_decode_real(seq_lens: list[int]) -> None:
    _check(seq_lens, REAL, torch.bfloat16, partition=256, table_width=4096 // 16, tol=1e-2)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_fp8_cache(dtype: torch.dtype, tol: float) -> None:
    """An FP8 cache with per-layer scales: the kernel against the reference reading the same bytes."""
    _check([37, 1, 0, 8], SMALL, dtype, partition=8, table_width=12, tol=tol, fp8_scales=(0.5, 0.25))


@pytest.mark.gpu
@cuda
def test_decode_fp8_cache_real() -> None:
    _check([1, 17, 300, 2048, 4095, 513, 0, 64], REAL, torch.bfloat16, partition=256, table_width=4096 // 16,
           tol=1e-2, fp8_scales=(1.0, 1.0))


@pytest.mark.gpu
@cuda
def test_decode_cuda_graph_replay() -> None:
    """Captured once, replayed after seq_lens, q and the tables change in place: no host reads of lengths."""
    shape, dtype = REAL, torch.bfloat16
    cache, tables = paged_cache([2048] * 4, shape["num_kv_heads"], shape["head_dim"], shape["block_size"], dtype)
    q = torch.randn(4, shape["num_heads"], shape["head_dim"], device=DEVICE, dtype=dtype)
    lens = torch.tensor([5, 2048, 700, 1], dtype=torch.int32, device=DEVICE)
    scale = shape["head_dim"] ** -0.5
    decode_attention(q, cache, tables, lens, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, cache, tables, lens, scale)
    lens.copy_(torch.tensor([1999, 3, 0, 1024], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    tables.copy_(tables.flip(0))
    graph.replay()
    assert rel_err(out, decode_attention_torch(q.double(), cache.double(), tables, lens, scale)) < 1e-2
