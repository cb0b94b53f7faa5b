"""--moe-a2a pieces on 2 gloo ranks (CPU, fp32): TPGroup.all_to_all_rows (groups, empty sends, the reply along
the reversed routes), and one DeepSeek MoE block whose all-to-all dispatch equals the unsplit block and the
all-gather scheme for equal, unequal, one-sided and all-zero token counts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import TINY_V3, randomize_

from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.distributed.group import free_port, init_group, leave_group
from r1deploy.layers.moe import DeepseekMoE

SIZE = 2
# Tokens per rank in each step: unequal, one rank idle (either one), equal, nobody.
STEPS = [[3, 5], [0, 4], [6, 0], [4, 4], [0, 0]]


def _rows_rank(rank: int, port: int) -> None:
    tp = init_group(rank, SIZE, "127.0.0.1", port, 60.0, "cpu")
    try:
        # Rank r sends rank d rows valued 10 r + d, in 2 groups: rank 0 sends [[1, 0], [2, 1]] rows, rank 1 sends
        # [[0, 0], [1, 2]] (nothing to rank 0).
        send_counts = torch.tensor([[[1, 0], [2, 1]], [[0, 0], [1, 2]]][rank])
        x = torch.cat([torch.full((int(n), 3), 10.0 * rank + dest) for dest, n in enumerate(send_counts.sum(1))])
        received, recv_counts = tp.all_to_all_rows(x, send_counts)
        expect_counts = torch.tensor([[[1, 0], [0, 0]], [[2, 1], [1, 2]]][rank])
        assert torch.equal(recv_counts, expect_counts)
        sources = [src for src, n in enumerate(expect_counts.sum(1).tolist()) for _ in range(n)]
        assert torch.equal(received, torch.tensor([[10.0 * src + rank] * 3 for src in sources]).view(-1, 3))
        back, counts = tp.all_to_all_rows(received + 100, recv_counts, send_counts)  # the reply: no count exchange
        assert counts is send_counts and torch.equal(back, x + 100)
    finally:
        leave_group()


def test_all_to_all_rows() -> None:
    mp.spawn(_rows_rank, args=(free_port("127.0.0.1"),), nprocs=SIZE)


def _moe_rank(rank: int, port: int) -> None:
    from transformers import DeepseekV3Config

    config = DeepseekConfig.from_hf(DeepseekV3Config(**TINY_V3).to_dict())
    single = DeepseekMoE(config)
    randomize_(single, seed=1)
    tp = init_group(rank, SIZE, "127.0.0.1", port, 60.0, "cpu", dp_attention=True, moe_all_to_all=True)
    try:
        schemes = {}
        for a2a in (False, True):
            moe = schemes[a2a] = DeepseekMoE(config, dataclasses.replace(tp, moe_all_to_all=a2a))
            assert moe.all_to_all == a2a
            local = moe.experts
            state = {name: value[local.first : local.first + local.num_local] if name.startswith("experts.") else value
                     for name, value in single.state_dict().items()}
            moe.load_state_dict(state)
        for step, counts in enumerate(STEPS):
            tokens = torch.randn(sum(counts), config.hidden_size, generator=torch.Generator().manual_seed(step))
            mine = tokens[sum(counts[:rank]) : sum(counts[: rank + 1])]
            expected = single(tokens)[sum(counts[:rank]) : sum(counts[: rank + 1])]
            for a2a, moe in schemes.items():
                got = moe(mine, counts)
                assert got.shape == expected.shape
                assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (a2a, counts)
    finally:
        leave_group()


def test_moe_all_to_all_equals_unsplit_and_allgather() -> None:
    mp.spawn(_moe_rank, args=(free_port("127.0.0.1"),), nprocs=SIZE)
