"""Absorbed MLA decode (Triton, split-K + LSE merge) against the Torch MLA backend (attention/mla_torch.py),
over ordinary and FP8 (e4m3, per-layer scale) latent caches."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_inputs import DEVICE, rel_err

from r1deploy.attention.mla_torch import absorbed_decode, latent_attention
from r1deploy.core.deepseek_config import yarn_get_mscale
from r1deploy.kernels import mla_decode
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE, quantize_kv
from r1deploy.kernels.mla_decode import mla_absorbed_decode, mla_decode_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# R1: 128 heads, kv_lora_rank 512, rope 64, nope 128, v 128, YaRN factor 40 with mscale_all_dim 1.0.
REAL = {"heads": 128, "dc": 512, "dr": 64, "dn": 128, "dv": 128, "block_size": 64}
# 20 heads: two head groups of 16, the second partly masked; dr 8 pads to a 16-wide tile.
SMALL = {"heads": 20, "dc": 32, "dr": 8, "dn": 16, "dv": 12, "block_size": 4}


def _scale(shape: dict) -> float:
    return (shape["dn"] + shape["dr"]) ** -0.5 * yarn_get_mscale(40.0, 1.0) ** 2


def _latent_cache(seq_lens: list[int], shape: dict, dtype: torch.dtype, table_width: int | None = None,
                  spare_blocks: int = 3, kv_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[NB, BS, dc + dr] random cache, tables [B, MB] int32 of shuffled distinct blocks, 0-padded.
    An FP8 cache holds randn * 4 * kv_scale quantised with kv_scale (stored values around +-4)."""
    block_size = shape["block_size"]
    needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    cache = torch.randn(num_blocks, block_size, shape["dc"] + shape["dr"], device=DEVICE)
    cache = quantize_kv(cache * 4 * kv_scale, kv_scale, dtype) if dtype == FP8_KV_DTYPE else cache.to(dtype)
    order = torch.randperm(num_blocks)
    tables = torch.zeros(len(seq_lens), table_width or max(1, max(needed)), dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = order[used : used + n].int()
        used += n
    return cache, tables.to(DEVICE)


def _inputs(seq_lens: list[int], shape: dict, dtype: torch.dtype, table_width: int | None = None,
            cache_dtype: torch.dtype | None = None, kv_scale: float = 1.0):
    cache, tables = _latent_cache(seq_lens, shape, cache_dtype or dtype, table_width, kv_scale=kv_scale)
    b, h = len(seq_lens), shape["heads"]
    q_nope = torch.randn(b, h, shape["dn"], device=DEVICE).to(dtype)
    q_pe = torch.randn(b, h, shape["dr"], device=DEVICE).to(dtype)
    kv_b = (torch.randn(h * (shape["dn"] + shape["dv"]), shape["dc"], device=DEVICE) * shape["dc"] ** -0.5).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q_nope, q_pe, cache, tables, lens, kv_b


def _compare_live(out: torch.Tensor, ref: torch.Tensor, lens: torch.Tensor) -> None:
    """The torch reference gives NaN for an empty (graph-padding) row; the kernel gives zeros."""
    live = lens > 0
    assert rel_err(out[live], ref[live]) < 1e-2
    assert bool((out[~live] == 0).all())


@pytest.mark.parametrize("merge_block_p", [32, 2])  # 2: the merge loops over partition chunks
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_mla_decode_attention_small(dtype: torch.dtype, tol: float, merge_block_p: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mla_decode, "MERGE_BLOCK_P", merge_block_p)
    seq_lens = [37, 1, 0, 8]  # 5 splits of 8 (the last of 5) / one live split / an empty padding row / 5 of 2
    cache, tables = _latent_cache(seq_lens, SMALL, dtype, table_width=12)
    q = torch.randn(len(seq_lens), SMALL["heads"], SMALL["dc"] + SMALL["dr"], device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = mla_decode_attention(q, cache, tables, lens, SMALL["dc"], _scale(SMALL), num_splits=5)
    ref = latent_attention(q.double(), cache.double(), tables, lens, SMALL["dc"], _scale(SMALL))
    assert rel_err(out, ref) < tol
    assert bool((out[lens == 0] == 0).all())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_mla_absorbed_decode_matches_layer(dtype: torch.dtype, tol: float) -> None:
    seq_lens = [37, 1, 13]
    q_nope, q_pe, cache, tables, lens, kv_b = _inputs(seq_lens, SMALL, dtype, table_width=12)
    out = mla_absorbed_decode(q_nope, q_pe, cache, tables, lens, kv_b, _scale(SMALL), num_splits=3)
    ref = absorbed_decode(q_nope.cpu().double(), q_pe.cpu().double(), cache.cpu().double(), tables.cpu(),
                          lens.cpu(), max(seq_lens), kv_b.cpu().double(), _scale(SMALL))
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.cpu(), ref) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kv_scale", [1.0, 0.05])
def test_mla_decode_attention_fp8_small(dtype: torch.dtype, tol: float, kv_scale: float) -> None:
    """An FP8 cache: the kernel widens stored rows to q's dtype and applies kv_scale outside the loop; the
    reference dequantises (stored * kv_scale) first. q stays in its own dtype."""
    seq_lens = [37, 1, 0, 8]
    cache, tables = _latent_cache(seq_lens, SMALL, FP8_KV_DTYPE, table_width=12, kv_scale=kv_scale)
    q = torch.randn(len(seq_lens), SMALL["heads"], SMALL["dc"] + SMALL["dr"], device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = mla_decode_attention(q, cache, tables, lens, SMALL["dc"], _scale(SMALL), num_splits=5,
                               kv_scale=kv_scale)
    ref = latent_attention(q.double(), cache, tables, lens, SMALL["dc"], _scale(SMALL), kv_scale)
    assert rel_err(out, ref) < tol
    assert bool((out[lens == 0] == 0).all())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_mla_absorbed_decode_fp8_matches_layer(dtype: torch.dtype, tol: float) -> None:
    seq_lens = [37, 1, 13]
    kv_scale = 0.05
    q_nope, q_pe, cache, tables, lens, kv_b = _inputs(seq_lens, SMALL, dtype, 12, FP8_KV_DTYPE, kv_scale)
    out = mla_absorbed_decode(q_nope, q_pe, cache, tables, lens, kv_b, _scale(SMALL), num_splits=3,
                              kv_scale=kv_scale)
    ref = absorbed_decode(q_nope.cpu().double(), q_pe.cpu().double(), cache.cpu(), tables.cpu(), lens.cpu(),
                          max(seq_lens), kv_b.cpu().double(), _scale(SMALL), kv_scale)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), ref) < tol


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("seq_lens", [[4096], [1, 17, 300, 2048, 4095, 513, 0, 64]])
def test_mla_decode_r1_shape(seq_lens: list[int]) -> None:
    q_nope, q_pe, cache, tables, lens, kv_b = _inputs(seq_lens, REAL, torch.bfloat16, table_width=4096 // 64)
    out = mla_absorbed_decode(q_nope, q_pe, cache, tables, lens, kv_b, _scale(REAL))
    ref = absorbed_decode(q_nope, q_pe, cache, tables, lens, max(seq_lens), kv_b, _scale(REAL))
    _compare_live(out, ref, lens)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kv_scale", [1.0, 0.05])
@pytest.mark.parametrize("seq_lens", [[4096], [1, 17, 300, 2048, 4095, 513, 0, 64]])
def test_mla_decode_r1_shape_fp8(seq_lens: list[int], kv_scale: float) -> None:
    """R1's shape over an FP8 cache, bf16 queries, against the torch absorbed decode (fp32, dequantised)."""
    q_nope, q_pe, cache, tables, lens, kv_b = _inputs(seq_lens, REAL, torch.bfloat16, 4096 // 64,
                                                      FP8_KV_DTYPE, kv_scale)
    out = mla_absorbed_decode(q_nope, q_pe, cache, tables, lens, kv_b, _scale(REAL), kv_scale=kv_scale)
    ref = absorbed_decode(q_nope, q_pe, cache, tables, lens, max(seq_lens), kv_b, _scale(REAL), kv_scale)
    _compare_live(out, ref, lens)


@pytest.mark.gpu
@cuda
def test_mla_decode_cuda_graph_replay() -> None:
    """Captured once, replayed after lengths, queries and tables change in place."""
    q_nope, q_pe, cache, tables, lens, kv_b = _inputs([2048] * 4, REAL, torch.bfloat16)
    lens.copy_(torch.tensor([5, 2048, 700, 1], dtype=torch.int32))
    mla_absorbed_decode(q_nope, q_pe, cache, tables, lens, kv_b, _scale(REAL))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_absorbed_decode(q_nope, q_pe, cache, tables, lens, kv_b, _scale(REAL))
    lens.copy_(torch.tensor([1999, 3, 0, 1024], dtype=torch.int32))
    q_nope.copy_(torch.randn_like(q_nope))
    q_pe.copy_(torch.randn_like(q_pe))
    tables.copy_(tables.flip(0))
    graph.replay()
    ref = absorbed_decode(q_nope, q_pe, cache, tables, lens, 2048, kv_b, _scale(REAL))
    _compare_live(out, ref, lens)
