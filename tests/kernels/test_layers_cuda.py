"""The Triton attention backend and the CUDA norm against their plain-PyTorch paths on the same random inputs."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import rel_err

from r1deploy.attention.selector import make_attention_backend
from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.layers.norm import RMSNorm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _attend(batch: ForwardBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    backend = make_attention_backend("triton" if q.is_cuda else "torch", "gqa")
    return backend.forward(q, k, v, cache, backend.build_metadata(batch), 128**-0.5)


def test_paged_attention_matches_cpu_path() -> None:
    heads, kv_heads, head_dim, block_size, num_blocks = 28, 4, 128, 16, 64
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).bfloat16()
    tables = [list(range(20)), list(range(20, 30)), list(range(30, 64))]
    # A chunk over a 100-token cached prefix, a fresh prompt, a single token: then one decode step each.
    for chunks, cached in [([[1] * 57, [2] * 130, [3]], [100, 0, 500]), ([[4], [5], [6]], [157, 130, 501])]:
        tokens = sum(len(c) for c in chunks)
        q = torch.randn(tokens, heads, head_dim).bfloat16()
        k, v = (torch.randn(tokens, kv_heads, head_dim).bfloat16() for _ in range(2))
        cpu_cache, gpu_cache = cache.clone(), cache.cuda()
        out_cpu = _attend(ForwardBatch.build(chunks, cached, tables, block_size), q, k, v, cpu_cache)
        out_gpu = _attend(ForwardBatch.build(chunks, cached, tables, block_size, "cuda"), q.cuda(), k.cuda(),
                          v.cuda(), gpu_cache)
        assert torch.equal(gpu_cache.cpu(), cpu_cache)
        assert rel_err(out_gpu.cpu(), out_cpu) < 1e-2
        cache = cpu_cache


def test_rms_norm_module_with_residual_matches_cpu_path() -> None:
    norm = RMSNorm(3584, 1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(3584))
    x, residual = torch.randn(64, 3584).bfloat16(), torch.randn(64, 3584).bfloat16()
    out_cpu, res_cpu = norm(x, residual)
    out_gpu, res_gpu = norm.cuda()(x.cuda(), residual.cuda())
    assert torch.equal(res_gpu.cpu(), res_cpu)
    assert rel_err(out_gpu.cpu(), out_cpu) < 2e-3
