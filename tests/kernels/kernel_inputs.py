"""Fresh random inputs for the kernel tests, and the error measure they share."""

from __future__ import annotations

import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# R1-Distill-Qwen-7B attention: 28 query heads, 4 KV heads, head_dim 128; the engine's block size 16.
REAL = {"num_heads": 28, "num_kv_heads": 4, "head_dim": 128, "block_size": 16}
SMALL = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "block_size": 4}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (METHOD.md); NaN anywhere fails every threshold."""
    out, ref = out.double(), ref.double()
    err = ((out - ref).norm() / ref.norm()).item()
    return err if math.isfinite(err) else float("inf")


def paged_cache(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    spare_blocks: int = 3, table_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache [2, NB, BS, KV, D] and block tables [B, MB] int32 of shuffled, distinct blocks
    (0-padded, as the engine pads them), so any indexing slip reads the wrong values."""
    needed = [math.ceil(n / block_size) for n in seq_lens]
    width = table_width or max(1, max(needed))
    num_blocks = sum(needed) + spare_blocks
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    order = torch.randperm(num_blocks)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = order[used : used + n].int()
        used += n
    return cache, tables.to(DEVICE)
