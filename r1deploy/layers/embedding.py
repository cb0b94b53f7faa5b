"""Token embedding with an uninitialised, loader-filled table (see linear.py for why)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.layers.linear import empty_parameter


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = empty_parameter(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return F.embedding(input_ids, self.weight)
