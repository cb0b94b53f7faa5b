"""One MoE dispatcher per parallel mode: where the tokens go before the router and the experts run, and how
the ranks' partial outputs come back. Each takes the block's router, routed experts and shared experts.

* LocalDispatch (one process): route, run the experts, add the shared experts.
* AllReduceEP (tensor parallel): the router runs replicated, each rank adds its own experts' contributions
  for every token plus its slice of the shared experts, and one all-reduce sums the ranks (every rank
  already holds every token: no all-gather / reduce-scatter, the scheme for small batches).
* AllGatherDP (--dp-attention): each rank holds only its own sequences' tokens. The dispatcher all-gathers
  them (every rank's count is known from the step message), routes and runs this rank's experts on all of
  them, and a reduce-scatter hands each rank the sum over ranks for its own tokens; the shared experts are
  whole on every rank (replicated weights) and run on its own tokens only.
* AllToAll (--dp-attention --moe-a2a): each rank routes its own tokens and sends each token-expert pair only
  to the rank holding that expert, which runs it and sends the output back; the token's rank weighs and
  sums its k outputs. Per rank the bytes and expert rows scale with its own tokens x k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.layers.moe.experts import DeepseekExperts
from r1deploy.layers.moe.router import Router

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup


class LocalDispatch:
    def __call__(self, x: torch.Tensor, router: Router, experts: DeepseekExperts, shared: nn.Module | None,
                 dp_token_counts: Sequence[int] | None) -> torch.Tensor:  # [T, hidden]
        out = experts(x, *router(x))
        # The shared experts sit outside the weighted sum (unscaled by routed_scaling_factor).
        return out if shared is None else out + shared(x)


class AllReduceEP(LocalDispatch):
    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp

    def __call__(self, x: torch.Tensor, router: Router, experts: DeepseekExperts, shared: nn.Module | None,
                 dp_token_counts: Sequence[int] | None) -> torch.Tensor:
        # The shared experts' partial sum (reduce=False) rides on the routed experts' all-reduce.
        return self.tp.all_reduce(super().__call__(x, router, experts, shared, dp_token_counts))


class DataParallelDispatch:
    """x [counts[rank], hidden] is this rank's tokens (possibly none); counts are every rank's, in rank order."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp

    def __call__(self, x: torch.Tensor, router: Router, experts: DeepseekExperts, shared: nn.Module | None,
                 dp_token_counts: Sequence[int] | None) -> torch.Tensor:
        tp, counts = self.tp, dp_token_counts
        if counts is None or len(counts) != tp.size or x.shape[0] != counts[tp.rank]:
            raise ValueError(f"data-parallel MoE: rank {tp.rank} has {x.shape[0]} tokens, step counts {counts}")
        if not sum(counts):  # every rank knows: no collective at all
            return x
        routed = self.routed(x, router, experts, list(counts))
        return routed + shared(x) if shared is not None and x.shape[0] else routed

    def routed(self, x: torch.Tensor, router: Router, experts: DeepseekExperts, counts: list[int]) -> torch.Tensor:
        raise NotImplementedError


class AllGatherDP(DataParallelDispatch):
    def routed(self, x: torch.Tensor, router: Router, experts: DeepseekExperts, counts: list[int]) -> torch.Tensor:
        tokens = self.tp.all_gather_rows(x, counts)  # [sum(counts), hidden], rank order
        return self.tp.reduce_scatter_rows(experts(tokens, *router(tokens)), counts)  # this rank's tokens


class AllToAll(DataParallelDispatch):
    def routed(self, x: torch.Tensor, router: Router, experts: DeepseekExperts, counts: list[int]) -> torch.Tensor:
        """The routed experts' weighted sum for this rank's tokens x [T, hidden] (T may be 0)."""
        tp = self.tp
        weights, ids = router(x)  # [T, k] each, this rank's tokens only
        flat_ids = ids.flatten()  # [T*k]
        # Pairs sorted by global expert = by (owning rank, local expert): the send buffer's layout.
        order = flat_ids.argsort(stable=True)
        token_of = order // ids.shape[1]  # [T*k] the token of each sorted pair
        per_expert = torch.bincount(flat_ids, minlength=experts.num_experts).view(tp.size, experts.num_local)
        # received [R, hidden]: rank 0's pairs for this rank, then rank 1's, ..., each grouped by local expert;
        # recv_counts [size, num_local] tells each row's local expert.
        received, recv_counts = tp.all_to_all_rows(x[token_of], per_expert)
        local_ids = torch.arange(experts.num_local, device=x.device).repeat(tp.size)
        local_ids = local_ids.repeat_interleave(recv_counts.flatten())  # [R]
        # Outputs back along the reversed routes: [T*k, hidden] in the sorted pairs' order.
        out, _ = tp.all_to_all_rows(experts.forward_pairs(received, local_ids), recv_counts, per_expert)
        out = out.float() * weights.flatten()[order, None]
        # Sum each token's k contributions in fp32, round once (as ExpertsMethod.apply).
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)


def dispatcher_for(tp: TPGroup | None) -> LocalDispatch | AllReduceEP | AllGatherDP | AllToAll:
    """The dispatcher of a parallel layout (tp.dp_attention / tp.moe_all_to_all: --dp-attention / --moe-a2a)."""
    if tp is None:
        return LocalDispatch()
    if tp.size > 1 and tp.dp_attention:
        return AllToAll(tp) if tp.moe_all_to_all else AllGatherDP(tp)
    return AllReduceEP(tp)
