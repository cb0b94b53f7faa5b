"""Small launcher helpers and device functions shared by the kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 models stay fp32-exact (the CUDA tests compare them to transformers at 1e-4); tf32 would cost ~3e-4.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def query_row_sequence(row, seq_lens_ptr, QUERY_LEN: tl.constexpr):
    """(sequence, visible tokens) of query row `row`: the sequence's cached length minus the query tokens
    after this one (none when QUERY_LEN is 1)."""
    if QUERY_LEN == 1:
        b = row
        seq_len = tl.load(seq_lens_ptr + row)
    else:
        b = row // QUERY_LEN
        seq_len = tl.maximum(tl.load(seq_lens_ptr + b) - (QUERY_LEN - 1 - row % QUERY_LEN), 0)
    return b, seq_len
