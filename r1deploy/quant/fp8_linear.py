"""Block-scaled FP8 weights kept in FP8 on the device: the linear method.

`Fp8LinearMethod` is the QuantMethod of a Linear / MergedLinear holding DeepSeek's checkpoint format
as is: `weight` float8_e4m3fn [out, in] and `weight_scale_inv` fp32 [ceil(out/bn), ceil(in/bk)].
apply: on Hopper / Ada (sm_89+) with 128 x 128 tiles, the Triton W8A8 GEMM (activations quantised
per token per 128 channels, kernels/fp8_gemm); anywhere else (CPU, older GPUs, other tile sizes) the
weight is dequantised per call with the reference and multiplied in the activation dtype: slow but
exact, and it keeps the FP8 bytes the only resident copy (that path is for tests and debugging; the
loader dequantises at load instead unless FP8 is asked for explicitly).

The loader decides whether an FP8 checkpoint stays in FP8 (models/loader._fp8_block) and passes that choice
to the model, which gives each linear its method explicitly (quant/methods.LinearQuant), tensor-parallel
linears included (their loaders narrow `weight` by rows or columns and `weight_scale_inv` by whole tiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.layers.linear import quantized_parameter
from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block


def _triton_ok(x: torch.Tensor, block: tuple[int, int], in_features: int) -> bool:
    """kernels/fp8_gemm: fp8 tensor-core dots need sm_89+, its scales are 128 x 128 tiles and its
    activation quantiser needs K % 128 == 0."""
    return (x.is_cuda and block == (128, 128) and in_features % 128 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 9))


class Fp8LinearMethod:
    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        rows, cols = -(-out_features // self.block[0]), -(-in_features // self.block[1])
        layer.weight = quantized_parameter(out_features, in_features, dtype=FP8_DTYPE, output_dim=0, pack_factor=1)
        # One scale row per block[0] output rows: a merged layer's shards must start on a tile.
        layer.weight_scale_inv = quantized_parameter(rows, cols, dtype=torch.float32, output_dim=0,
                                                     pack_factor=self.block[0], input_pack=self.block[1])

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _triton_ok(x, self.block, layer.weight.shape[1]):
            from r1deploy.kernels.fp8_gemm import fp8_linear

            out = fp8_linear(x, layer.weight, layer.weight_scale_inv)
            return out if bias is None else out + bias
        weight = dequantize_fp8_block(layer.weight, layer.weight_scale_inv, x.dtype, self.block)  # [out, in]
        return F.linear(x, weight, bias)
