"""Pair the block-scaled FP8 weights of a checkpoint stream with their scales.

DeepSeek's FP8 checkpoints store each quantised Linear as `<name>.weight` (float8_e4m3fn) plus a
sibling `<name>.weight_scale_inv`; shards may hold them in either order, so whichever comes first
waits for the other. Non-FP8 tensors (embeddings, norms, router, bias) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from r1deploy.quant.fp8_block import FP8_DTYPE

SCALE_SUFFIX = "_scale_inv"  # appended to the weight's own name: q_a_proj.weight_scale_inv


def fp8_pairs(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, tensor, scale_inv): an FP8 weight with its scales, or any other tensor with None."""
    waiting_weights: dict[str, torch.Tensor] = {}
    waiting_scales: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            weight_name = name[: -len(SCALE_SUFFIX)]
            if weight_name in waiting_weights:
                yield weight_name, waiting_weights.pop(weight_name), tensor
            else:
                waiting_scales[weight_name] = tensor
        elif tensor.dtype == FP8_DTYPE:
            if name in waiting_scales:
                yield name, tensor, waiting_scales.pop(name)
            else:
                waiting_weights[name] = tensor
        else:
            yield name, tensor, None
    if waiting_weights or waiting_scales:
        unpaired = sorted(waiting_weights) + [n + SCALE_SUFFIX for n in sorted(waiting_scales)]
        raise ValueError(f"FP8 tensors without their weight/scale sibling: {', '.join(unpaired[:10])}")

