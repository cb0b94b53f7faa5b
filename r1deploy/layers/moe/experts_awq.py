"""AWQ INT4 routed experts (an AutoAWQ checkpoint), stacked in quant/awq.repack_awq's kernel layout: per
projection `{gate_up,down}_proj_packed` int32 [E, N, K / 8], `_zeros` uint8 [E, N, K / g] and `_scales` fp16
[E, N, K / g] (gate_up: the gate's N = I rows, then the up's). Every device runs the sorted per-expert loop on
them, dequantising each busy expert's weights per call (the fused kernel reads bf16 / FP8 stacks only); its
bincount is a host sync per layer, so such a model runs without CUDA graphs. Next step: a fused grouped-GEMV
kernel for decode, reading the int4 stacks of the routed experts directly.
"""

from __future__ import annotations

import torch

from r1deploy.errors import UsageError
from r1deploy.kernels.awq_format import PACK_FACTOR
from r1deploy.layers.moe.experts import DeepseekExperts, ExpertsMethod
from r1deploy.quant.awq import AWQConfig, dequantize_for_matmul


class AWQExperts(ExpertsMethod):
    reads_routing_on_host = True

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def create_weights(self, layer: DeepseekExperts) -> None:
        """Filled per expert by load_expert from tensors already in the kernel layout (the model's
        checkpoint mapping repacks each one)."""
        hidden, inter, group_size = layer.hidden_size, layer.intermediate_size, self.config.group_size
        if hidden % group_size or inter % group_size:
            raise UsageError(f"AWQ experts {hidden} x {inter} need both divisible by group_size {group_size}")
        for name, out_features, in_features in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            groups = in_features // group_size
            rows = layer.num_local
            setattr(layer, f"{name}_packed", layer.stack(rows, out_features, in_features // PACK_FACTOR,
                                                         dtype=torch.int32))
            setattr(layer, f"{name}_zeros", layer.stack(rows, out_features, groups, dtype=torch.uint8))
            setattr(layer, f"{name}_scales", layer.stack(rows, out_features, groups, dtype=torch.float16))

    def expert_weights(self, layer: DeepseekExperts, expert: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantize(layer, "gate_up_proj", expert, dtype), self._dequantize(layer, "down_proj", expert, dtype)

    def _dequantize(self, layer: DeepseekExperts, projection: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        packed, zeros, scales = (getattr(layer, f"{projection}_{part}")[expert] for part in ("packed", "zeros", "scales"))
        return dequantize_for_matmul(packed, zeros, scales, self.config.group_size, dtype)  # [N, K]
