"""Absorbed MLA (decode) == expanded MLA (prefill) on the same paged latent cache."""

from __future__ import annotations

import math

import torch

from r1deploy.attention.mla_torch import absorbed_decode, expanded_attention, write_latent_cache

HEADS, NOPE, ROPE, V_DIM, LATENT, BLOCK = 4, 16, 8, 12, 32, 4


def test_absorbed_equals_expanded_over_paged_cache() -> None:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    seq_lens = [9, 1, 16, 5]
    kv_b_weight = randn(HEADS * (NOPE + V_DIM), LATENT) / math.sqrt(LATENT)
    kv_cache = torch.zeros(32, BLOCK, LATENT + ROPE, dtype=torch.float64)
    free = torch.randperm(32, generator=generator).tolist()
    tables = torch.zeros(len(seq_lens), 4, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        blocks = [free.pop() for _ in range(math.ceil(n / BLOCK))]
        tables[i, : len(blocks)] = torch.tensor(blocks)
        slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        write_latent_cache(kv_cache, randn(n, LATENT), randn(n, ROPE), slots)
    q_nope, q_pe = randn(len(seq_lens), HEADS, NOPE), randn(len(seq_lens), HEADS, ROPE)
    scale = 0.3

    absorbed = absorbed_decode(q_nope, q_pe, kv_cache, tables, torch.tensor(seq_lens), max(seq_lens),
                               kv_b_weight, scale)  # [B, H, dv]
    for i, n in enumerate(seq_lens):
        cached = kv_cache[tables[i, : math.ceil(n / BLOCK)].long()].flatten(0, 1)[:n]
        expanded = expanded_attention(q_nope[i : i + 1], q_pe[i : i + 1], cached, kv_b_weight, scale)
        torch.testing.assert_close(absorbed[i], expanded[0], atol=1e-10, rtol=0)
