"""AWQ INT4 kernels (fused dequantise-and-multiply for decode, dequantise for prefill) against a float64
dequantised reference; random int32 words are valid packed data, so every nibble pattern is exercised."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, rel_err

from r1deploy.kernels.awq_gemm import awq_dequantize, awq_gemm, awq_gemm_ref
from r1deploy.quant.awq import dequantize_awq


def _awq_weights(k: int, n: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31, (k, n // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-(2**31), 2**31, (k // group_size, n // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 1e-3).half()
    return qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE)


def _reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    return x.double().cpu() @ dequantize_awq(qweight.cpu(), qzeros.cpu(), scales.cpu(), g, torch.float64)


@pytest.mark.parametrize(("group_size", "m", "k", "n"), [(128, 1, 256, 96), (64, 5, 192, 64), (64, 17, 128, 40)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("split_k", [None, 2])  # 2: fp32 partial sums over K, summed after (decode on a GPU)
def test_awq_gemm_matches_float64_reference(group_size: int, m: int, k: int, n: int, dtype: torch.dtype,
                                            tol: float, split_k: int | None) -> None:
    qweight, qzeros, scales = _awq_weights(k, n, group_size, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = awq_gemm(x, qweight, qzeros, scales, group_size, split_k=split_k)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out.cpu(), _reference(x, qweight, qzeros, scales, group_size)) < tol
    assert rel_err(out, awq_gemm_ref(x, qweight, qzeros, scales, group_size)) < tol


@pytest.mark.parametrize("group_size", [128, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_awq_dequantize_is_bit_exact(group_size: int, dtype: torch.dtype) -> None:
    qweight, qzeros, scales = _awq_weights(256, 80, group_size, seed=3)
    out = awq_dequantize(qweight, qzeros, scales, group_size, dtype)
    ref = dequantize_awq(qweight.cpu(), qzeros.cpu(), scales.cpu(), group_size, torch.float64).to(dtype)
    assert torch.equal(out.cpu(), ref)



def test_awq_gemv_over_several_k_tiles_per_program() -> None:
    """The one-token kernel with a K split of 2 and several K tiles per program (the GPU tuning's tile
    shape applies on CUDA; here the launcher's CPU shape)."""
    from r1deploy.kernels.awq_gemm import DECODE_TUNING

    qweight, qzeros, scales = _awq_weights(512, 256, 128, seed=7)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = awq_gemm(x, qweight, qzeros, scales, 128, split_k=2, tuning=DECODE_TUNING)
    assert rel_err(out.cpu(), _reference(x, qweight, qzeros, scales, 128)) < 1e-6
