"""FP8 block and AWQ linears under tensor parallelism on 2 gloo ranks (CPU, fp32): column-, merged-column- and
row-parallel layers given the quant method explicitly load their shard of the full checkpoint tensors (packed
and grouped parameters narrowed along the dims they declare) and equal the unsplit layer; at size 1 (tp=None)
each is the plain Linear."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
from awq_helpers import awq_checkpoint_tensors

from r1deploy.distributed.group import TPGroup, free_port, init_group, leave_group
from r1deploy.layers.linear import Linear
from r1deploy.layers.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
)
from r1deploy.quant.awq import AWQConfig, AWQLinearMethod
from r1deploy.quant.fp8_block import quantize_fp8_block
from r1deploy.quant.fp8_linear import Fp8LinearMethod
from r1deploy.weights import process_weights_after_loading

SIZE, IN, OUT, TOKENS = 2, 64, 64, 5
BLOCK, GROUP = (16, 16), 32


def _method(kind: str):
    return Fp8LinearMethod(BLOCK) if kind == "fp8" else AWQLinearMethod(AWQConfig(group_size=GROUP))


def _checkpoint(kind: str, out_features: int, in_features: int, seed: int) -> dict[str, torch.Tensor]:
    """A linear's checkpoint tensors in the format `kind` (the full, unsplit layer)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    bias = torch.randn(out_features, generator=g)
    if kind == "fp8":
        q, scale_inv = quantize_fp8_block(weight, BLOCK)
        return {"weight": q, "weight_scale_inv": scale_inv, "bias": bias}
    return {**awq_checkpoint_tensors(weight, GROUP), "bias": bias}


def _load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], shard_id: str | None = None,
          last: bool = True) -> None:
    """tensors through each parameter's loader; `last`: every shard is in, repack (AWQ)."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name in tensors:
                param.weight_loader(param, tensors[name], shard_id)
    if last:
        process_weights_after_loading(layer)


def _layers(kind: str, tp: TPGroup | None) -> tuple[Linear, Linear, Linear]:
    column = ColumnParallelLinear(IN, OUT, True, tp, quant_method=_method(kind))
    _load(column, _checkpoint(kind, OUT, IN, 0))
    spec = ShardSpec.even(OUT, tp)
    merged = MergedColumnParallelLinear(IN, {"gate": spec, "up": spec}, False, quant_method=_method(kind))
    for shard, seed in (("gate", 1), ("up", 2)):
        _load(merged, {k: v for k, v in _checkpoint(kind, OUT, IN, seed).items() if k != "bias"}, shard, shard == "up")
    row = RowParallelLinear(OUT, IN, True, tp, quant_method=_method(kind))
    _load(row, _checkpoint(kind, IN, OUT, 3))
    return column, merged, row


def _quant_rank(rank: int, port: int, kind: str) -> None:
    tp = init_group(rank, SIZE, "127.0.0.1", port, 60.0, "cpu")
    try:
        x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(7))
        column, merged, row = _layers(kind, tp)
        ref_column, ref_merged, ref_row = _layers(kind, None)
        local = slice(rank * OUT // SIZE, (rank + 1) * OUT // SIZE)
        torch.testing.assert_close(column(x), ref_column(x)[:, local], rtol=1e-5, atol=1e-5)
        gate, up = ref_merged(x).split(OUT, dim=-1)
        torch.testing.assert_close(merged(x), torch.cat([gate[:, local], up[:, local]], dim=-1), rtol=1e-5, atol=1e-5)
        hidden = torch.randn(TOKENS, OUT, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(row(hidden[:, local]), ref_row(hidden), rtol=1e-4, atol=1e-4)
    finally:
        leave_group()


@pytest.mark.parametrize("kind", ["fp8", "awq"])
def test_quantised_linears_split_over_two_ranks_equal_the_whole(kind: str) -> None:
    mp.spawn(_quant_rank, args=(free_port("127.0.0.1"), kind), nprocs=SIZE)


@pytest.mark.parametrize("kind", ["fp8", "awq"])
def test_parallel_linears_at_size_one_are_the_plain_linear(kind: str) -> None:
    x = torch.randn(TOKENS, IN)
    plain = Linear(IN, OUT, True, quant_method=_method(kind))
    _load(plain, _checkpoint(kind, OUT, IN, 0))
    column, _, _ = _layers(kind, None)
    assert torch.equal(column(x), plain(x))


def test_a_shard_that_cuts_a_scale_tile_is_refused() -> None:
    """48 rows over 2 ranks: rank 1's rows start at 24, inside the 16-row FP8 scale tile [16, 32)."""
    column = ColumnParallelLinear(IN, 48, False, TPGroup(rank=1, size=2, device=torch.device("cpu")),
                                  quant_method=_method("fp8"))
    with pytest.raises(ValueError, match="cuts a 16-wide quantisation group"):
        _load(column, _checkpoint("fp8", 48, IN, 0))
