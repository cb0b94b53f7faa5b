"""DeepSeekMoE: a Router, the routed experts in the format their weights come in (an ExpertsMethod), the
shared experts, and the dispatcher of the parallel mode (dispatch.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.layers.moe.dispatch import AllToAll, DataParallelDispatch, dispatcher_for
from r1deploy.layers.moe.experts import DeepseekExperts, ExpertsMethod
from r1deploy.layers.moe.experts_awq import AWQExperts
from r1deploy.layers.moe.experts_dense import resident_method
from r1deploy.layers.moe.experts_offload import OffloadedExperts
from r1deploy.layers.moe.mlp import DeepseekMLP
from r1deploy.layers.moe.router import Router
from r1deploy.quant.methods import NO_QUANT, LinearQuant

if TYPE_CHECKING:
    from r1deploy.core.deepseek_config import DeepseekConfig
    from r1deploy.distributed.group import TPGroup
    from r1deploy.weights.tiered_store import TieredExpertStore


def experts_method(config: DeepseekConfig, prefix: str, layer_idx: int,
                   store: TieredExpertStore | None, fp8_block: tuple[int, int] | None = None) -> ExpertsMethod:
    """The routed experts' format: the offload store's, AWQ where the checkpoint quantises them, else resident
    in the model dtype or, given fp8_block (the loader's choice), FP8 (resident_method)."""
    awq = config.awq
    if awq is not None and awq.quantises(f"{prefix}.experts"):
        if store is not None:
            raise ValueError("AWQ experts cannot be served from the expert store (it holds bf16 / FP8 experts)")
        return AWQExperts(awq)
    if store is not None:
        return OffloadedExperts(store, layer_idx)
    return resident_method(fp8_block)


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None, prefix: str = "mlp", layer_idx: int = 0,
                 store: TieredExpertStore | None = None, quant: LinearQuant = NO_QUANT) -> None:
        """prefix: this block's checkpoint name (model.layers.{i}.mlp), which AWQ's modules_to_not_convert is
        matched against. store (--offload experts): serve the routed experts from it (it also runs this
        layer's router ahead of time to prefetch). quant: the shared experts' linears' quantisation, and the
        routed experts' FP8 choice (quant.fp8_block: the loader's)."""
        super().__init__()
        self.dispatch = dispatcher_for(tp)
        self.gate = Router(config)
        method = experts_method(config, prefix, layer_idx, store, quant.fp8_block)
        self.experts = DeepseekExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, tp,
                                       method=method)
        if store is not None:
            store.register_gate(layer_idx, self.gate)
        # Data-parallel modes hold the shared experts whole (replicated); otherwise tensor-parallel, their
        # partial sum folded into the routed experts' all-reduce (reduce=False).
        shared_tp = None if isinstance(self.dispatch, DataParallelDispatch) else tp
        self.shared_experts = (
            DeepseekMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, shared_tp,
                        reduce=False, linear_method=quant, prefix=f"{prefix}.shared_experts")
            if config.n_shared_experts else None)

    @property
    def all_to_all(self) -> bool:
        """Whether token-expert pairs travel all-to-all (--moe-a2a)."""
        return isinstance(self.dispatch, AllToAll)

    def forward(self, x: torch.Tensor, dp_token_counts: Sequence[int] | None = None) -> torch.Tensor:
        """x [T, hidden]; dp_token_counts (--dp-attention): every rank's token count this step, in rank order."""
        return self.dispatch(x, self.gate, self.experts, self.shared_experts, dp_token_counts)
