"""Routed experts served from the tiered store (`--offload experts`, weights/tiered_store.py): the layer holds
empty stacks in the store's format (FP8 + block scales for an FP8 store), the loader routes every expert tensor
into the store, and each step asks the store for the experts the router chose. Routing is the block's (the
same Router as every other format); only where the weights live differs.

Busy experts that fit the slot pool are fetched at once and the next MoE layer's likely experts are
prefetched; more than fit run in rounds of num_gpu_slots. Misses may run on the host copy. The torch path's
arithmetic is the resident one (bit-identical on CPU). Copies are decided on the host: no CUDA graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.layers.moe.experts import DeepseekExperts, ExpertsMethod, swiglu

if TYPE_CHECKING:
    from r1deploy.weights.tiered_store import TieredExpertStore


class OffloadedExperts(ExpertsMethod):
    reads_routing_on_host = True

    def __init__(self, store: TieredExpertStore, layer_idx: int) -> None:
        self.store, self.layer_idx = store, layer_idx

    def create_weights(self, layer: DeepseekExperts) -> None:
        """Empty stacks in the store's formats, so load_weights keeps expert tensors in FP8 (an FP8 store,
        scales included) and routes them into the store."""
        if layer.sharded:
            raise ValueError("expert offload does not combine with expert parallelism")
        store, hidden, inter = self.store, layer.hidden_size, layer.intermediate_size
        weight_dtype = store.weight_dtype if store.fp8 else None
        layer.gate_up_proj = layer.stack(0, 2 * inter, hidden, dtype=weight_dtype)
        layer.down_proj = layer.stack(0, hidden, inter, dtype=weight_dtype)
        if store.fp8:
            for name, shape in zip(("gate_up_proj_scale_inv", "down_proj_scale_inv"), store.scale_shapes, strict=True):
                setattr(layer, name, layer.stack(0, *shape, dtype=torch.float32))

    def load_stacked(self, layer: DeepseekExperts, param: nn.Parameter, loaded: torch.Tensor) -> None:
        name = next(n for n, p in layer.named_parameters(recurse=False) if p is param)
        scale = name.endswith("_scale_inv")
        self.store.load_stacked(self.layer_idx, name.removesuffix("_scale_inv"), loaded, scale=scale)

    def load_expert(self, layer: DeepseekExperts, expert: int, projection: str, loaded: torch.Tensor,
                    suffix: str) -> None:
        self.store.load_expert(self.layer_idx, expert, projection, loaded, scale=suffix == "_scale_inv")

    def expert_weights(self, layer: DeepseekExperts, expert: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        resident = self.store.get(self.layer_idx, [expert])
        return self.store.dequantized(resident, 0, dtype)

    def apply_pairs(self, layer: DeepseekExperts, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        raise ValueError("expert offload does not combine with expert parallelism")

    def apply(self, layer: DeepseekExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
              ) -> torch.Tensor:
        store, layer_idx = self.store, self.layer_idx
        top_k = ids.shape[1]
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=layer.num_experts).tolist()
        busy = [e for e, c in enumerate(counts) if c]
        starts, start = {}, 0
        for e in busy:
            starts[e], start = start, start + counts[e]
        on_host = [e for e in busy if store.compute_on_host_choice(layer_idx, e, counts[e])]
        on_device = [e for e in busy if e not in set(on_host)]
        slots = store.num_gpu_slots
        if x.is_cuda and not on_host and 0 < len(on_device) <= slots:
            from r1deploy.kernels.fused_moe import fused_moe

            resident = store.get(layer_idx, on_device)
            store.prefetch_next(layer_idx, x)
            slot_of = torch.zeros(layer.num_experts, dtype=ids.dtype)
            slot_of[on_device] = torch.tensor(resident.slots, dtype=ids.dtype)
            # FP8 store: the slot pools are FP8 with their block-scale pools; the kernel scales each tile.
            return fused_moe(x, resident.gate_up, resident.down, weights, slot_of.to(ids.device)[ids],
                             gate_up_scale=resident.gate_up_scale, down_scale=resident.down_scale,
                             scale_block=tuple(store.fp8_block))
        sorted_x = x[token_of]
        out = torch.empty(sorted_x.shape, dtype=torch.float32, device=x.device)
        rounds = [on_device[i : i + slots] for i in range(0, len(on_device), slots)]
        for n, chunk in enumerate(rounds):
            resident = store.get(layer_idx, chunk)
            if n == len(rounds) - 1:  # the last round's slots stay in use; prefetch around them
                store.prefetch_next(layer_idx, x)
            for index, expert in enumerate(chunk):
                rows = slice(starts[expert], starts[expert] + counts[expert])
                gate_up, down = store.dequantized(resident, index, x.dtype)  # FP8: dequantised as the resident path
                out[rows] = swiglu(sorted_x[rows], gate_up, down)
        if not rounds:
            store.prefetch_next(layer_idx, x)
        for expert in on_host:
            rows = slice(starts[expert], starts[expert] + counts[expert])
            out[rows] = store.compute_on_host(layer_idx, expert, sorted_x[rows])
        out *= weights.flatten()[order, None]
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)
