"""Linear layers whose parameters know how to load their HF-named checkpoint tensors.

Parameters are allocated uninitialised (the checkpoint or the dummy initialiser fills them),
so building a 7B model costs no random-init time. Every parameter of a Linear loads through the layer's
`weight_loader`: `shard_of` picks the part of the checkpoint tensor this layer holds and where it goes (a
merged layer's shard id names the HF projection; the tensor-parallel subclasses in layers/parallel.py narrow
to their rank's rows or columns), and a quant method whose checkpoint format differs from its parameters'
(GPTQ) converts the tensor around that step (its `load`).
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


def quantized_parameter(*shape: int, dtype: torch.dtype, output_dim: int | None, pack_factor: int,
                        input_dim: int | None = 1, input_pack: int = 1) -> nn.Parameter:
    """A quantised layer's parameter; output_dim / pack_factor tell a merged or column-parallel layer's loader
    where its shard's rows are (pack_factor output rows share one row or column of this tensor), input_dim /
    input_pack tell a row-parallel layer's loader where its input features are (input_pack features share
    one element: a quantisation group or scale tile). None: the tensor has no such dim, every shard holds it
    whole (GPTQ's g_idx has no output dim; one GPTQ group spanning all inputs has no input dim)."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = default_weight_loader  # type: ignore[attr-defined]
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.pack_factor = pack_factor  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    param.input_pack = input_pack  # type: ignore[attr-defined]
    return param


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, quant_method: Any = None) -> None:
        """quant_method (e.g. r1deploy.quant.awq.AWQLinearMethod, chosen per layer by quant/methods.LinearQuant):
        registers the layer's quantised parameters in place of `weight` and runs the matmul; None = a plain
        weight [out, in]."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_method = quant_method
        if quant_method is None:
            self.weight = empty_parameter(out_features, in_features)
        else:
            quant_method.create_weights(self, in_features, out_features)
        self.bias = empty_parameter(out_features) if bias else None
        for param in self.parameters():
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        """One checkpoint tensor (of the HF projection shard_id, for a merged layer) into param."""
        load = getattr(self.quant_method, "load", None)
        if load is not None:  # a checkpoint format the method converts (GPTQ): it calls copy_shard itself
            load(self, param, loaded, shard_id)
        else:
            self.copy_shard(param, loaded, shard_id)

    def copy_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        target, part = self.shard_of(param, loaded, shard_id)
        default_weight_loader(target, part)  # type: ignore[arg-type]

    def shard_of(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(where in param, which part of the checkpoint tensor): the whole of both for a plain layer."""
        if shard_id is not None:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not merged, got shard {shard_id!r}")
        return param.data, loaded

    @property
    def input_start(self) -> int:
        """The first of the checkpoint's input features this layer holds (a row-parallel rank's offset)."""
        return 0


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

    def shard_of(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if shard_id not in self.shard_ranges:
            raise ValueError(f"merged parameter expects a shard in {list(self.shard_ranges)}, got {shard_id!r}")
        start, size = self.shard_ranges[shard_id]
        # Quantised parameters say which dim holds the outputs and how many share an element: 8 for
        # AWQ's packed int32, 128 for an FP8 block scale (one row per 128 output rows).
        dim, pack = getattr(param, "output_dim", 0), getattr(param, "pack_factor", 1)
        if dim is None:  # no output dim (GPTQ's g_idx): every shard carries the whole tensor
            return param.data, loaded
        if start % pack:
            # FP8: the shards' 128-row scale tiles would overlap; such a layer must be dequantised
            # at load (quantization="none").
            raise ValueError(f"shard {shard_id!r} starts at output row {start}, inside a {pack}-row "
                             "quantisation group shared with the shard before it")
        return param.data.narrow(dim, start // pack, -(-size // pack)), loaded
