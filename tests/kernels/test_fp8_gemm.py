"""Block-scaled FP8 GEMM and activation quantiser against quant/fp8_block's torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, rel_err

from r1deploy.kernels.fp8_gemm import act_quant, fp8_gemm, fp8_gemm_ref, fp8_linear
from r1deploy.quant import fp8_block

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_block.quantize_fp8_block(torch.randn(n, k) * k**-0.5)


def test_act_quant_matches_reference() -> None:
    x = torch.randn(7, 384) * torch.logspace(-3, 2, 384)  # blocks of very different ranges
    x[2, 128:256] = 0  # an all-zero block: the 1e-4 amax floor keeps the scale finite
    q_ref, s_ref = fp8_block.act_quant(x)
    q, s = act_quant(x.to(DEVICE))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 3)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.float().cpu(), q_ref.float())
    q32, s32 = act_quant(x.to(DEVICE), out_dtype=torch.float32)  # the decoded values, same numbers
    assert torch.equal(q32.cpu(), q_ref.float()) and torch.equal(s32.cpu(), s_ref)


@pytest.mark.parametrize("operands", ["fp8", "decoded"])
@pytest.mark.parametrize(("out_dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fp8_gemm_small(operands: str, out_dtype: torch.dtype, tol: float) -> None:
    """N = 200 (a partial weight tile row), K = 384 (three K blocks), M = 37 (a partial row tile).
    "decoded" passes the exact FP8 values as fp32, the same kernel math through ordinary dots."""
    m, n, k = 37, 200, 384
    a, a_s = fp8_block.act_quant(torch.randn(m, k))
    b, b_s = _weight(n, k)
    ref = fp8_block.fp8_block_gemm(a, a_s, b, b_s, torch.float32)
    assert rel_err(fp8_gemm_ref(a, a_s, b, b_s, torch.float32), ref) < 1e-6
    if operands == "decoded":
        a, b = a.float(), b.float()
    out = fp8_gemm(a.to(DEVICE), a_s.to(DEVICE), b.to(DEVICE), b_s.to(DEVICE), out_dtype)
    assert out.dtype == out_dtype
    if DEVICE == "cuda" and operands == "fp8":
        # Hopper's FP8 tensor cores keep about 14 bits while they sum one 128-deep K block (DeepSeek-V3
        # section 3.3.2; hence the fp32 promotion per block): ~1.3e-4 here, exact in the interpreter.
        tol = max(tol, 5e-4)
    assert rel_err(out.cpu(), ref) < tol


def test_fp8_linear_576_rows() -> None:
    """kv_a_proj_with_mqa's shape class: 576 output rows (5 scale rows, the last one partial)."""
    x = torch.randn(3, 256)
    w, w_s = _weight(576, 256)
    out = fp8_linear(x.to(DEVICE), w.to(DEVICE), w_s.to(DEVICE), torch.float32)
    a, a_s = fp8_block.act_quant(x)
    assert rel_err(out.cpu(), fp8_block.fp8_block_gemm(a, a_s, w, w_s, torch.float32)) < 1e-5
    # and the quantisation error against the unquantised product stays at FP8's level
    assert rel_err(out.cpu(), x @ fp8_block.dequantize_fp8_block(w, w_s, torch.float32).T) < 0.05


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("n", "k"), [(2048, 7168), (576, 7168), (7168, 2048)])
@pytest.mark.parametrize("m", [1, 32, 256, 2048])
def test_fp8_gemm_real_shapes(m: int, n: int, k: int) -> None:
    """R1 shapes: expert gate/up 2048x7168, kv_a 576x7168, expert down 7168x2048; bf16 out."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    w, w_s = fp8_block.quantize_fp8_block(torch.randn(n, k, device="cuda") * k**-0.5)
    a, a_s = act_quant(x)
    a_ref, a_s_ref = fp8_block.act_quant(x)
    assert torch.equal(a_s, a_s_ref) and torch.equal(a.float(), a_ref.float())
    out = fp8_gemm(a, a_s, w, w_s, torch.bfloat16)
    assert rel_err(out, fp8_block.fp8_block_gemm(a_ref, a_s_ref, w, w_s, torch.float32)) < 1e-2
    assert rel_err(fp8_linear(x, w, w_s), out) == 0
