"""Block-scaled FP8 weights kept in FP8 on the device: the linear method and the build context.

`Fp8LinearMethod` is the QuantMethod of a Linear / MergedLinear holding DeepSeek's checkpoint format
as is: `weight` float8_e4m3fn [out, in] and `weight_scale_inv` fp32 [ceil(out/bn), ceil(in/bk)].
apply: on Hopper / Ada (sm_89+) with 128 x 128 tiles, the Triton W8A8 GEMM (activations quantised
per token per 128 channels, kernels/fp8_gemm); anywhere else (CPU, older GPUs, other tile sizes) the
weight is dequantised per call with the reference and multiplied in the activation dtype: slow but
exact, and it keeps the FP8 bytes the only resident copy (that path is for tests and debugging; the
loader dequantises at load instead unless FP8 is asked for explicitly).

`building_fp8(block)`: the loader builds the model inside it. DeepSeek reads `current_fp8_block()` once and
passes FP8 explicitly to its dense MLPs and shared experts (quant/methods.LinearQuant: tensor-parallel linears
included); the routed experts read it too (layers/moe/experts_dense.resident_method) and allocate FP8 stacks.
Linears built without a method (layers/mla.py passes none yet) are switched by a module-registration hook:
every plain Linear / MergedLinear the moment it is attached to its parent, before the next layer is allocated
(a transient bf16 weight of one layer, never the whole model), except the ones R1 keeps or needs in the model
dtype (BF16_LINEARS).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.layers.linear import Linear, MergedLinear, quantized_parameter
from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block

# lm_head: bf16 in R1's checkpoint. kv_b_proj: FP8 there, but MLA reads its matrix directly (absorbed
# decode splits it per head), so the loader dequantises it, as SGLang does.
BF16_LINEARS = ("lm_head", "kv_b_proj")
_BLOCK: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("fp8_block", default=None)


def current_fp8_block() -> tuple[int, int] | None:
    """The weight tile (rows, cols) of the FP8 model being built; None: build in the model dtype."""
    return _BLOCK.get()


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


def _switch_to_fp8(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Global module-registration hook; acts only inside building_fp8 (a context variable, so other
    threads building models meanwhile are untouched)."""
    block = _BLOCK.get()
    # Exact types: the tensor-parallel subclasses (layers/parallel.py) stay in the model dtype.
    if (block is not None and type(child) in (Linear, MergedLinear) and child.quant_method is None
            and name not in BF16_LINEARS):
        child.set_quant_method(Fp8LinearMethod(block))


@contextlib.contextmanager
def building_fp8(block: tuple[int, int] | None) -> Iterator[None]:
    """Build the model with FP8 linears and experts (block: the checkpoint's weight_block_size);
    None builds as usual."""
    token = _BLOCK.set(block)
    handle = nn.modules.module.register_module_module_registration_hook(_switch_to_fp8)
    try:
        yield
    finally:
        handle.remove()
        _BLOCK.reset(token)
