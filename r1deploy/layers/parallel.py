"""Tensor-parallel layers (Megatron's split): each rank holds one slice of a weight and loads it
from the full HF tensor through its `weight_loader`. At size 1 (tp=None, no process group) every layer is
the whole layer with the arithmetic and kernels of its plain counterpart, so models build them unconditionally.

Column-parallel layers split output rows (q/k/v heads, gate/up); their outputs stay sharded.
Row-parallel layers split input columns (o_proj, down_proj) and all-reduce their partial sums, so a
decoder layer costs one all-reduce after attention and one after the MLP. The vocabulary is split
in rows padded to a multiple of the ranks: the embedding looks up the ids it owns and all-reduces;
the LM head all-gathers its logits slices.

Quantisation composes with the split: a layer takes its quant_method (FP8 block, AWQ) explicitly, and the
loaders narrow each quantised parameter along the dims and packing it declares (layers/linear.py
quantized_parameter: output rows per packed element, input features per group or scale tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.distributed.group import TPGroup
from r1deploy.errors import UsageError
from r1deploy.layers.linear import Linear, MergedLinear, empty_parameter


def size_rank(tp: TPGroup | None) -> tuple[int, int]:
    return (1, 0) if tp is None else (tp.size, tp.rank)


@dataclass(frozen=True)
class ShardSpec:
    full: int  # rows of the HF tensor
    start: int  # first row this rank keeps
    size: int  # rows this rank keeps

    @staticmethod
    def even(full: int, tp: TPGroup | None) -> ShardSpec:
        """This rank's equal share of `full` rows (all of them at size 1)."""
        size, rank = size_rank(tp)
        if full % size:
            raise ValueError(f"{full} output features do not split over {size} ranks")
        return ShardSpec(full, rank * (full // size), full // size)


def _narrow(loaded: torch.Tensor, dim: int, full: int, start: int, size: int) -> torch.Tensor:
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ValueError(f"shape mismatch: expected {full} along dim {dim} of the checkpoint tensor, "
                         f"got {tuple(loaded.shape)}")
    return loaded.narrow(dim, start, size)


def _narrow_packed(loaded: torch.Tensor, dim: int | None, spec: ShardSpec, pack: int) -> torch.Tensor:
    """spec's rows of a tensor whose dim holds one element per `pack` rows (a packed int32, a group, a tile);
    dim None: a tensor without that dim, whole on every rank."""
    if dim is None:
        return loaded
    if spec.start % pack or (spec.size % pack and spec.start + spec.size != spec.full):
        # A UsageError: the split (--tp) does not fit the checkpoint's quantisation layout.
        raise UsageError(f"shard [{spec.start}, {spec.start + spec.size}) of {spec.full} cuts a {pack}-wide "
                         "quantisation group (AWQ packing or group, FP8 scale tile): use a --tp that splits "
                         "this layer on group boundaries, or dequantise at load")
    return _narrow(loaded, dim, -(-spec.full // pack), spec.start // pack, -(-spec.size // pack))


def _narrow_output(param: nn.Parameter, loaded: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    return _narrow_packed(loaded, getattr(param, "output_dim", 0), spec, getattr(param, "pack_factor", 1))


class MergedColumnParallelLinear(MergedLinear):
    """MergedLinear holding this rank's rows of each projection (q/k/v heads, gate/up columns)."""

    def __init__(self, in_features: int, shards: dict[str, ShardSpec], bias: bool, quant_method: Any = None) -> None:
        super().__init__(in_features, {k: s.size for k, s in shards.items()}, bias, quant_method)
        self.specs = shards

    def shard_of(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.specs.get(shard_id)  # type: ignore[arg-type]
        if spec is not None:
            loaded = _narrow_output(param, loaded, spec)
        return super().shard_of(param, loaded, shard_id)


class ColumnParallelLinear(Linear):
    """y_shard = x @ W_shard^T: this rank's equal slice of the output rows (e.g. whole heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup | None = None,
                 quant_method: Any = None) -> None:
        shard = ShardSpec.even(out_features, tp)
        super().__init__(in_features, shard.size, bias, quant_method)
        self.shard, self.tp = shard, tp

    def shard_of(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shard.size != self.shard.full:  # one rank: the plain layer's loading
            loaded = _narrow_output(param, loaded, self.shard)
        return super().shard_of(param, loaded, shard_id)


class RowParallelLinear(Linear):
    """y = all_reduce(x_shard @ W_shard^T) + b: x arrives split along its features, y is whole.

    reduce=False returns this rank's partial sum (no bias allowed), for a caller that folds several
    partial sums into one all-reduce (DeepSeek's shared experts + routed experts)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup | None = None,
                 reduce: bool = True, quant_method: Any = None) -> None:
        size, rank = size_rank(tp)
        if in_features % size:
            raise ValueError(f"{in_features} input features do not split over {size} ranks")
        if bias and not reduce:
            raise ValueError("a partial-sum row-parallel linear cannot add its bias")
        shard = ShardSpec(in_features, rank * (in_features // size), in_features // size)
        super().__init__(shard.size, out_features, bias, quant_method)
        self.shard = shard
        self.tp = tp if size > 1 else None  # one rank: nothing to sum, the plain layer's forward
        self.reduce = reduce

    @property
    def input_start(self) -> int:
        return self.shard.start

    def shard_of(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # One rank: the plain layer's loading. The bias is added once, after the sum: every rank holds it whole.
        if self.tp is not None and param is not self.bias:
            dim, pack = getattr(param, "input_dim", 1), getattr(param, "input_pack", 1)
            loaded = _narrow_packed(loaded, dim, self.shard, pack)
        return super().shard_of(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return super().forward(x)
        y = F.linear(x, self.weight) if self.quant_method is None else self.quant_method.apply(self, x, None)
        if not self.reduce:
            return y
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias  # the bias once, after the sum


class _VocabShard(nn.Module):
    """This rank's rows of a [vocab, hidden] table, padded so every rank holds the same count (tp=None or one
    rank: the whole table, looked up or multiplied as a plain layer would)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        size, rank = size_rank(tp)
        self.tp = tp if size > 1 else None
        self.size = size
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // size)
        self.start = rank * self.per_rank
        self.weight = empty_parameter(self.per_rank, hidden_size)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is not None:
            raise ValueError(f"vocabulary table is not merged, got shard {shard_id!r}")
        if loaded.dim() != 2 or loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"shape mismatch: parameter ({self.vocab_size}, {param.shape[1]}) split over "
                             f"{self.size} ranks, checkpoint {tuple(loaded.shape)}")
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()  # padding rows: zero embeddings, logits cut off after the gather
        param.data[:rows].copy_(loaded[self.start : self.start + rows])


class VocabParallelEmbedding(_VocabShard):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp is None:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        owned = (local >= 0) & (local < self.per_rank)
        out = F.embedding(torch.where(owned, local, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(~owned[:, None], 0))


class ParallelLMHead(_VocabShard):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] on every rank
        if self.tp is None:
            return F.linear(hidden, self.weight)
        return self.tp.all_gather(F.linear(hidden, self.weight), dim=-1)[:, : self.vocab_size]
