"""The routed experts of one MoE layer: `DeepseekExperts` holds this rank's experts as stacks and delegates
their format to an `ExpertsMethod` (experts_dense.py: bf16 / FP8 block; experts_awq.py: AWQ INT4;
experts_offload.py: served from the tiered store).

Stacks follow transformers 5 (`experts.gate_up_proj` [E, 2I, H] with gate rows first, `experts.down_proj`
[E, H, I]); checkpoints with per-expert tensors (`experts.{e}.gate_proj.weight`) are stacked at load by
`load_expert`. The torch path sorts token-expert pairs by expert and runs one GEMM pair per busy expert;
the fused Triton kernel (kernels/fused_moe) consumes the same sorted layout on CUDA.

Expert parallelism (tp): this rank holds experts [first, first + num_local) of num_experts and adds only
their contributions; the dispatcher (dispatch.py) sums over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.layers.activation import silu_and_mul
from r1deploy.layers.linear import default_weight_loader
from r1deploy.layers.parallel import size_rank

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup


class ExpertsMethod:
    """One weight format of the routed experts. Subclasses allocate the stacks (create_weights), give one
    expert's weights in the compute dtype (expert_weights, the torch path) and, where a fused kernel reads
    their format on CUDA, its arguments (kernel_args)."""

    # Whether apply reads routing on the host (a sync per layer): such a model cannot be graph-captured.
    reads_routing_on_host = False

    def create_weights(self, layer: DeepseekExperts) -> None:
        raise NotImplementedError

    def expert_weights(self, layer: DeepseekExperts, expert: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def kernel_args(self, layer: DeepseekExperts) -> dict | None:
        """kernels/fused_moe.fused_moe's weight arguments; None: this format runs the torch path everywhere."""
        return None

    def apply(self, layer: DeepseekExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
              ) -> torch.Tensor:
        """[T, H] in x's dtype: the weighted sum over each token's routed experts (global ids [T, k]) that
        this rank holds."""
        args = self.kernel_args(layer) if x.is_cuda else None
        if args is not None:
            if layer.sharded:  # other ranks' pairs weigh 0 (computed on local expert 0, then dropped)
                owned = (ids >= layer.first) & (ids < layer.first + layer.num_local)
                weights = weights.masked_fill(~owned, 0.0)
                ids = torch.where(owned, ids - layer.first, 0)
            return _fused(x, weights, ids, args)
        top_k = ids.shape[1]
        flat_ids = ids.flatten()  # [T*k]
        flat_weights = weights.flatten()
        pair_token = torch.arange(flat_ids.numel(), device=x.device) // top_k
        if layer.sharded:  # keep only the pairs routed to this rank's experts
            keep = (flat_ids >= layer.first) & (flat_ids < layer.first + layer.num_local)
            flat_ids, flat_weights, pair_token = flat_ids[keep] - layer.first, flat_weights[keep], pair_token[keep]
        order = flat_ids.argsort(stable=True)  # token-expert pairs grouped by expert
        token_of = pair_token[order]  # [P]
        out = self.run_sorted(layer, x[token_of], flat_ids[order])  # [P, H] fp32
        out *= flat_weights[order, None]
        # Sum each token's k contributions in fp32, round once.
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)

    def apply_pairs(self, layer: DeepseekExperts, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [P, H] one row per token-expert pair, local_ids [P] -> [P, H] in x's dtype, unweighted."""
        args = self.kernel_args(layer) if x.is_cuda else None
        if args is not None:  # one pair per row: top-k of 1, weight 1: the rounded down output as is
            ones = torch.ones(local_ids.shape[0], 1, dtype=torch.float32, device=x.device)
            return _fused(x, ones, local_ids[:, None], args)
        order = local_ids.argsort(stable=True)  # rows grouped by expert
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out[order] = self.run_sorted(layer, x[order], local_ids[order]).to(x.dtype)
        return out

    def run_sorted(self, layer: DeepseekExperts, sorted_x: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """The torch path's expert GEMMs: rows sorted_x [P, H] grouped by local expert sorted_ids [P]; one GEMM
        pair per busy expert. Returns the unweighted outputs [P, H] in fp32 (each rounded to x's dtype first)."""
        counts = torch.bincount(sorted_ids, minlength=layer.num_local).tolist()  # one host sync per layer
        out = torch.empty(sorted_x.shape, dtype=torch.float32, device=sorted_x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:  # idle experts cost nothing
                continue
            rows = slice(start, start + count)
            gate_up, down = self.expert_weights(layer, expert, sorted_x.dtype)
            out[rows] = swiglu(sorted_x[rows], gate_up, down)
            start += count
        return out

    def load_stacked(self, layer: DeepseekExperts, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """A fused checkpoint tensor [E, ...]: keep this rank's experts."""
        if loaded.dim() != param.dim() or loaded.shape[0] != layer.num_experts or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape mismatch: expected ({layer.num_experts}, {', '.join(map(str, param.shape[1:]))}),"
                             f" got {tuple(loaded.shape)}")
        default_weight_loader(param, loaded[layer.first : layer.first + layer.num_local])

    def load_expert(self, layer: DeepseekExperts, expert: int, projection: str, loaded: torch.Tensor,
                    suffix: str) -> None:
        """One per-expert checkpoint tensor into its rows of the stack `{gate_up,down}_proj` + suffix."""
        local = expert - layer.first
        if not 0 <= local < layer.num_local:
            raise ValueError(f"expert {expert} is not held by this rank")
        gate_up, down = getattr(layer, f"gate_up_proj{suffix}").data, getattr(layer, f"down_proj{suffix}").data
        gate_rows = gate_up.shape[1] // 2  # I, or the gate's ceil(I/bn) scale rows
        target = {"gate": gate_up[local, :gate_rows], "up": gate_up[local, gate_rows:], "down": down[local]}[projection]
        if target.shape != loaded.shape:
            raise ValueError(f"expert {expert} {projection}_proj: expected {tuple(target.shape)}, "
                             f"got {tuple(loaded.shape)}")
        target.copy_(loaded)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on its rows x [n, H]: [n, H], the gate-up product rounded to x's dtype (as the kernel)."""
    return F.linear(silu_and_mul(F.linear(x, gate_up)), down)


def _fused(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, args: dict) -> torch.Tensor:
    from r1deploy.kernels.fused_moe import fused_moe  # triton only where there is a GPU

    return fused_moe(x, args["gate_up"], args["down"], weights, ids, gate_up_scale=args.get("gate_up_scale"),
                     down_scale=args.get("down_scale"), scale_block=args.get("scale_block", (128, 128)))


class DeepseekExperts(nn.Module):
    """This rank's routed experts in the format of `method` (for resident weights experts_dense.resident_method:
    the model dtype, or FP8 stacks when the loader keeps an FP8 checkpoint in FP8)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp: TPGroup | None = None, *, method: ExpertsMethod) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        size, rank = size_rank(tp)
        if num_experts % size:
            raise ValueError(f"{num_experts} routed experts do not split over {size} ranks")
        self.num_local = num_experts // size
        self.first = rank * self.num_local
        self.sharded = self.num_local != num_experts
        self.method = method
        method.create_weights(self)

    def stack(self, *shape: int, dtype: torch.dtype | None) -> nn.Parameter:
        """An uninitialised stacked parameter whose loader takes a fused checkpoint tensor [E, ...]."""
        param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        param.weight_loader = self._load_stacked  # type: ignore[attr-defined]
        return param

    def _load_stacked(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is not None:
            raise ValueError(f"stacked experts are not merged, got shard {shard_id!r}")
        self.method.load_stacked(self, param, loaded)

    def owns(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.num_local

    def load_expert(self, expert: int, projection: str, loaded: torch.Tensor, suffix: str = "") -> None:
        """One checkpoint tensor `experts.{expert}.{projection}_proj.weight` into the stacks `gate_up_proj` /
        `down_proj` + suffix: "" the weight, "_scale_inv" its FP8 `.weight_scale_inv`, "_packed" / "_zeros" /
        "_scales" an AWQ qweight / qzeros / scales already in the kernel layout (quant/awq.repack_awq_tensor).
        Global index; experts of other ranks must be skipped by the caller, see `owns`."""
        self.method.load_expert(self, expert, projection, loaded, suffix)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of local expert in dtype, dequantised if the format is quantised."""
        return self.method.expert_weights(self, expert, dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k] fp32, global ids [T, k] -> [T, H]: this rank's share of the weighted sum."""
        return self.method.apply(self, x, weights, ids)

    def forward_pairs(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [P, H] one row per token-expert pair (--moe-a2a: the pairs other ranks sent here), local_ids [P]
        in [0, num_local) -> [P, H] in x's dtype: each row's expert output, unweighted. The routing weights
        stay with the token's own rank, which weighs and sums its pairs in fp32 (the arithmetic of forward)."""
        return self.method.apply_pairs(self, x, local_ids)
