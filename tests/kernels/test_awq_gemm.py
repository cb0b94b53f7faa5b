"""AWQ INT4 kernels (fused dequantise-and-multiply for decode, dequantise for prefill) on the repacked
layout, against a float64 dequantised reference; random int32 words are valid packed data, so every
nibble pattern (the sign bit included) is exercised."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, rel_err

from r1deploy.kernels.awq_format import dequantize_awq_packed
from r1deploy.kernels.awq_gemm import AwqDecodeTuning, awq_dequantize, awq_gemm, awq_gemm_ref


def _awq_weights(k: int, n: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(-(2**31), 2**31, (n, k // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    zeros = torch.randint(0, 16, (n, k // group_size), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size, generator=gen) * 0.02 + 1e-3).half()
    return packed.to(DEVICE), zeros.to(DEVICE), scales.to(DEVICE)


def _reference(x: torch.Tensor, weights: tuple[torch.Tensor, ...], g: int, bias: torch.Tensor | None) -> torch.Tensor:
    w = dequantize_awq_packed(*(t.cpu() for t in weights), g, torch.float64)
    out = x.double().cpu() @ w.t()
    return out if bias is None else out + bias.double().cpu()


CASES = [(128, 1, 256, 96), (64, 3, 192, 64), (64, 5, 192, 64), (64, 17, 128, 40), (128, 9, 256, 48)]  # (g, M, K, N)


@pytest.mark.parametrize(("group_size", "m", "k", "n"), CASES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("split_k", [None, 2])  # 2: fp32 partial sums over K (decode on a GPU)
@pytest.mark.parametrize("tuning", [  # the split's partials summed by the last program, or by a second kernel;
    # 3 rows through the GEMV kernel as well as through the tile kernel
    AwqDecodeTuning(semaphore=True), AwqDecodeTuning(semaphore=False), AwqDecodeTuning(gemv_max_tokens=4)], ids=str)
def test_awq_gemm_matches_float64_reference(group_size: int, m: int, k: int, n: int, dtype: torch.dtype,
                                            tol: float, split_k: int | None, tuning: AwqDecodeTuning) -> None:
    weights = _awq_weights(k, n, group_size, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype) if m % 2 else None
    out = awq_gemm(x, *weights, group_size, bias, split_k=split_k, tuning=tuning)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out.cpu(), _reference(x, weights, group_size, bias)) < tol
    assert rel_err(out, awq_gemm_ref(x, *weights, group_size, bias)) < tol


def test_semaphore_counters_return_to_zero_between_launches() -> None:
    """Each split-K launch leaves its tile counters at zero, so repeated launches (CUDA-graph replays)
    keep agreeing with the reference."""
    from r1deploy.kernels.awq_gemm import _counters

    weights = _awq_weights(512, 48, 128, seed=7)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref = _reference(x, weights, 128, None)
    for _ in range(3):
        out = awq_gemm(x, *weights, 128, split_k=4, tuning=AwqDecodeTuning(semaphore=True))
        assert rel_err(out.cpu(), ref) < 1e-6
        assert int(_counters(x.device).abs().sum()) == 0


@pytest.mark.parametrize("group_size", [128, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_awq_dequantize_is_bit_exact(group_size: int, dtype: torch.dtype) -> None:
    weights = _awq_weights(256, 80, group_size, seed=3)
    out = awq_dequantize(*weights, group_size, dtype)
    ref = dequantize_awq_packed(*(t.cpu() for t in weights), group_size, torch.float64).to(dtype)
    assert out.shape == (80, 256) and torch.equal(out.cpu(), ref)


def test_awq_gemv_over_several_groups_per_program() -> None:
    """The one-token kernel with a K split of 2 and several groups per program."""
    weights = _awq_weights(1024, 256, 128, seed=7)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = awq_gemm(x, *weights, 128, split_k=2)
    assert rel_err(out.cpu(), _reference(x, weights, 128, None)) < 1e-6
