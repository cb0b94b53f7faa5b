"""What each tensor-parallel rank of a quantised linear holds, without a process group (TPGroup(rank, 2) only
builds and loads): AWQ, GPTQ (act-order, one group per row too) and FP8 block shards of column-, merged-column- and row-parallel
layers equal the matching rows / columns of the whole layer's weight, and a split that cuts a quantisation group
is refused with a UsageError that says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
from awq_helpers import awq_checkpoint_tensors
from gptq_helpers import gptq_checkpoint_tensors

from r1deploy.distributed.group import TPGroup
from r1deploy.errors import UsageError
from r1deploy.layers.linear import Linear
from r1deploy.layers.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
)
from r1deploy.quant.awq import AWQConfig
from r1deploy.quant.fp8_block import dequantize_fp8_block, quantize_fp8_block
from r1deploy.quant.fp8_linear import Fp8LinearMethod
from r1deploy.quant.gptq import GPTQConfig
from r1deploy.weights import process_weights_after_loading

IN, OUT, GROUP, TILE = 128, 64, 32, (16, 16)


def _rank(rank: int) -> TPGroup:
    return TPGroup(rank=rank, size=2, device=torch.device("cpu"))


def _method(kind: str):
    if kind == "awq":
        return AWQConfig(GROUP).linear_method()
    if kind.startswith("gptq"):  # gptq-one: one group spanning the whole input (group_size -1)
        return GPTQConfig(-1 if kind == "gptq-one" else GROUP).linear_method()
    return Fp8LinearMethod(TILE)


def _checkpoint(kind: str, weight: torch.Tensor, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if kind == "awq":
        return awq_checkpoint_tensors(weight, GROUP)
    if kind.startswith("gptq"):
        return gptq_checkpoint_tensors(weight, -1 if kind == "gptq-one" else GROUP, order)
    q, scale_inv = quantize_fp8_block(weight, TILE)
    return {"weight": q, "weight_scale_inv": scale_inv}


@torch.no_grad()
def _load(layer: Linear, tensors: dict[str, torch.Tensor], shard_id: str | None = None) -> Linear:
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, shard_id)
    return layer


def _weight(kind: str, layer: Linear) -> torch.Tensor:
    """The loaded layer's W [out, in] in float64, in the checkpoint's input order."""
    if kind == "fp8":
        return dequantize_fp8_block(layer.weight, layer.weight_scale_inv, torch.float64, TILE)
    process_weights_after_loading(layer)
    awq = layer.quant_method if kind == "awq" else layer.quant_method.awq
    w = awq.dequantized_weight(layer, torch.float64)
    perm = getattr(layer, "input_perm", None)
    return w if perm is None else w[:, torch.argsort(perm)]


def _order(kind: str, halves: int) -> torch.Tensor | None:
    """gptq-act: an act-order whose groups stay inside each of `halves` equal parts of the input."""
    if kind != "gptq-act":
        return None
    gen = torch.Generator().manual_seed(9)
    return torch.cat([h * (IN // halves) + torch.randperm(IN // halves, generator=gen) for h in range(halves)])


@pytest.mark.parametrize("kind", ["awq", "gptq", "gptq-act", "gptq-one", "fp8"])
def test_column_and_row_shards_are_the_whole_layers_rows_and_columns(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(OUT, IN, generator=gen)
    order = _order(kind, 2)
    tensors = _checkpoint(kind, weight, order)
    whole = _weight(kind, _load(Linear(IN, OUT, False, _method(kind)), tensors))
    for rank in (0, 1):
        rows, cols = slice(rank * OUT // 2, (rank + 1) * OUT // 2), slice(rank * IN // 2, (rank + 1) * IN // 2)
        column = _load(ColumnParallelLinear(IN, OUT, False, _rank(rank), _method(kind)), tensors)
        assert torch.equal(_weight(kind, column), whole[rows])
        row = _load(RowParallelLinear(IN, OUT, False, _rank(rank), quant_method=_method(kind)), tensors)
        assert torch.equal(_weight(kind, row), whole[:, cols])


@pytest.mark.parametrize("kind", ["awq", "gptq-act", "fp8"])
def test_merged_column_shards_take_each_projections_rows(kind: str) -> None:
    gen = torch.Generator().manual_seed(2)
    order = _order(kind, 1)  # gate and up share their input, hence their act-order
    parts = {shard: _checkpoint(kind, torch.randn(OUT, IN, generator=gen), order) for shard in ("gate", "up")}
    wholes = {shard: _weight(kind, _load(Linear(IN, OUT, False, _method(kind)), t)) for shard, t in parts.items()}
    rank = 1
    spec = ShardSpec.even(OUT, _rank(rank))
    merged = MergedColumnParallelLinear(IN, {"gate": spec, "up": spec}, False, _method(kind))
    for shard, tensors in parts.items():
        _load(merged, tensors, shard)
    rows = slice(spec.start, spec.start + spec.size)
    assert torch.equal(_weight(kind, merged), torch.cat([wholes["gate"][rows], wholes["up"][rows]]))


def test_size_one_loads_as_the_plain_layer() -> None:
    tensors = _checkpoint("awq", torch.randn(OUT, IN))
    x = torch.randn(3, IN)
    plain = _load(Linear(IN, OUT, False, _method("awq")), tensors)
    process_weights_after_loading(plain)
    for layer in (ColumnParallelLinear(IN, OUT, False, None, _method("awq")),
                  RowParallelLinear(IN, OUT, False, TPGroup(rank=0, size=1, device=torch.device("cpu")),
                                    quant_method=_method("awq"))):
        process_weights_after_loading(_load(layer, tensors))
        assert torch.equal(layer(x), plain(x))


def test_splits_that_cut_a_quantisation_group_are_refused() -> None:
    # FP8: 2 x 72 input columns, rank 1's start at 72 is inside the 16-column scale tile [64, 80).
    row = RowParallelLinear(144, OUT, False, _rank(1), quant_method=_method("fp8"))
    with pytest.raises(UsageError, match="cuts a 16-wide quantisation group"):
        _load(row, _checkpoint("fp8", torch.randn(OUT, 144)))
    # AWQ: 2 x 48 input rows are not whole groups of 32; 2 x 12 output columns are not whole packed words of 8.
    with pytest.raises(UsageError, match="tensor-parallel rank's share .*in % 32 == 0"):
        RowParallelLinear(96, OUT, False, _rank(0), quant_method=_method("awq"))
    with pytest.raises(UsageError, match="out % 8 == 0"):
        ColumnParallelLinear(IN, 24, False, _rank(0), _method("awq"))
    # GPTQ act-order whose groups mix both ranks' input rows: no AWQ layout holds a rank's share.
    gen = torch.Generator().manual_seed(3)
    tensors = gptq_checkpoint_tensors(torch.randn(OUT, IN, generator=gen), GROUP, torch.randperm(IN, generator=gen))
    with pytest.raises(UsageError, match="not whole quantisation groups"):
        _load(RowParallelLinear(IN, OUT, False, _rank(0), quant_method=_method("gptq")), {"g_idx": tensors["g_idx"]})
