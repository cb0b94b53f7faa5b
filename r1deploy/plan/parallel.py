"""Parallel layouts: TP x PP per model instance, EP for experts, DP-attention for MLA, replicas.

num_gpus = replicas x tp x pp. Inside one pipeline stage, `tp` GPUs share every layer:
- attention is tensor-parallel over them, or data-parallel (`dp_attention`, MLA only: each GPU
  keeps whole attention weights and its own requests' latent cache; SGLang --enable-dp-attention);
- routed experts are split over `ep` GPUs (each expert tensor-parallel over tp/ep); `ep` divides `tp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1deploy.errors import UsageError
from r1deploy.plan.model_spec import ModelSpec

DEFAULT_GPUS_PER_NODE = 8
# Largest cluster the search considers; R1 in BF16 on 24 GB cards would need more, and nobody does that.
MAX_NODES = 16


@dataclass(frozen=True)
class Layout:
    num_gpus: int
    tp: int
    pp: int
    ep: int
    dp_attention: bool
    gpus_per_node: int

    @property
    def instance_gpus(self) -> int:
        return self.tp * self.pp

    @property
    def replicas(self) -> int:
        return self.num_gpus // self.instance_gpus

    @property
    def nodes(self) -> int:
        return math.ceil(self.num_gpus / self.gpus_per_node)

    @property
    def attention_tp(self) -> int:
        return 1 if self.dp_attention else self.tp

    @property
    def attention_dp(self) -> int:
        return self.tp if self.dp_attention else 1

    @property
    def tp_crosses_nodes(self) -> bool:
        return self.tp > self.gpus_per_node

    @property
    def pp_crosses_nodes(self) -> bool:
        return self.instance_gpus > self.gpus_per_node

    def describe(self) -> str:
        parts = [f"TP{self.tp}"]
        if self.pp > 1:
            parts.append(f"PP{self.pp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.dp_attention:
            parts.append(f"DP-attn{self.tp}")
        if self.replicas > 1:
            parts.append(f"x{self.replicas} replicas")
        return " ".join(parts)


def valid_tp_sizes(model: ModelSpec, limit: int) -> list[int]:
    """TP must divide the attention heads (vLLM/SGLang split heads evenly); for GQA, KV heads must
    divide evenly or be replicated whole (n_kv % tp == 0 or tp % n_kv == 0)."""
    out = []
    for tp in range(1, min(limit, model.num_heads) + 1):
        if model.num_heads % tp:
            continue
        if not model.mla and model.num_kv_heads % tp and tp % model.num_kv_heads:
            continue
        out.append(tp)
    return out


def candidate_gpu_counts(gpus_per_node: int, max_nodes: int = MAX_NODES) -> list[int]:
    """Rentable shapes: 1, 2, 4 ... GPUs inside one node, then whole nodes."""
    small = [n for n in (1, 2, 4, 8, 16, 32) if n < gpus_per_node]
    return [*small, *(gpus_per_node * k for k in range(1, max_nodes + 1))]


def check_layout(model: ModelSpec, layout: Layout) -> None:
    """Raise UsageError if the layout is not one an engine can run."""
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    if tp < 1 or pp < 1 or ep < 1 or layout.num_gpus < 1:
        raise UsageError("--num-gpus, --tp, --pp and --ep must be positive")
    if tp not in valid_tp_sizes(model, tp):
        raise UsageError(f"--tp {tp} does not divide {model.name}'s {model.num_heads} attention heads"
                         + ("" if model.mla else f" / {model.num_kv_heads} KV heads")
                         + f"; valid: {', '.join(map(str, valid_tp_sizes(model, 1024)))}")
    if pp > model.num_layers:
        raise UsageError(f"--pp {pp} exceeds the {model.num_layers} layers")
    if layout.num_gpus % (tp * pp):
        raise UsageError(f"--num-gpus {layout.num_gpus} is not a multiple of tp x pp = {tp * pp}")
    if ep > 1 and not model.moe:
        raise UsageError(f"--ep {ep}: {model.name} is dense (no experts to split)")
    if model.moe and (tp % ep or ep > model.n_routed_experts):
        raise UsageError(f"--ep {ep} must divide --tp {tp} (experts are split within a TP group)")
    if layout.dp_attention and not model.mla:
        raise UsageError(f"--dp-attention needs MLA attention; {model.name} uses GQA/MHA")
    if layout.dp_attention and tp == 1:
        raise UsageError("--dp-attention needs --tp > 1 (attention runs data-parallel over the TP group)")
    if layout.dp_attention and ep != tp:
        raise UsageError("--dp-attention hands tokens to experts by all-to-all: --ep must equal --tp")
    gpn = layout.gpus_per_node
    if tp * pp > gpn and (tp * pp) % gpn:
        raise UsageError(f"an instance of tp x pp = {tp * pp} GPUs spanning nodes must use whole "
                         f"{gpn}-GPU nodes")


def enumerate_layouts(model: ModelSpec, num_gpus: int, gpus_per_node: int, *, tp: int | None = None,
                      pp: int | None = None, ep: int | None = None,
                      dp_attention: bool | None = None) -> list[Layout]:
    """Every runnable layout on num_gpus GPUs, honouring the fixed choices the user gave."""
    out = []
    for t in [tp] if tp else valid_tp_sizes(model, num_gpus):
        for p in [pp] if pp else [p for p in range(1, min(num_gpus // t, model.num_layers) + 1)]:
            if num_gpus % (t * p):
                continue
            if pp is None and p > 1 and t * p > gpus_per_node and t < gpus_per_node:
                continue  # PP across nodes only after TP fills a node (the vLLM recipe)
            dps = [dp_attention] if dp_attention is not None else ([False, True] if model.mla and t > 1 else [False])
            for d in dps:
                eps = [ep] if ep else ([t] if d else [1, t] if model.moe and t > 1 else [1])
                for e in dict.fromkeys(eps):
                    layout = Layout(num_gpus, t, p, e, bool(d), gpus_per_node)
                    try:
                        check_layout(model, layout)
                    except UsageError:
                        continue
                    out.append(layout)
    return out
