"""AWQ INT4 weights in AutoAWQ's GEMM checkpoint format: the dense Linear / MergedLinear layers, and the
helpers DeepSeek's routed experts and plainly held layers load with.

Format (per linear, `in` x `out` with group size g):
  qweight int32 [in, out / 8]     eight 4-bit values per int32 along the output dim, in AutoAWQ's
                                  nibble order: nibble i holds column 8c + AWQ_ORDER[i]
  qzeros  int32 [in / g, out / 8] the zero points, packed the same way
  scales  fp16  [in / g, out]
  W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]   (W is [in, out]: y = x @ W + b)

`AWQLinearMethod` is the QuantMethod a Linear is built with: create_weights registers these three
parameters (with `output_dim` / `pack_factor` so a merged layer's loader narrows its shard along the
packed output columns). Once every shard is in, process_weights_after_loading (weights.load_weights calls
it) repacks them for the kernels, row-major along the input dim (`repack_awq`):
  weight_packed int32 [out, in / 8]  each row's inputs in chunks of one group of g (W = g / 8 words per
                                     chunk); word j of chunk c holds input c g + i W + j in nibble i
  weight_zeros  uint8 [out, in / g], weight_scales fp16 [out, in / g]
so decode streams every row's words contiguously and applies one scale and zero per row and group. apply
runs the matmul: on the CPU dequantise (exactly, in fp32) then matmul; on CUDA the Triton
dequantise-and-multiply kernels for small batches (decode) and a Triton dequantisation then a cuBLAS
GEMM for larger ones (prefill).

DeepSeek (models/deepseek_v3.py) loads its AWQ routed experts tensor by tensor: `repack_awq_tensor`
converts each checkpoint tensor into its part of repack_awq's layout as it arrives (each part depends on
its own tensor only), and `dequantize_awq_modules` turns the triple of a layer the model holds unquantised
(MLA's kv_b_proj) into one plain weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from r1deploy.errors import UsageError
from r1deploy.kernels.awq_format import PACK_FACTOR, dequantize_awq_packed
from r1deploy.layers.linear import quantized_parameter

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed int32 holds logical column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column j sits in nibble AWQ_REVERSE_ORDER[j]
AWQ_PARTS = ("qweight", "qzeros", "scales")  # a quantised linear's checkpoint tensors: `<module>.<part>`
# Up to this many tokens the fused kernel (weights read once, dequantised in registers) wins; past it
# the matmul is compute-bound and dequantise-then-GEMM runs at cuBLAS speed.
FUSED_MAX_TOKENS = 32


@dataclass(frozen=True)
class AWQConfig:
    group_size: int
    bits: int = 4
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: tuple[str, ...] = ()

    @staticmethod
    def from_hf(raw: dict[str, Any]) -> AWQConfig:
        """config.json's quantization_config (AutoAWQ also writes w_bit / q_group_size)."""
        method = str(raw.get("quant_method", "")).lower()
        if method != "awq":
            raise UsageError(f"quantization method {method!r} is not supported (only 'awq' and 'gptq')")
        bits = int(raw.get("bits", raw.get("w_bit", 4)))
        group_size = int(raw.get("group_size", raw.get("q_group_size", 128)))
        zero_point = bool(raw.get("zero_point", True))
        version = str(raw.get("version", "gemm")).lower()
        if bits != 4:
            raise UsageError(f"AWQ with {bits} bits is not supported (only 4)")
        if not zero_point:
            raise UsageError("AWQ without zero points is not supported")
        if version != "gemm":
            raise UsageError(f"AWQ version {version!r} is not supported (only 'gemm')")
        if group_size <= 0 or group_size % 16:
            raise UsageError(f"AWQ group_size must be a positive multiple of 16, got {group_size}")
        skip = tuple(raw.get("modules_to_not_convert") or ())
        return AWQConfig(group_size, bits, zero_point, version, skip)

    def quantises(self, prefix: str) -> bool:
        """Whether the checkpoint holds the module named `prefix` in AWQ (modules_to_not_convert: substrings)."""
        return not any(m and m in prefix for m in self.modules_to_not_convert)

    def linear_method(self, prefix: str = "") -> AWQLinearMethod | None:
        """The method for the linear named `prefix` (None: that layer stays unquantised)."""
        return AWQLinearMethod(self) if self.quantises(prefix) else None


class AWQLinearMethod:
    """create_weights / apply for one Linear; the weights themselves are the module's parameters."""

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        g = self.config.group_size
        if in_features % g or out_features % PACK_FACTOR:
            # A tensor-parallel layer passes its rank's share: a split that cuts a group or a packed word lands here.
            raise UsageError(f"AWQ layer {in_features} -> {out_features} (a tensor-parallel rank's share where split) "
                             f"needs in % {g} == 0 and out % 8 == 0")
        layer.qweight = quantized_parameter(in_features, out_features // PACK_FACTOR, dtype=torch.int32,
                                            output_dim=1, pack_factor=PACK_FACTOR, input_dim=0)
        layer.qzeros = quantized_parameter(in_features // g, out_features // PACK_FACTOR, dtype=torch.int32,
                                           output_dim=1, pack_factor=PACK_FACTOR, input_dim=0, input_pack=g)
        layer.scales = quantized_parameter(in_features // g, out_features, dtype=torch.float16, output_dim=1,
                                           pack_factor=1, input_dim=0, input_pack=g)
        layer.weight = None  # what forward would use unquantised; tied-embedding code checks it

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Checkpoint layout -> the kernels' (the module docstring); the checkpoint tensors are dropped."""
        packed, zeros, scales = repack_awq(layer.qweight, layer.qzeros, layer.scales, self.config.group_size)
        del layer.qweight, layer.qzeros, layer.scales
        for name, tensor in (("weight_packed", packed), ("weight_zeros", zeros), ("weight_scales", scales)):
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:  # [out, in]
        return dequantize_awq_packed(layer.weight_packed, layer.weight_zeros, layer.weight_scales,
                                     self.config.group_size, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not hasattr(layer, "weight_packed"):
            raise RuntimeError("AWQ layer used before process_weights_after_loading (weights.load_weights calls it)")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        g = self.config.group_size
        bias = None if bias is None else bias.to(x.dtype)
        if x.is_cuda and x2.shape[0] <= FUSED_MAX_TOKENS:
            from r1deploy.kernels.awq_gemm import awq_gemm

            out = awq_gemm(x2, layer.weight_packed, layer.weight_zeros, layer.weight_scales, g, bias)
        else:
            weight = dequantize_for_matmul(layer.weight_packed, layer.weight_zeros, layer.weight_scales, g, x.dtype)
            out = torch.nn.functional.linear(x2, weight, bias)
        return out.reshape(*shape[:-1], out.shape[-1])


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AutoAWQ's nibble order -> int32 [R, C] of values 0..15 in logical column order."""
    shifts = 4 * torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32, device=packed.device)  # column j's nibble
    return ((packed[:, :, None] >> shifts) & 0xF).flatten(1)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] of 0..15 -> int32 [R, C / 8] in AutoAWQ's order (the inverse of unpack_awq)."""
    rows, cols = values.shape
    return pack_nibbles(values.view(rows, cols // PACK_FACTOR, PACK_FACTOR)[:, :, list(AWQ_ORDER)])


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int [..., 8] of 0..15 -> int32 [...]: value i in bits 4i .. 4i + 3."""
    packed = torch.zeros(values.shape[:-1], dtype=torch.int64, device=values.device)
    for i in range(PACK_FACTOR):
        packed |= values[..., i].to(torch.int64) << (4 * i)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # two's complement: the top nibble sets the sign


def repack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors (module docstring) -> (weight_packed int32 [out, in / 8], weight_zeros uint8
    [out, in / g], weight_scales fp16 [out, in / g]), the kernels' layout."""
    return (repack_awq_tensor("qweight", qweight, group_size), repack_awq_tensor("qzeros", qzeros, group_size),
            repack_awq_tensor("scales", scales, group_size))


def repack_awq_tensor(part: str, tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    """One checkpoint tensor (`part` in AWQ_PARTS) -> its part of repack_awq's result."""
    if part == "qweight":
        q = unpack_awq(tensor).t()  # [out, in]
        out_features, in_features = q.shape
        words = group_size // PACK_FACTOR
        # input c g + i W + j -> [c, i, j]; word j of chunk c takes nibble i from [c, i, j]
        chunks = q.reshape(out_features, in_features // group_size, PACK_FACTOR, words).transpose(2, 3)
        return pack_nibbles(chunks).reshape(out_features, in_features // PACK_FACTOR).contiguous()
    if part == "qzeros":
        return unpack_awq(tensor).t().to(torch.uint8).contiguous()
    if part == "scales":
        return tensor.t().contiguous()
    raise ValueError(f"not an AWQ checkpoint tensor: {part!r} (expected one of {', '.join(AWQ_PARTS)})")


def dequantize_for_matmul(
    packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
) -> torch.Tensor:  # [out, in]
    """The repacked layout's W for a matmul in dtype: the Triton dequantisation on CUDA, the exact
    reference (dequantize_awq_packed) elsewhere."""
    if packed.is_cuda:
        from r1deploy.kernels.awq_gemm import awq_dequantize

        return awq_dequantize(packed, zeros, scales, group_size, dtype)
    return dequantize_awq_packed(packed, zeros, scales, group_size, dtype)


def dequantize_awq(
    qweight: torch.Tensor,  # int32 [in, out / 8]
    qzeros: torch.Tensor,  # int32 [in / g, out / 8]
    scales: torch.Tensor,  # fp16 [in / g, out]
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [in, out]
    """(q - z) * s computed exactly in fp32 (a 4-bit difference times an fp16 scale needs 15 bits), then one
    rounding to dtype: bit for bit what fp16 arithmetic (AutoAWQ, vLLM) gives for fp16."""
    q = unpack_awq(qweight)
    z = unpack_awq(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z).float() * s).to(dtype)


def dequantize_awq_modules(
    weights: Iterable[tuple[str, torch.Tensor]], wanted: Callable[[str], bool], group_size: int,
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Replace the checkpoint triple `<m>.qweight / .qzeros / .scales` of every module m with wanted(m) by one
    `<m>.weight` [out, in] in dtype (dequantize_awq: exact in fp32, one rounding); shards may hold the three
    in any order, so each waits for its siblings. Every other tensor passes through unchanged."""
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, part = name.rpartition(".")
        if part not in AWQ_PARTS or not wanted(module):
            yield name, tensor
            continue
        parts = waiting.setdefault(module, {})
        parts[part] = tensor
        if len(parts) == len(AWQ_PARTS):
            del waiting[module]
            weight = dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], group_size, dtype)
            yield f"{module}.weight", weight.t().contiguous()
    if waiting:
        incomplete = ", ".join(f"{m}.{p}" for m, parts in sorted(waiting.items()) for p in parts)
        raise ValueError(f"AWQ tensors without their qweight / qzeros / scales siblings: {incomplete}")
