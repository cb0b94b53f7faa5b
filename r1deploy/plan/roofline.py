"""Roofline step times: one pipeline stage, one forward (a prefill of S tokens or a decode step of B).

time = sum over kernel groups (attention core, dense linears, routed experts) of
       max(FLOPs / (peak x eff_flops), bytes / (HBM bandwidth x eff_bw)) + collectives + fixed overhead,
with INT4 (awq/gptq) weight bytes charged at the dequantising kernels' slower rates (Efficiency.int4_read,
int4_multirow).
The efficiency factors are named defaults; `--calibration FILE.json` overrides any of them, and
`--calibrate RUN.json` (calibrate.py) fits them to measured runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import GpuSpec
from r1deploy.plan.memory import heaviest_stage, kv_bytes_per_token_per_gpu, weights_bytes_per_gpu
from r1deploy.plan.model_spec import ModelSpec
from r1deploy.plan.parallel import Layout
from r1deploy.plan.precision import Precision

ACT_BYTES = 2  # bf16 activations on the wire (TP all-reduce, EP dispatch/combine, PP send)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peak that serving engines reach, and fixed latencies."""

    # Prefill GEMM MFU: llm-analysis fits 0.7 on FasterTransformer; vLLM/SGLang prefill measures 40-60%.
    prefill_flops: float = 0.55
    # Decode is small-M GEMMs and attention kernels: lower MFU when compute-bound.
    decode_flops: float = 0.45
    # HBM bandwidth actually streamed: AIConfigurator uses 0.8; llm-analysis suggests <= 0.9.
    memory_bandwidth: float = 0.8
    # INT4 weight-only linears (awq/gptq), as shares of the 16-bit read rate (memory_bandwidth). One token
    # row: a dequantising GEMV streams the packed bytes, but unpacking nibbles and applying scales and
    # zeros cost issue slots, so it runs below copy bandwidth: 0.5 is a middle guess; this repo's H200
    # GEMV measures 0.41 kernel-timed, 0.53 fitted end to end (calibration_h200.json).
    int4_read: float = 0.5
    # More than one token row: tile kernels dequantise every weight again per row tile and are issue-bound,
    # taking at least this share of the time a 16-bit read of the same weights takes. 0.25 lets only the
    # packed bytes count (a 4x smaller read); this repo's H200 tile kernel takes 1.0-1.1 kernel-timed (no
    # faster than bf16), 0.89 fitted end to end.
    int4_multirow: float = 0.25
    # NCCL bus bandwidth vs link peak: ~0.7 on NVLink (nccl-tests), ~0.8 on InfiniBand.
    intranode_link: float = 0.7
    internode_link: float = 0.8
    # Fixed cost per collective: NCCL small-message latency, ~10 us in a node, ~25 us over IB.
    intranode_latency_s: float = 10e-6
    internode_latency_s: float = 25e-6
    # Scheduler, input preparation and sampling per decode step with CUDA graphs (1-3 ms in vLLM).
    step_overhead_s: float = 0.002
    # Fixed time per decoder layer per decode step, beyond its roofline (the latency of a chain of
    # small kernels: a graph replay still pays each kernel's launch and tail). 0 = pure roofline.
    layer_overhead_s: float = 0.0
    # MoE grouped GEMM: share of the phase's MFU (prefill_flops / decode_flops) the routed experts' GEMMs reach.
    # Experts run as many small GEMMs of uneven M (tokens sorted per expert), below dense GEMMs' MFU. 1 = same.
    moe_flops: float = 1.0
    # FP8 linears on GPUs with FP8 tensor cores: share of the phase's MFU they reach against the FP8 peak (1 = the
    # same share as bf16 GEMMs of the bf16 peak; a block-scaled Triton GEMM no faster than cuBLAS bf16 is ~0.5).
    fp8_flops: float = 1.0
    # Fixed time per MoE layer per decode step when the experts are block-scaled FP8, beyond layer_overhead_s:
    # the fused-MoE kernel dequantises block scales per tile and, at small M, waits on latency, not bytes.
    # Like layer_overhead_s it does not shrink with TP/EP. 0 = pure roofline.
    fp8_moe_layer_overhead_s: float = 0.0
    # Decode attention kernels (MLA absorbed / paged GQA): share of decode_flops they reach. 128-head absorbed MLA
    # is compute-heavy (~240 FLOP per byte) and runs on small mma tiles, far below dense GEMMs. 1 = same.
    attention_flops: float = 1.0
    # Routed experts in block-scaled FP8: share of memory_bandwidth the fused-MoE kernel streams them at (it
    # dequantises per tile to bf16, W8A16, and reads scattered expert tiles; bf16 experts stream like a GEMV,
    # as DeepSeek-V2-Lite's runs show). 1 = as fast as a dense read.
    fp8_moe_bandwidth: float = 1.0
    # Share of the (untied) input embedding table read per forward: 1 counts it like any weight (the
    # conservative default the dense calibration was fitted with); 0 = a lookup reads only the batch's
    # rows, as engines do.
    embedding_read: float = 1.0
    # Share of a prompt's rows the logits GEMM runs on in prefill: 1 counts every row (the conservative default
    # the dense calibration was fitted with); 0 = only the last row, as engines sample (R1: 3.8 TFLOP saved
    # per 2,048-token prompt).
    prefill_logits: float = 1.0


# Efficiency factors that may be 0 in a calibration file (besides the *_s latencies).
ZERO_OK = ("embedding_read", "prefill_logits")
# Calibration sections: a calibration file's top-level factors apply to every model; a "moe" object
# in it overrides them for MoE and/or MLA models (DeepSeek), fitted separately (calibrate.py).
CALIBRATION_FAMILIES = ("dense", "moe")


def calibration_family(model: ModelSpec) -> str:
    """Which calibration section applies to `model`: "moe" for MoE or MLA models, else "dense"."""
    return "moe" if model.moe or model.mla else "dense"


def load_calibration(path: str | Path | None, family: str = "dense") -> Efficiency:
    """The efficiency factors of a calibration file for a model of `family` (calibration_family): the
    top-level factors, overridden by the file's "moe" section for family "moe" when it has one."""
    if not path:
        return Efficiency()
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--calibration {path}: {exc}") from None
    return calibration_from_dict(data, family, str(path))


def calibration_from_dict(data: object, family: str, where: str, base: Efficiency | None = None) -> Efficiency:
    """A calibration object's factors for `family` over `base` (default: Efficiency's): the top level, then the
    family's section. Engine profiles (engines.py) hold the same object."""
    if not isinstance(data, dict):
        raise UsageError(f"--calibration {where}: expected a JSON object of efficiency factors, got {data!r}")
    data = dict(data)
    sections = {k: data.pop(k) for k in CALIBRATION_FAMILIES[1:] if k in data}
    values = _check_factors(where, data)
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise UsageError(f"--calibration {where}: {name!r} must be an object of efficiency factors")
        override = _check_factors(f"{where} [{name}]", section)
        if name == family:
            values = {**values, **override}
    return replace(base or Efficiency(), **values)


def _check_factors(where: str | Path, data: dict[str, object]) -> dict[str, float]:
    valid = {f.name for f in fields(Efficiency)}
    if set(data) - valid:
        raise UsageError(f"--calibration {where}: unknown keys {sorted(set(data) - valid)}; valid: "
                         f"{', '.join(sorted(valid))}")
    for key, value in data.items():
        seconds = key.endswith("_s")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (
                value == 0 and not seconds and key not in ZERO_OK) or (value > 1 and not seconds):
            raise UsageError(f"--calibration {where}: {key} must be a number in (0, 1] (seconds >= 0 for *_s)")
    return {k: float(v) for k, v in data.items()}  # type: ignore[arg-type]


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    memory_s: float
    comm_s: float
    flops: float  # per GPU
    bytes: float  # HBM bytes per GPU
    comm_bytes: float  # bytes one GPU sends
    internode_comm_bytes: float  # of which cross a node boundary
    fixed_s: float  # per-layer fixed latencies (Efficiency.layer_overhead_s)
    # Sum over the step's kernel groups (attention core, dense linears, routed experts) of each one's
    # max(compute, memory): kernels run one after another, so a compute-bound attention does not hide a
    # memory-bound MoE (compute_s and memory_s are the groups' sums, for the bound and the report).
    roofline_s: float

    @property
    def total_s(self) -> float:
        # No compute/communication overlap assumed: the conservative side of what engines achieve.
        return self.roofline_s + self.comm_s + self.fixed_s

    def terms(self) -> dict[str, float]:
        """The step's terms in milliseconds (the per-term breakdown `plan --validate` prints)."""
        return {"compute_ms": self.compute_s * 1e3, "memory_ms": self.memory_s * 1e3,
                "roofline_ms": self.roofline_s * 1e3, "comm_ms": self.comm_s * 1e3, "fixed_ms": self.fixed_s * 1e3}

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class StageCost:
    """What one GPU of the heaviest pipeline stage holds and computes, computed once per layout."""

    model: ModelSpec
    layout: Layout
    gpu: GpuSpec
    eff: Efficiency
    dense_layers: int
    moe_layers: int
    nonexpert_bytes: float
    expert_bytes: float
    kv_bytes_per_token: float  # per GPU
    attn_params: float  # attention matmul params on the stage (all GPUs)
    other_params: float  # active non-attention matmul params on the stage (top-k experts), incl. lm_head
    linear_tflops: float
    embedding_bytes: float = 0.0  # of nonexpert_bytes: the untied input embedding (Efficiency.embedding_read)
    # INT4 weight-only linears, read by dequantising kernels (Efficiency.int4_read, int4_multirow):
    int4_nonexpert_bytes: float = 0.0  # of nonexpert_bytes: attention, dense MLP and shared-expert linears
    int4_experts: bool = False  # the routed experts (expert_bytes) are INT4 too
    int4_to_16bit: float = 0.0  # 16-bit bytes of the same weights per INT4 byte (~3.8 at group 128)
    expert_params: float = 0.0  # of other_params: the routed experts' active (top-k) params (Efficiency.moe_flops)
    logits_params: float = 0.0  # of other_params: the logits GEMM, run for the last prompt token only in prefill
    fp8_weights: bool = False  # block-scaled FP8 linears (Efficiency.fp8_moe_layer_overhead_s)
    fp8_compute: bool = False  # ... run on FP8 tensor cores (linear_tflops is the FP8 peak; Efficiency.fp8_flops)
    precision: Precision | None = None  # what it was built with (mtp_stage builds the draft module's alike)

    @property
    def layers(self) -> int:
        return self.dense_layers + self.moe_layers


def stage_cost(model: ModelSpec, precision: Precision, layout: Layout, gpu: GpuSpec, eff: Efficiency) -> StageCost:
    dense, moe = heaviest_stage(model, layout.pp)
    counts = {"layer": dense + moe, "dense": dense, "moe": moe}
    attn = other = experts = 0.0
    for t in model.tensors:
        if t.kind not in ("linear", "router") or t.scope not in counts:
            continue
        n = t.numel * t.copies * counts[t.scope]
        if t.part == "routed_experts":
            n *= model.num_experts_per_tok / model.n_routed_experts
            experts += n
        if t.part == "attention":
            attn += n
        else:
            other += n
    logits = model.lm_head_params or model.embedding_params  # logits GEMM (tied head reuses the embedding)
    other += logits
    all_parts = ("attention", "dense_mlp", "shared_experts", "router", "norm", "embedding", "lm_head")
    fp8 = precision.weights == "fp8" and gpu.fp8_compute
    int4_nonexpert = int4_to_16bit = 0.0
    if precision.int4:
        int4_parts = ("attention", "dense_mlp", "shared_experts")  # their linears; their norms are negligible
        int4_nonexpert = weights_bytes_per_gpu(model, precision, layout, parts=int4_parts)
        int4_to_16bit = weights_bytes_per_gpu(model, replace(precision, weights="bf16"), layout,
                                              parts=int4_parts) / int4_nonexpert
    return StageCost(
        model, layout, gpu, eff, dense, moe,
        nonexpert_bytes=weights_bytes_per_gpu(model, precision, layout, parts=all_parts),
        expert_bytes=weights_bytes_per_gpu(model, precision, layout, parts=("routed_experts",)),
        kv_bytes_per_token=kv_bytes_per_token_per_gpu(model, precision, layout),
        attn_params=attn, other_params=other,
        linear_tflops=(gpu.fp8_tflops if fp8 else gpu.bf16_tflops) or gpu.bf16_tflops,
        embedding_bytes=(weights_bytes_per_gpu(model, precision, layout, parts=("embedding",))
                         if model.lm_head_params else 0.0),  # a tied table is read whole by the logits GEMM
        int4_nonexpert_bytes=int4_nonexpert, int4_experts=precision.int4, int4_to_16bit=int4_to_16bit,
        fp8_weights=precision.weights == "fp8", fp8_compute=fp8, logits_params=logits, expert_params=experts,
        precision=precision,
    )


def experts_touched(model: ModelSpec, tokens: float) -> float:
    """Expected fraction of routed experts that `tokens` tokens hit, each picking k of E uniformly
    (real routing is skewed, so this is an upper bound on bytes read)."""
    if not model.moe:
        return 1.0
    return 1 - (1 - model.num_experts_per_tok / model.n_routed_experts) ** max(tokens, 0.0)


def _link(cost: StageCost, crosses_nodes: bool) -> tuple[float, float]:
    g, e = cost.gpu, cost.eff
    if crosses_nodes:
        return g.internode_bytes_s * e.internode_link, e.internode_latency_s
    return g.intranode_bytes_s * e.intranode_link, e.intranode_latency_s


def collectives(cost: StageCost, tokens: float) -> tuple[float, float, float]:
    """(seconds, bytes sent per GPU, of which cross nodes) for one forward of `tokens` tokens on the
    stage: per layer one all-reduce after attention (unless DP-attention) and one after the MLP, or an
    EP dispatch + combine all-to-all for MoE layers under DP-attention."""
    lay, d, n = cost.layout, cost.model.hidden_size, cost.layout.tp
    if n == 1:
        return 0.0, 0.0, 0.0
    bw, lat = _link(cost, lay.tp_crosses_nodes)
    msg = tokens * d * ACT_BYTES
    ring = 2 * (n - 1) / n * msg  # ring all-reduce: reduce-scatter + all-gather
    allreduce = ring / bw + lat
    a2a_bytes = 2 * (tokens / n) * cost.model.num_experts_per_tok * d * ACT_BYTES * (n - 1) / n
    alltoall = a2a_bytes / bw + 2 * lat
    seconds = sent = 0.0
    for layers, moe in ((cost.dense_layers, False), (cost.moe_layers, True)):
        if not lay.dp_attention:
            seconds, sent = seconds + layers * allreduce, sent + layers * ring
        if moe and lay.dp_attention:
            seconds, sent = seconds + layers * alltoall, sent + layers * a2a_bytes
        else:
            seconds, sent = seconds + layers * allreduce, sent + layers * ring
    return seconds, sent, sent if lay.tp_crosses_nodes else 0.0


def _step(cost: StageCost, tokens: float, attn_flops: float, kv_read: float, flops_eff: float,
          attention_ways: int, fixed_s: float = 0.0, logit_rows: float | None = None,
          attention_eff: float = 1.0) -> StepTime:
    """`logit_rows`: rows the logits GEMM runs on (default every token; a prefill needs only the last);
    `attention_eff`: the attention core's share of `flops_eff` (decode: Efficiency.attention_flops).
    Three kernel groups, each at its own roofline (StepTime.roofline_s): the attention core (attention FLOPs
    against the KV read), the dense linears (attention projections, dense MLP, shared experts, logits against
    their weights) and the routed experts (their FLOPs against the expert bytes read)."""
    lay, gpu, eff = cost.layout, cost.gpu, cost.eff
    rows = tokens if logit_rows is None else logit_rows
    linear = 2 * tokens * (cost.attn_params / attention_ways + (cost.other_params - cost.logits_params) / lay.tp) + (
        2 * rows * cost.logits_params / lay.tp)
    expert_linear = 2 * tokens * cost.expert_params / lay.tp  # part of `linear`, at the grouped GEMM's rate
    linear_rate = cost.linear_tflops * 1e12 * flops_eff * (eff.fp8_flops if cost.fp8_compute else 1.0)
    dense_compute = (linear - expert_linear) / linear_rate
    expert_compute = expert_linear / (linear_rate * eff.moe_flops)
    attn_compute = attn_flops / (gpu.bf16_tflops * 1e12 * flops_eff * attention_eff)
    experts = cost.expert_bytes * experts_touched(cost.model, tokens)
    dense_bytes = cost.nonexpert_bytes - cost.embedding_bytes * (1 - eff.embedding_read)
    hbm = dense_bytes + experts + kv_read
    bw = gpu.bandwidth_bytes_s * eff.memory_bandwidth

    def read_s(nbytes: float, int4: float) -> float:
        """HBM time in 16-bit-read equivalents: INT4 bytes are read by slower dequantising kernels (one token
        row), or cost at least a share of their 16-bit read (tile kernels, several rows)."""
        int4_equivalent = int4 / eff.int4_read
        if tokens > 1:
            int4_equivalent = max(int4_equivalent, int4 * cost.int4_to_16bit * eff.int4_multirow)
        return (nbytes - int4 + int4_equivalent) / bw

    dense_memory = read_s(dense_bytes, cost.int4_nonexpert_bytes)
    expert_memory = read_s(experts, experts if cost.int4_experts else 0.0) / (
        eff.fp8_moe_bandwidth if cost.fp8_weights else 1.0)
    attn_memory = kv_read / bw
    roofline = (max(attn_compute, attn_memory) + max(dense_compute, dense_memory)
                + max(expert_compute, expert_memory))
    comm_s, sent, inter = collectives(cost, tokens)
    return StepTime(attn_compute + dense_compute + expert_compute, attn_memory + dense_memory + expert_memory,
                    comm_s, linear + attn_flops, hbm, sent, inter, fixed_s, roofline)


def prefill_stage(cost: StageCost, prompt_tokens: int) -> StepTime:
    """One prompt alone on the stage. Causal attention: GQA 2*L*H*d*S^2; MLA runs the MHA form in
    prefill, L*H*(d_qk + d_v)*S^2 (planning.md section 3). Under DP-attention one GPU does it all."""
    m, s = cost.model, prompt_tokens
    if m.mla:
        attn = cost.layers * m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * s * s
    else:
        attn = 2 * cost.layers * m.num_heads * m.head_dim * s * s
    ways = cost.layout.attention_tp
    return _step(cost, s, attn / ways, 0.0, cost.eff.prefill_flops, ways, logit_rows=1 + (s - 1) * cost.eff.prefill_logits)


def decode_stage(cost: StageCost, batch: float, context: float, query_tokens: int = 1) -> StepTime:
    """One decode step of `batch` sequences at average `context` tokens, `query_tokens` per sequence (1, or
    1 + draft tokens for a speculative verify step: the KV cache is read once for all of them). Attention
    per token: GQA 4*L*H*d*ctx; absorbed MLA 2*L*H*(2*kv_lora + rope)*ctx. KV read: every attention rank
    reads the cache of the sequences it serves (MLA latents are not TP-split, so each TP rank reads all)."""
    m, lay = cost.model, cost.layout
    if m.mla:
        per_token = 2 * cost.layers * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * context
    else:
        per_token = 4 * cost.layers * m.num_heads * m.head_dim * context
    attn = per_token * batch * query_tokens / lay.tp
    kv_read = batch / lay.attention_dp * context * cost.kv_bytes_per_token
    fixed_s = cost.layers * cost.eff.layer_overhead_s + (
        cost.moe_layers * cost.eff.fp8_moe_layer_overhead_s if cost.fp8_weights else 0.0)
    return _step(cost, batch * query_tokens, attn, kv_read, cost.eff.decode_flops, lay.tp, fixed_s,
                 attention_eff=cost.eff.attention_flops)


def mtp_stage(cost: StageCost) -> StageCost:
    """The draft forward of speculative decoding (DeepSeek's MTP module): one decoder layer of the model's last
    kind (MoE for DeepSeek) with the shared embedding and logits head, on the same GPUs and factors."""
    moe = 1 if cost.model.moe else 0
    one = replace(cost.model, num_layers=1, num_dense_layers=1 - moe, num_moe_layers=moe, num_mtp_layers=0)
    assert cost.precision is not None, "a StageCost from stage_cost()"
    return stage_cost(one, cost.precision, replace(cost.layout, pp=1), cost.gpu, cost.eff)


def pipeline_send_s(cost: StageCost, tokens: float) -> float:
    """Activations handed between consecutive stages, (pp - 1) hops per forward."""
    lay = cost.layout
    if lay.pp == 1:
        return 0.0
    bw, lat = _link(cost, lay.pp_crosses_nodes)
    return (lay.pp - 1) * (tokens * cost.model.hidden_size * ACT_BYTES / bw + lat)
