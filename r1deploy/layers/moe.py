"""DeepSeekMoE: router (V3 noaux_tc, V2 greedy / group-limited), routed experts, shared experts,
and the dense SwiGLU MLP of the first_k_dense_replace layers.

Routed experts are stored stacked the way transformers 5 stores them (`experts.gate_up_proj`
[E, 2I, H] with gate rows first, `experts.down_proj` [E, H, I]); checkpoints with per-expert
tensors (`experts.{e}.gate_proj.weight`) are stacked at load by `DeepseekExperts.load_expert`.
The CPU path sorts token-expert pairs by expert and runs one GEMM pair per busy expert; the fused
Triton kernel will consume the same sorted layout.

Built under quant/fp8_linear.building_fp8 the stacks stay float8_e4m3fn with fp32 block scales
(`gate_up_proj_scale_inv` [E, 2 * ceil(I/bn), ceil(H/bk)]: the gate's tile rows, then the up's;
`down_proj_scale_inv` [E, ceil(H/bn), ceil(I/bk)]): the fused kernel reads FP8 and scales each tile,
the CPU path dequantises the busy experts per call.

AWQ INT4 experts (DeepseekExperts(awq=...), an AutoAWQ checkpoint) are stacked in quant/awq.repack_awq's
kernel layout, per projection `{gate_up,down}_proj_packed` int32 [E, N, K / 8], `_zeros` uint8 [E, N, K / g]
and `_scales` fp16 [E, N, K / g] (gate_up: the gate's N = I rows, then the up's). Every device runs the
sorted per-expert loop on them, dequantising each busy expert's weights per call (the fused kernel reads
bf16 / FP8 stacks only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from r1deploy.errors import UsageError
from r1deploy.layers.activation import silu_and_mul
from r1deploy.layers.linear import Linear, MergedLinear, default_weight_loader, empty_parameter
from r1deploy.layers.parallel import MergedColumnParallelLinear, RowParallelLinear, ShardSpec
from r1deploy.models.deepseek_config import DeepseekConfig
from r1deploy.quant.awq import PACK_FACTOR, AWQConfig, dequantize_for_matmul
from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block
from r1deploy.quant.fp8_linear import current_fp8_block
from r1deploy.weights.expert_cache import current_expert_store

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup
    from r1deploy.weights.tiered_store import TieredExpertStore


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    scoring_func: str  # "sigmoid" | "softmax"
    topk_method: str  # "noaux_tc" | "greedy" | "group_limited_greedy"
    norm_topk_prob: bool
    routed_scaling_factor: float

    @staticmethod
    def from_config(config: DeepseekConfig) -> RouterSpec:
        return RouterSpec(config.n_routed_experts, config.num_experts_per_tok, config.n_group, config.topk_group,
                          config.scoring_func, config.topk_method, config.norm_topk_prob,
                          config.routed_scaling_factor)


def select_experts(
    scores: torch.Tensor,  # [T, E] fp32, after sigmoid / softmax
    bias: torch.Tensor | None,  # [E] e_score_correction_bias (noaux_tc only)
    spec: RouterSpec,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] fp32, expert ids [T, k] int64
    """The bias only decides *which* experts (noaux_tc); the weights always come from the raw scores."""
    choice = scores + bias if spec.topk_method == "noaux_tc" and bias is not None else scores
    if spec.topk_method != "greedy" and spec.topk_group < spec.n_group:
        grouped = choice.view(-1, spec.n_group, spec.num_experts // spec.n_group)  # [T, G, E/G]
        if spec.topk_method == "noaux_tc":  # V3: a group scores the sum of its best two
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:  # V2 group_limited_greedy: a group scores its best expert
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(spec.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        # -inf, not 0: biased scores can be negative, and a 0 fill would let dropped groups win
        # (the transformers 4.57 bug).
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids


class DeepseekMLP(nn.Module):
    """SwiGLU with gate/up as one matmul; checkpoint gate_proj/up_proj fill the `gate_up_proj` shards.

    tp: gate/up column-parallel, down row-parallel; reduce=False leaves the all-reduce to the caller
    (the MoE block folds the shared experts' partial sum into the routed experts' one).
    awq (no tp): AWQ linears where the checkpoint quantises `prefix`.gate_up_proj / .down_proj."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup | None = None,
                 reduce: bool = True, awq: AWQConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if tp is None:
            gate_up_method = awq and awq.linear_method(f"{prefix}.gate_up_proj")
            self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size},
                                             bias=False, quant_method=gate_up_method)
            self.down_proj = Linear(intermediate_size, hidden_size, bias=False,
                                    quant_method=awq and awq.linear_method(f"{prefix}.down_proj"))
        else:
            width = intermediate_size // tp.size
            spec = ShardSpec(intermediate_size, tp.rank * width, width)
            self.gate_up_proj = MergedColumnParallelLinear(hidden_size, {"gate": spec, "up": spec}, bias=False)
            self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DeepseekGate(nn.Module):
    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.spec = RouterSpec.from_config(config)
        self.weight = empty_parameter(config.n_routed_experts, config.hidden_size)
        self.e_score_correction_bias: nn.Parameter | None = None
        if config.topk_method == "noaux_tc":
            # fp32 whatever the model dtype: a bf16 bias changes which experts win (transformers PR #42580).
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(config.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [T, hidden] -> [T, k] x2
        logits = F.linear(x.float(), self.weight.float())  # [T, E]; fp32 like transformers
        scores = logits.sigmoid() if self.spec.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        return select_experts(scores, self.e_score_correction_bias, self.spec)


class DeepseekExperts(nn.Module):
    """Expert parallel (tp): this rank holds experts [first, first + num_local) of num_experts and adds
    only their contributions; the caller sums over ranks. awq: AWQ INT4 stacks (the module docstring)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp: TPGroup | None = None, awq: AWQConfig | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        size, rank = (1, 0) if tp is None else (tp.size, tp.rank)
        if num_experts % size:
            raise ValueError(f"{num_experts} routed experts do not split over {size} ranks")
        self.num_local = num_experts // size
        self.first = rank * self.num_local
        # --offload experts: built under tiered_store.building_with(store), the stacks are empty and
        # every step asks the store for the experts it routes to (attach_store sets it).
        self.store: TieredExpertStore | None = None
        self.layer_idx = -1
        rows = 0 if current_expert_store() is not None else self.num_local
        # FP8 (building_fp8): float8 stacks plus block scales. Not under the tiered store, which holds
        # experts in the model dtype (it dequantises FP8 checkpoints on read).
        self.fp8_block = current_fp8_block() if rows else None
        self.awq = awq
        if awq is not None:
            self._awq_stacks(rows, hidden_size, intermediate_size, awq.group_size)
            return
        dtype = FP8_DTYPE if self.fp8_block else None
        self.gate_up_proj = self._stack(rows, 2 * intermediate_size, hidden_size, dtype=dtype)  # [E/N, 2I, H]
        self.down_proj = self._stack(rows, hidden_size, intermediate_size, dtype=dtype)  # [E/N, H, I]
        if self.fp8_block:
            bn, bk = self.fp8_block
            inter_rows, hidden_rows = -(-intermediate_size // bn), -(-hidden_size // bn)
            inter_cols, hidden_cols = -(-intermediate_size // bk), -(-hidden_size // bk)
            self.gate_up_proj_scale_inv = self._stack(rows, 2 * inter_rows, hidden_cols, dtype=torch.float32)
            self.down_proj_scale_inv = self._stack(rows, hidden_rows, inter_cols, dtype=torch.float32)

    def _stack(self, *shape: int, dtype: torch.dtype | None) -> nn.Parameter:
        param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        param.weight_loader = self._load_stacked  # type: ignore[attr-defined]
        return param

    def _awq_stacks(self, rows: int, hidden_size: int, intermediate_size: int, group_size: int) -> None:
        """`{gate_up,down}_proj_{packed,zeros,scales}` (the module docstring), filled per expert by load_expert
        from tensors already in the kernel layout (deepseek_v3.load_weights repacks each one)."""
        if hidden_size % group_size or intermediate_size % group_size:
            raise UsageError(f"AWQ experts {hidden_size} x {intermediate_size} need both divisible by "
                             f"group_size {group_size}")
        for name, out_features, in_features in (("gate_up_proj", 2 * intermediate_size, hidden_size),
                                                ("down_proj", hidden_size, intermediate_size)):
            groups = in_features // group_size
            setattr(self, f"{name}_packed", self._stack(rows, out_features, in_features // PACK_FACTOR,
                                                        dtype=torch.int32))
            setattr(self, f"{name}_zeros", self._stack(rows, out_features, groups, dtype=torch.uint8))
            setattr(self, f"{name}_scales", self._stack(rows, out_features, groups, dtype=torch.float16))

    def attach_store(self, store: TieredExpertStore, layer_idx: int) -> None:
        """Serve the experts from the store. An FP8 store (store.fp8) keeps the checkpoint's FP8 weights
        and block scales: the layer gets empty FP8 stacks and empty `*_scale_inv` siblings, so load_weights
        keeps expert tensors in FP8 and routes them (scales included) into the store."""
        if self.num_local != self.num_experts:
            raise ValueError("expert offload does not combine with expert parallelism")
        if self.awq is not None:
            raise ValueError("AWQ experts cannot be served from the expert store (it holds bf16 / FP8 experts)")
        if self.fp8_block and not store.fp8:
            raise ValueError("FP8 experts need an FP8 expert store (this one holds the model dtype)")
        if self.fp8_block and tuple(self.fp8_block) != tuple(store.fp8_block):
            raise ValueError(f"FP8 experts with {self.fp8_block} tiles, the store holds {store.fp8_block}")
        self.store, self.layer_idx = store, layer_idx
        # Built resident or not: empty stacks (the store holds the experts), in the store's formats.
        weight_dtype = store.weight_dtype if store.fp8 else None
        self.gate_up_proj = self._stack(0, *self.gate_up_proj.shape[1:], dtype=weight_dtype)
        self.down_proj = self._stack(0, *self.down_proj.shape[1:], dtype=weight_dtype)
        if store.fp8:
            self.fp8_block = tuple(store.fp8_block)
            for name, shape in zip(("gate_up_proj_scale_inv", "down_proj_scale_inv"), store.scale_shapes, strict=True):
                param = nn.Parameter(torch.empty(0, *shape, dtype=torch.float32), requires_grad=False)
                which = name.removesuffix("_scale_inv")
                param.weight_loader = (  # type: ignore[attr-defined]  # a stacked `experts.*_scale_inv` tensor
                    lambda _param, loaded, shard_id=None, which=which: store.load_stacked(
                        self.layer_idx, which, loaded, scale=True))
                setattr(self, name, param)

    def owns(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.num_local

    def _load_stacked(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        """A fused checkpoint tensor [E, ...]: keep this rank's experts."""
        if self.store is not None:
            self.store.load_stacked(self.layer_idx, "down_proj" if param is self.down_proj else "gate_up_proj", loaded)
            return
        if loaded.dim() != param.dim() or loaded.shape[0] != self.num_experts or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape mismatch: expected ({self.num_experts}, {', '.join(map(str, param.shape[1:]))}),"
                             f" got {tuple(loaded.shape)}")
        default_weight_loader(param, loaded[self.first : self.first + self.num_local], shard_id)

    def load_expert(self, expert: int, projection: str, loaded: torch.Tensor, suffix: str = "") -> None:
        """One checkpoint tensor `experts.{expert}.{projection}_proj.weight` into the stacks `gate_up_proj` /
        `down_proj` + suffix: "" the weight, "_scale_inv" its FP8 `.weight_scale_inv`, "_packed" / "_zeros" /
        "_scales" an AWQ qweight / qzeros / scales already in the kernel layout (quant/awq.repack_awq_tensor).
        Global index; experts of other ranks must be skipped by the caller, see `owns`."""
        if self.store is not None:
            self.store.load_expert(self.layer_idx, expert, projection, loaded, scale=suffix == "_scale_inv")
            return
        local = expert - self.first
        if not 0 <= local < self.num_local:
            raise ValueError(f"expert {expert} is not held by this rank")
        gate_up, down = getattr(self, f"gate_up_proj{suffix}").data, getattr(self, f"down_proj{suffix}").data
        gate_rows = gate_up.shape[1] // 2  # I, or the gate's ceil(I/bn) scale rows
        target = {
            "gate": gate_up[local, :gate_rows],
            "up": gate_up[local, gate_rows:],
            "down": down[local],
        }[projection]
        if target.shape != loaded.shape:
            raise ValueError(f"expert {expert} {projection}_proj: expected {tuple(target.shape)}, "
                             f"got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of local expert in dtype; FP8 stacks dequantised (gate and up
        separately: they have their own scale tiles), AWQ stacks too (quant/awq.dequantize_for_matmul)."""
        if self.awq is not None:
            return self._dequantize_awq("gate_up_proj", expert, dtype), self._dequantize_awq("down_proj", expert, dtype)
        if self.fp8_block is None:
            return self.gate_up_proj[expert], self.down_proj[expert]
        gate_up, scales = self.gate_up_proj[expert], self.gate_up_proj_scale_inv[expert]
        size, tiles = self.intermediate_size, scales.shape[0] // 2
        gate = dequantize_fp8_block(gate_up[:size], scales[:tiles], dtype, self.fp8_block)
        up = dequantize_fp8_block(gate_up[size:], scales[tiles:], dtype, self.fp8_block)
        down = dequantize_fp8_block(self.down_proj[expert], self.down_proj_scale_inv[expert], dtype, self.fp8_block)
        return torch.cat([gate, up]), down

    def _dequantize_awq(self, projection: str, expert: int, dtype: torch.dtype) -> torch.Tensor:  # [N, K]
        packed, zeros, scales = (getattr(self, f"{projection}_{part}")[expert] for part in ("packed", "zeros", "scales"))
        return dequantize_for_matmul(packed, zeros, scales, self.awq.group_size, dtype)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        weights: torch.Tensor,  # [T, k] fp32
        ids: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # [T, H]
        if self.store is not None:
            return self._forward_offloaded(x, weights, ids)
        sharded = self.num_local != self.num_experts
        # AWQ: the sorted loop below on every device, whose bincount is a host sync per layer (no CUDA graphs:
        # DeepseekV3ForCausalLM.cuda_graphs). Next step: a fused grouped-GEMV kernel for decode, reading the
        # int4 stacks of the routed experts directly.
        if x.is_cuda and self.awq is None:
            if sharded:  # other ranks' pairs weigh 0 (computed on local expert 0, then dropped)
                owned = (ids >= self.first) & (ids < self.first + self.num_local)
                weights = weights.masked_fill(~owned, 0.0)
                ids = torch.where(owned, ids - self.first, 0)
            return self._fused(x, weights, ids)
        top_k = ids.shape[1]
        flat_ids = ids.flatten()  # [T*k]
        flat_weights = weights.flatten()
        pair_token = torch.arange(flat_ids.numel(), device=x.device) // top_k
        if sharded:  # keep only the pairs routed to this rank's experts
            keep = (flat_ids >= self.first) & (flat_ids < self.first + self.num_local)
            flat_ids, flat_weights, pair_token = flat_ids[keep] - self.first, flat_weights[keep], pair_token[keep]
        order = flat_ids.argsort(stable=True)  # token-expert pairs grouped by expert
        token_of = pair_token[order]  # [P]
        out = self._run_sorted(x[token_of], flat_ids[order])  # [P, H] fp32
        out *= flat_weights[order, None]
        # Sum each token's k contributions in fp32, round once.
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)

    def forward_pairs(
        self,
        x: torch.Tensor,  # [P, H] one row per token-expert pair (--moe-a2a: the pairs other ranks sent here)
        local_ids: torch.Tensor,  # [P] int64 local expert of each row, in [0, num_local)
    ) -> torch.Tensor:  # [P, H] in x's dtype: each row's expert output, unweighted
        """The routing weights stay with the token's own rank, which weighs and sums its pairs in fp32 (the
        arithmetic of forward: down rounded to the dtype, then times the fp32 weight)."""
        if x.is_cuda and self.awq is None:  # one pair per row: top-k of 1, weight 1: the rounded down output as is
            ones = torch.ones(local_ids.shape[0], 1, dtype=torch.float32, device=x.device)
            return self._fused(x, ones, local_ids[:, None])
        order = local_ids.argsort(stable=True)  # rows grouped by expert
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out[order] = self._run_sorted(x[order], local_ids[order]).to(x.dtype)
        return out

    def _fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The Triton kernel on local expert ids [T, k] (weights [T, k] fp32): [T, H] in x's dtype."""
        from r1deploy.kernels.fused_moe import fused_moe  # triton only where there is a GPU

        fp8 = self.fp8_block is not None
        return fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids,
                         gate_up_scale=self.gate_up_proj_scale_inv if fp8 else None,
                         down_scale=self.down_proj_scale_inv if fp8 else None,
                         scale_block=self.fp8_block or (128, 128))

    def _run_sorted(self, sorted_x: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """The CPU path's expert GEMMs: rows sorted_x [P, H] grouped by local expert sorted_ids [P]; one GEMM
        pair per busy expert. Returns the unweighted outputs [P, H] in fp32 (each rounded to x's dtype first)."""
        counts = torch.bincount(sorted_ids, minlength=self.num_local).tolist()  # one host sync per layer
        out = torch.empty(sorted_x.shape, dtype=torch.float32, device=sorted_x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:  # idle experts cost nothing
                continue
            rows = slice(start, start + count)
            gate_up, down = self.expert_weights(expert, sorted_x.dtype)
            hidden = silu_and_mul(F.linear(sorted_x[rows], gate_up))  # [n, I]
            out[rows] = F.linear(hidden, down)  # [n, H]
            start += count
        return out

    def _forward_offloaded(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The CPU path's arithmetic with weights from the store's slots (bit-identical on CPU). Busy
        experts that fit the slot pool are fetched at once and the next MoE layer's likely experts are
        prefetched; more than fit run in rounds of num_gpu_slots. Misses may run on the host copy."""
        store = self.store
        assert store is not None
        top_k = ids.shape[1]
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        busy = [e for e, c in enumerate(counts) if c]
        starts, start = {}, 0
        for e in busy:
            starts[e], start = start, start + counts[e]
        on_host = [e for e in busy if store.compute_on_host_choice(self.layer_idx, e, counts[e])]
        on_device = [e for e in busy if e not in set(on_host)]
        slots = store.num_gpu_slots
        if x.is_cuda and not on_host and 0 < len(on_device) <= slots:
            from r1deploy.kernels.fused_moe import fused_moe

            resident = store.get(self.layer_idx, on_device)
            store.prefetch_next(self.layer_idx, x)
            slot_of = torch.zeros(self.num_experts, dtype=ids.dtype)
            slot_of[on_device] = torch.tensor(resident.slots, dtype=ids.dtype)
            # FP8 store: the slot pools are FP8 with their block-scale pools; the kernel scales each tile.
            return fused_moe(x, resident.gate_up, resident.down, weights, slot_of.to(ids.device)[ids],
                             gate_up_scale=resident.gate_up_scale, down_scale=resident.down_scale,
                             scale_block=tuple(store.fp8_block))
        sorted_x = x[token_of]
        out = torch.empty(sorted_x.shape, dtype=torch.float32, device=x.device)
        rounds = [on_device[i : i + slots] for i in range(0, len(on_device), slots)]
        for n, chunk in enumerate(rounds):
            resident = store.get(self.layer_idx, chunk)
            if n == len(rounds) - 1:  # the last round's slots stay in use; prefetch around them
                store.prefetch_next(self.layer_idx, x)
            for index, expert in enumerate(chunk):
                rows = slice(starts[expert], starts[expert] + counts[expert])
                gate_up, down = store.dequantized(resident, index, x.dtype)  # FP8: dequantised like expert_weights
                hidden = silu_and_mul(F.linear(sorted_x[rows], gate_up))  # [n, I]
                out[rows] = F.linear(hidden, down)  # [n, H]
        if not rounds:
            store.prefetch_next(self.layer_idx, x)
        for expert in on_host:
            rows = slice(starts[expert], starts[expert] + counts[expert])
            out[rows] = store.compute_on_host(self.layer_idx, expert, sorted_x[rows])
        out *= weights.flatten()[order, None]
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)


class DeepseekMoE(nn.Module):
    """tp: the router runs replicated, each rank adds its own experts' contributions for every token
    plus its slice of the shared experts, and one all-reduce sums the ranks (the all-gather /
    reduce-scatter-free scheme for small batches: every rank already holds every token).

    tp.dp_attention: each rank holds only its own sequences' tokens. The block all-gathers them (every rank's
    count is known from the step message), routes and runs this rank's experts on all of them, and a
    reduce-scatter hands each rank the sum over ranks for its own tokens; the shared experts are whole on
    every rank (replicated weights) and run on its own tokens only.

    tp.moe_all_to_all (with dp_attention, --moe-a2a): each rank routes its own tokens and sends each
    token-expert pair only to the rank holding that expert (all-to-all), which runs it and sends the output
    back (all-to-all); the token's rank weighs and sums its k outputs. Per rank the bytes and expert rows
    scale with its own tokens x k, not with every rank's tokens."""

    def __init__(self, config: DeepseekConfig, tp: TPGroup | None = None, prefix: str = "mlp") -> None:
        """prefix: this block's checkpoint name (model.layers.{i}.mlp), which AWQ's modules_to_not_convert
        is matched against."""
        super().__init__()
        self.tp = tp
        self.dp_attention = tp is not None and tp.size > 1 and tp.dp_attention
        self.all_to_all = self.dp_attention and tp.moe_all_to_all
        self.gate = DeepseekGate(config)
        awq = config.awq
        self.experts = DeepseekExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, tp,
                                       awq=awq if awq and awq.quantises(f"{prefix}.experts") else None)
        self.shared_experts = (
            DeepseekMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                        None if self.dp_attention else tp, reduce=False, awq=awq, prefix=f"{prefix}.shared_experts")
            if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor, dp_token_counts: list[int] | None = None) -> torch.Tensor:  # [T, hidden]
        if self.dp_attention:
            if (dp_token_counts is None or len(dp_token_counts) != self.tp.size
                    or x.shape[0] != dp_token_counts[self.tp.rank]):
                raise ValueError(f"data-parallel MoE: rank {self.tp.rank} has {x.shape[0]} tokens, "
                                 f"step counts {dp_token_counts}")
            if not sum(dp_token_counts):  # every rank knows: no collective at all
                return x
            routed = self._routed_all_to_all(x) if self.all_to_all else self._routed_dp(x, dp_token_counts)
            if self.shared_experts is not None and x.shape[0]:
                routed = routed + self.shared_experts(x)
            return routed
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        # The shared experts sit outside the weighted sum (unscaled by routed_scaling_factor).
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out if self.tp is None else self.tp.all_reduce(out)

    def _routed_dp(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """--dp-attention: x [counts[rank], hidden] is this rank's tokens; counts are every rank's."""
        tokens = self.tp.all_gather_rows(x, counts)  # [sum(counts), hidden], rank order
        weights, ids = self.gate(tokens)
        return self.tp.reduce_scatter_rows(self.experts(tokens, weights, ids), counts)  # this rank's tokens

    def _routed_all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """--moe-a2a: the routed experts' weighted sum for this rank's tokens x [T, hidden] (T may be 0)."""
        tp, experts = self.tp, self.experts
        weights, ids = self.gate(x)  # [T, k] each, this rank's tokens only
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
        # Sum each token's k contributions in fp32, round once (as DeepseekExperts.forward).
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)
