"""Block-scaled FP8: dequantisation against a float64 reference (576 x 7168 included), round trips,
activation quantisation, the block-scaled GEMM reference and FP8 checkpoint pairing."""

from __future__ import annotations

import pytest
import torch

from r1deploy.quant.fp8_block import (
    FP8_DTYPE,
    FP8_MAX,
    act_quant,
    dequantize_fp8_block,
    fp8_block_gemm,
    quantize_fp8_block,
)
from r1deploy.quant.fp8_checkpoint import fp8_pairs


def reference_dequant(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:  # float64
    rows = torch.arange(q.shape[0]) // 128
    cols = torch.arange(q.shape[1]) // 128
    return q.double() * scale_inv.double()[rows[:, None], cols[None, :]]


def test_dequant_576_rows_matches_float64_reference() -> None:
    """R1's kv_a_proj_with_mqa: 576 rows -> 5 scale rows, the last tile 64 rows tall."""
    generator = torch.Generator().manual_seed(0)
    q = (torch.randn(576, 7168, generator=generator) * 100).clamp(-448, 448).to(FP8_DTYPE)  # in range: no NaN
    scale_inv = torch.rand(5, 56, generator=generator) * 1e-3 + 1e-5
    out = dequantize_fp8_block(q, scale_inv, torch.float32)
    torch.testing.assert_close(out.double(), reference_dequant(q, scale_inv), rtol=1e-7, atol=0)
    # Edge rows 512..575 use scale row 4, not a 576/5-row tiling.
    assert torch.equal(out[512:].double(), (q[512:].double() * scale_inv[4].double().repeat_interleave(128)).float().double())


@pytest.mark.parametrize("scale_shape", [(4, 56), (6, 56), (5, 57)])
def test_dequant_rejects_wrong_scale_grid(scale_shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="needs scales"):
        dequantize_fp8_block(torch.zeros(576, 7168, dtype=FP8_DTYPE), torch.ones(scale_shape), torch.bfloat16)


def test_round_trip_non_multiple_of_128() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(200, 300, generator=generator) * 0.05).to(torch.bfloat16)
    weight[130:, 260:] *= 40  # one edge tile with a much larger range
    q, scale_inv = quantize_fp8_block(weight)
    assert q.dtype == FP8_DTYPE and scale_inv.shape == (2, 3)
    back = dequantize_fp8_block(q, scale_inv, torch.bfloat16).double()
    w = weight.double()
    per_elem_scale = reference_dequant(torch.ones(200, 300), scale_inv)
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal spacing 2^-9 of the scale; bf16 output 2^-8.
    bound = w.abs() * (2**-4 + 2**-8) * 1.01 + per_elem_scale * 2**-10 * 1.01
    assert ((back - w).abs() <= bound).all()
    assert ((back - w).norm() / w.norm()) < 0.05


def test_act_quant_per_token_per_128() -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 384, generator=generator)
    x[1, 128:256] = 0  # an all-zero block must not divide by zero
    q, scale = act_quant(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (5, 3)
    torch.testing.assert_close(scale[0], x[0].view(3, 128).abs().amax(-1) / FP8_MAX)
    assert scale[1, 1] == pytest.approx(1e-4 / FP8_MAX) and torch.isfinite(q.float()).all()
    back = q.float().view(5, 3, 128) * scale[..., None]
    assert ((back.flatten(1) - x).norm() / x.norm()) < 0.05
    with pytest.raises(ValueError):
        act_quant(torch.randn(2, 100))


def test_block_gemm_matches_dequantised_float64_and_dense() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(7, 256, generator=generator)
    w = torch.randn(200, 256, generator=generator) / 16  # N not a multiple of 128
    x_q, x_s = act_quant(x)
    w_q, w_s = quantize_fp8_block(w)
    out = fp8_block_gemm(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    x_deq = (x_q.double().view(7, 2, 128) * x_s.double()[..., None]).flatten(1)
    expected = x_deq @ reference_dequant(w_q, w_s).T
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    dense = x.double() @ w.double().T
    assert ((out.double() - dense).norm() / dense.norm()) < 0.05


def test_checkpoint_stream_pairs_scales_in_either_order() -> None:
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(130, 64, generator=generator), torch.randn(64, 130, generator=generator)
    (qa, sa), (qb, sb) = quantize_fp8_block(a), quantize_fp8_block(b)
    norm = torch.ones(64)
    stream = [("a.weight", qa), ("a.weight_scale_inv", sa), ("b.weight_scale_inv", sb), ("n.weight", norm),
              ("b.weight", qb)]
    out = {name: (tensor, scale) for name, tensor, scale in fp8_pairs(stream)}
    assert set(out) == {"a.weight", "b.weight", "n.weight"} and out["n.weight"] == (norm, None)
    assert out["a.weight"][0] is qa and out["a.weight"][1] is sa
    assert out["b.weight"][0] is qb and out["b.weight"][1] is sb
    with pytest.raises(ValueError, match="sibling"):
        list(fp8_pairs([("a.weight", qa)]))
