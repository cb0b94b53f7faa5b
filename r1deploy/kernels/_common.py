"""Small launcher helpers shared by the kernels."""

from __future__ import annotations

import torch
import triton


def pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 models stay fp32-exact (the CUDA tests compare them to transformers at 1e-4); tf32 would cost ~3e-4.
    return "ieee" if dtype == torch.float32 else "tf32"
