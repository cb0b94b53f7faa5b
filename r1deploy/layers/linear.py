"""Linear layers whose parameters know how to load their HF-named checkpoint tensors.

Parameters are allocated uninitialised (the checkpoint or the dummy initialiser fills them),
so building a 7B model costs no random-init time. Each parameter carries a `weight_loader`;
a merged layer's loader takes the shard id of the HF projection it is given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not merged, got shard {shard_id!r}")
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def empty_parameter(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = default_weight_loader  # type: ignore[attr-defined]
    return param


def quantized_parameter(*shape: int, dtype: torch.dtype, output_dim: int, pack_factor: int, input_dim: int = 1,
                        input_pack: int = 1) -> nn.Parameter:
    """A quantised layer's parameter; output_dim / pack_factor tell a merged or column-parallel layer's loader
    where its shard's rows are (pack_factor output rows share one row or column of this tensor), input_dim /
    input_pack tell a row-parallel layer's loader where its input features are (input_pack features share
    one element: a quantisation group or scale tile)."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = default_weight_loader  # type: ignore[attr-defined]
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.pack_factor = pack_factor  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    param.input_pack = input_pack  # type: ignore[attr-defined]
    return param


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, quant_method: Any = None) -> None:
        """quant_method (e.g. r1deploy.quant.awq.AWQLinearMethod): registers the layer's quantised
        parameters in place of `weight` and runs the matmul; None = a plain weight [out, in]."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._create_weights(quant_method)
        self.bias = empty_parameter(out_features) if bias else None

    def _create_weights(self, quant_method: Any) -> None:
        self.quant_method = quant_method
        if quant_method is None:
            self.weight = empty_parameter(self.out_features, self.in_features)
        else:
            quant_method.create_weights(self, self.in_features, self.out_features)

    def set_quant_method(self, quant_method: Any) -> None:
        """Replace a built layer's (unloaded) weights with quant_method's parameters: how FP8 reaches
        layers whose builder passes no method (quant/fp8_linear.building_fp8). Plain and merged
        layers only: the parallel subclasses bind their own loaders at construction."""
        self._create_weights(quant_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of one input as one matmul, e.g. q/k/v or gate/up.

    `shards` maps each HF projection's shard id to its output rows, in output order."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool, quant_method: Any = None) -> None:
        super().__init__(in_features, sum(shards.values()), bias, quant_method)
        self.shard_ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for shard_id, size in shards.items():
            self.shard_ranges[shard_id] = (start, size)
            start += size
        self._bind_loaders()

    def _bind_loaders(self) -> None:
        for param in self.parameters():
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def set_quant_method(self, quant_method: Any) -> None:
        super().set_quant_method(quant_method)
        self._bind_loaders()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id not in self.shard_ranges:
            raise ValueError(f"merged parameter expects a shard in {list(self.shard_ranges)}, got {shard_id!r}")
        start, size = self.shard_ranges[shard_id]
        # Quantised parameters say which dim holds the outputs and how many share an element: 8 for
        # AWQ's packed int32, 128 for an FP8 block scale (one row per 128 output rows).
        dim, pack = getattr(param, "output_dim", 0), getattr(param, "pack_factor", 1)
        if start % pack:
            # FP8: the shards' 128-row scale tiles would overlap; such a layer must be dequantised
            # at load (quantization="none").
            raise ValueError(f"shard {shard_id!r} starts at output row {start}, inside a {pack}-row "
                             "quantisation group shared with the shard before it")
        default_weight_loader(param.data.narrow(dim, start // pack, -(-size // pack)), loaded)  # type: ignore[arg-type]
