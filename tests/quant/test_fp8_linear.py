"""The FP8 linear method (quant/fp8_linear) against dequantise-then-F.linear, its merged-shard loaders,
and LinearQuant's choice of layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1deploy.distributed.group import TPGroup
from r1deploy.layers.linear import Linear, MergedLinear
from r1deploy.layers.parallel import ColumnParallelLinear
from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block, fp8_block_gemm, quantize_fp8_block
from r1deploy.quant.fp8_block import act_quant as act_quant_ref
from r1deploy.quant.fp8_linear import Fp8LinearMethod
from r1deploy.quant.methods import NO_QUANT, LinearQuant

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _load(layer: Linear, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, tensor, *([shard] if shard else []))


@pytest.mark.parametrize(("out_features", "in_features", "block"), [(200, 96, (64, 32)), (576, 256, (128, 128))])
def test_fp8_linear_matches_dequantised_f_linear(out_features: int, in_features: int, block: tuple[int, int]) -> None:
    """Partial edge tiles (200 rows in 64-row tiles; kv_a_proj's 576 = 4.5 tiles); with a bias."""
    layer = Linear(in_features, out_features, bias=True, quant_method=Fp8LinearMethod(block))
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale_inv.shape == (-(-out_features // block[0]),
                                                                               -(-in_features // block[1]))
    q, scale_inv = quantize_fp8_block(torch.randn(out_features, in_features), block)
    bias = torch.randn(out_features)
    _load(layer, "weight", q)
    _load(layer, "weight_scale_inv", scale_inv)
    _load(layer, "bias", bias)
    x = torch.randn(2, 5, in_features)
    expected = F.linear(x, dequantize_fp8_block(q, scale_inv, torch.float32, block), bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)  # the CPU path is that computation


def test_merged_fp8_shards_line_up_on_tiles() -> None:
    """gate/up of 256 rows each: the shards' scale rows are [0, 2) and [2, 4) of the merged scales."""
    layer = MergedLinear(128, {"gate": 256, "up": 256}, bias=False, quant_method=Fp8LinearMethod((128, 128)))
    parts = {s: quantize_fp8_block(torch.randn(256, 128)) for s in ("gate", "up")}
    for shard, (q, scale_inv) in parts.items():
        _load(layer, "weight", q, shard)
        _load(layer, "weight_scale_inv", scale_inv, shard)
    x = torch.randn(3, 128)
    whole = torch.cat([dequantize_fp8_block(q, s, torch.float32) for q, s in parts.values()])
    torch.testing.assert_close(layer(x), F.linear(x, whole), rtol=0, atol=0)


def test_merged_fp8_shards_sharing_a_tile_are_refused() -> None:
    """A 200-row gate would leave the up shard starting inside scale row 1: a clear error, not wrong scales."""
    layer = MergedLinear(128, {"gate": 200, "up": 200}, bias=False, quant_method=Fp8LinearMethod((128, 128)))
    _, scale_inv = quantize_fp8_block(torch.randn(200, 128))
    _load(layer, "weight_scale_inv", scale_inv, "gate")  # starts at row 0: fine
    with pytest.raises(ValueError, match="starts at output row 200, inside a 128-row"):
        _load(layer, "weight_scale_inv", scale_inv, "up")


def test_linear_quant_gives_fp8_to_every_linear_it_is_asked_for() -> None:
    """The loader's FP8 choice (quant/methods.LinearQuant) reaches plain, merged and tensor-parallel linears
    alike; without it every linear holds the model dtype."""
    quant = LinearQuant(fp8_block=(16, 16))
    plain = Linear(64, 32, bias=False, quant_method=quant("model.layers.0.self_attn.q_a_proj"))
    merged = MergedLinear(64, {"gate": 32, "up": 32}, bias=False, quant_method=quant("model.layers.0.mlp.gate_up_proj"))
    column = ColumnParallelLinear(64, 64, False, TPGroup(rank=0, size=2, device=torch.device("cpu")),
                                  quant_method=quant("model.layers.0.self_attn.q_b_proj"))
    assert plain.weight.dtype == FP8_DTYPE and plain.weight_scale_inv.shape == (2, 4)
    assert merged.weight.dtype == FP8_DTYPE
    # the merged layer's quantised parameters load through its shard loader
    assert merged.weight_scale_inv.weight_loader == merged.weight_loader
    assert column.weight.dtype == FP8_DTYPE and column.weight_scale_inv.shape == (2, 4)  # this rank's 32 rows
    for unquantised in (NO_QUANT, LinearQuant()):
        layer = Linear(64, 32, bias=False, quant_method=unquantised("model.layers.0.self_attn.q_a_proj"))
        assert layer.quant_method is None and layer.weight.dtype == torch.get_default_dtype()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("n", "k"), [(1536, 7168), (576, 7168), (7168, 16384)])
@pytest.mark.parametrize("m", [1, 64, 1024])
def test_fp8_linear_method_runs_the_triton_gemm(m: int, n: int, k: int) -> None:
    """On sm_89+ apply is act_quant + the W8A8 GEMM: DeepSeek's fp8_gemm semantics (R1's q_a, kv_a, o)."""
    with torch.device("cuda"):
        layer = Linear(k, n, bias=False, quant_method=Fp8LinearMethod((128, 128)))
    q, scale_inv = quantize_fp8_block(torch.randn(n, k, device="cuda") * k**-0.5)
    layer.weight.data.copy_(q)
    layer.weight_scale_inv.data.copy_(scale_inv)
    x = torch.randn(m, k, device="cuda").bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    a, a_s = act_quant_ref(x)
    ref = fp8_block_gemm(a, a_s, q, scale_inv, torch.float32)
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-2
