"""Tensor-parallel layers (Megatron's split): each rank holds one slice of a weight and loads it
from the full HF tensor through its `weight_loader`.

Column-parallel layers split output rows (q/k/v heads, gate/up); their outputs stay sharded.
Row-parallel layers split input columns (o_proj, down_proj) and all-reduce their partial sums, so a
decoder layer costs one all-reduce after attention and one after the MLP. The vocabulary is split
in rows padded to a multiple of the ranks: the embedding looks up the ids it owns and all-reduces;
the LM head all-gathers its logits slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.distributed.group import TPGroup, shard
from r1deploy.layers.linear import Linear, MergedLinear, default_weight_loader, empty_parameter


@dataclass(frozen=True)
class ShardSpec:
    full: int  # rows of the HF tensor
    start: int  # first row this rank keeps
    size: int  # rows this rank keeps


def _narrow(loaded: torch.Tensor, dim: int, full: int, start: int, size: int) -> torch.Tensor:
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ValueError(f"shape mismatch: expected {full} along dim {dim} of the checkpoint tensor, "
                         f"got {tuple(loaded.shape)}")
    return loaded.narrow(dim, start, size)


class MergedColumnParallelLinear(MergedLinear):
    """MergedLinear holding this rank's rows of each projection (q/k/v heads, gate/up columns)."""

    def __init__(self, in_features: int, shards: dict[str, ShardSpec], bias: bool) -> None:
        super().__init__(in_features, {k: s.size for k, s in shards.items()}, bias)
        self.specs = shards

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        spec = self.specs.get(shard_id)  # type: ignore[arg-type]
        if spec is not None:
            loaded = _narrow(loaded, 0, spec.full, spec.start, spec.size)
        super().weight_loader(param, loaded, shard_id)


class ColumnParallelLinear(Linear):
    """y_shard = x @ W_shard^T: this rank's equal slice of the output rows (e.g. whole heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        if out_features % tp.size:
            raise ValueError(f"{out_features} output features do not split over {tp.size} ranks")
        super().__init__(in_features, out_features // tp.size, bias)
        self.tp = tp
        self.out_full = out_features
        for param in self.parameters():
            param.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        start, size = shard(self.out_full, self.tp.rank, self.tp.size)
        default_weight_loader(param, _narrow(loaded, 0, self.out_full, start, size), shard_id)


class RowParallelLinear(Linear):
    """y = all_reduce(x_shard @ W_shard^T) + b: x arrives split along its features, y is whole.

    reduce=False returns this rank's partial sum (no bias allowed), for a caller that folds several
    partial sums into one all-reduce (DeepSeek's shared experts + routed experts)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, reduce: bool = True) -> None:
        if in_features % tp.size:
            raise ValueError(f"{in_features} input features do not split over {tp.size} ranks")
        if bias and not reduce:
            raise ValueError("a partial-sum row-parallel linear cannot add its bias")
        super().__init__(in_features // tp.size, out_features, bias)
        self.tp = tp
        self.reduce = reduce
        self.in_full = in_features
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        start, size = shard(self.in_full, self.tp.rank, self.tp.size)
        default_weight_loader(param, _narrow(loaded, 1, self.in_full, start, size), shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.reduce:
            return y
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias  # the bias once, after the sum


class _VocabShard(nn.Module):
    """This rank's rows of a [vocab, hidden] table, padded so every rank holds the same count."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = empty_parameter(self.per_rank, hidden_size)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is not None:
            raise ValueError(f"vocabulary table is not merged, got shard {shard_id!r}")
        if loaded.dim() != 2 or loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"shape mismatch: parameter ({self.vocab_size}, {param.shape[1]}) split over "
                             f"{self.tp.size} ranks, checkpoint {tuple(loaded.shape)}")
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()  # padding rows: zero embeddings, logits cut off after the gather
        param.data[:rows].copy_(loaded[self.start : self.start + rows])


class VocabParallelEmbedding(_VocabShard):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        local = input_ids - self.start
        owned = (local >= 0) & (local < self.per_rank)
        out = F.embedding(torch.where(owned, local, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(~owned[:, None], 0))


class ParallelLMHead(_VocabShard):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] on every rank
        return self.tp.all_gather(F.linear(hidden, self.weight), dim=-1)[:, : self.vocab_size]
