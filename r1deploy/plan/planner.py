"""The planner's entry point: options in, one deployment plan out (the `r1deploy plan --json` object)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import Catalog, GpuSpec
from r1deploy.plan.engines import load_engine, requested_spec, spec_decode_dict
from r1deploy.plan.host_requirements import HostPlan, host_requirements
from r1deploy.plan.launch import launch_commands
from r1deploy.plan.memory import weights_bytes_total
from r1deploy.plan.model_spec import load_model
from r1deploy.plan.offload import OffloadPlan
from r1deploy.plan.parallel import DEFAULT_GPUS_PER_NODE, Layout, check_layout
from r1deploy.plan.precision import compute_note, make_precision
from r1deploy.plan.roofline import calibration_family, load_calibration
from r1deploy.plan.search import Candidate, Settings, Slo, require, search
from r1deploy.plan.serving import DEFAULT_CONCURRENCY, DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, Workload

DEFAULT_GPU = "h200"
DEFAULT_MODEL = "deepseek-r1"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default


@dataclass(frozen=True)
class Plan:
    settings: Settings
    chosen: Candidate
    host: HostPlan
    searched_catalog: bool
    offload: OffloadPlan | None = None  # `--offload experts`: one GPU + host memory, beside the main plan

    @property
    def notes(self) -> list[str]:
        c, s = self.chosen, self.settings
        notes = []
        note = compute_note(s.precision, c.gpu.fp8_compute, c.gpu.display_name)
        if note:
            notes.append(note)
        if s.model.num_mtp_layers and s.spec is None:
            notes.append(f"the {s.model.mtp_params / 1e9:.1f}B-parameter MTP module is stored in the checkpoint but "
                         "not loaded (no speculative decoding planned)")
        elif s.model.num_mtp_layers:
            notes.append(f"speculative decoding (performance.spec_decode) loads the {s.model.mtp_params / 1e9:.1f}B-"
                         "parameter MTP module too: the memory above leaves it out")
        if c.layout.tp_crosses_nodes:
            notes.append("TP spans nodes: every layer's collectives cross InfiniBand")
        return notes

    def to_dict(self) -> dict[str, Any]:
        s, c, h = self.settings, self.chosen, self.host
        m, mem, perf, lay, gpu = s.model, c.memory, c.perf, c.layout, c.gpu
        assert perf is not None  # a chosen candidate always fits
        w = s.workload
        plan = {
            "model": {
                "name": m.name, "model_type": m.model_type,
                "attention": "MLA" if m.mla else ("MHA" if m.num_kv_heads == m.num_heads else "GQA"),
                "moe": m.moe, "total_params": m.total_params, "active_params": int(m.active_params),
                "mtp_params": m.mtp_params, "checkpoint_params": m.checkpoint_params,
                "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                "num_kv_heads": m.num_kv_heads, "n_routed_experts": m.n_routed_experts,
                "experts_per_token": m.num_experts_per_tok, "max_position_embeddings": m.max_position_embeddings,
                "checkpoint_weights": m.checkpoint_weights,
            },
            "precision": {
                "weights": s.precision.weights, "group_size": s.precision.group_size if s.precision.int4 else None,
                "kv_cache_dtype": s.precision.kv_cache,
                "compute": "fp8" if s.precision.weights == "fp8" and gpu.fp8_compute else "bf16",
            },
            "workload": {"input_len": w.input_len, "output_len": w.output_len, "concurrency": w.concurrency,
                         "request_rate": w.request_rate, "max_model_len": w.max_model_len},
            "slo": {"ttft_ms": None if s.slo.ttft_s is None else s.slo.ttft_s * 1e3,
                    "tpot_ms": None if s.slo.tpot_s is None else s.slo.tpot_s * 1e3},
            "memory": {
                "weights_bytes": weights_bytes_total(m, s.precision),
                "weights_bytes_per_gpu": mem.weights_bytes, "activation_bytes_per_gpu": mem.activation_bytes,
                "overhead_bytes_per_gpu": mem.overhead_bytes, "usable_bytes_per_gpu": mem.usable_bytes,
                "kv_budget_bytes_per_gpu": mem.kv_budget_bytes, "kv_bytes_per_token": mem.kv_bytes_per_token,
                "kv_bytes_per_token_per_gpu": mem.kv_bytes_per_token_gpu,
                "kv_capacity_tokens": mem.kv_capacity_tokens * lay.replicas,
                "max_concurrency": mem.kv_capacity_tokens // w.tokens_per_request * lay.replicas,
            },
            "deployment": {
                "gpu": gpu.name, "gpu_display_name": gpu.display_name, "num_gpus": lay.num_gpus,
                "nodes": lay.nodes, "gpus_per_node": lay.gpus_per_node, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep,
                "dp_attention": lay.dp_attention, "replicas": lay.replicas, "layout": lay.describe(),
                "gpu_memory_bytes": gpu.memory_bytes, "fp8_compute": gpu.fp8_compute,
                "searched_catalog": self.searched_catalog, "engine": s.engine,
            },
            "performance": {
                "ttft_s": perf.ttft_s, "prefill_s": perf.prefill_s, "tpot_s": perf.tpot_s,
                "output_tokens_per_s": perf.output_tokens_per_s,
                "output_tokens_per_s_per_gpu": perf.output_tokens_per_s / lay.num_gpus,
                "tokens_per_s_per_user": perf.tokens_per_s_per_user, "concurrency": perf.concurrency,
                "request_rate": perf.request_rate, "prefill_utilization": perf.prefill_utilization,
                "prefill_bound": perf.prefill.bound, "decode_bound": perf.decode.bound,
                "spec_decode": spec_decode_dict(s, c),
            },
            "cost": {"usd_per_gpu_hour": gpu.price_usd_per_hour, "usd_per_hour": c.usd_per_hour,
                     "usd_per_million_output_tokens": c.usd_per_million_output_tokens},
            "host": {
                "ram_bytes": h.ram_bytes, "disk_bytes": h.disk_bytes, "cpu_cores": h.cpu_cores,
                "load_time_s": h.load_time_s, "disk_read_bytes_per_s": h.disk_read_bytes_per_s,
                "internode_bytes_per_s": h.internode_bytes_per_s, "checkpoint_bytes": h.checkpoint_bytes,
                "per": "node",
            },
            "efficiency": asdict(s.eff),
            "notes": self.notes,
        }
        plan["launch"] = launch_commands(plan)
        if self.offload is not None:
            plan["offload"] = self.offload.to_dict()
        return plan


def build_settings(model: str = DEFAULT_MODEL, *, weights: str | None = None, group_size: int | None = None,
                   kv_cache_dtype: str = "auto", concurrency: int | None = None, request_rate: float | None = None,
                   input_len: int = DEFAULT_INPUT_LEN, output_len: int = DEFAULT_OUTPUT_LEN,
                   max_model_len: int | None = None, gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
                   slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                   gpus_per_node: int = DEFAULT_GPUS_PER_NODE, calibration: str | None = None,
                   engine: str | None = None, spec_acceptance: float | None = None,
                   num_speculative_tokens: int | None = None) -> Settings:
    spec = load_model(model)
    if concurrency is None and request_rate is None:
        concurrency = DEFAULT_CONCURRENCY
    work = Workload(input_len, output_len, concurrency, request_rate, max_model_len or input_len + output_len)
    if spec.max_position_embeddings and work.max_model_len > spec.max_position_embeddings:
        raise UsageError(f"--max-model-len {work.max_model_len} exceeds {spec.name}'s max_position_embeddings "
                         f"{spec.max_position_embeddings}")
    if not 0 < gpu_memory_utilization <= 1:
        raise UsageError("--gpu-memory-utilization must be in (0, 1]")
    if gpus_per_node < 1:
        raise UsageError("--gpus-per-node must be at least 1")
    for flag, value in (("--slo-ttft-ms", slo_ttft_ms), ("--slo-tpot-ms", slo_tpot_ms)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive")
    slo = Slo(None if slo_ttft_ms is None else slo_ttft_ms / 1e3, None if slo_tpot_ms is None else slo_tpot_ms / 1e3)
    precision = make_precision(weights, kv_cache_dtype, group_size, spec.checkpoint_weights,
                               spec.checkpoint_group_size)
    # A calibration file's "moe" section (if any) is what MoE/MLA models (DeepSeek) use; dense models its top level.
    if engine and calibration:
        raise UsageError("--engine and --calibration both set the efficiency factors; give one")
    eff = load_engine(engine).eff(spec) if engine else load_calibration(calibration, calibration_family(spec))
    return Settings(spec, precision, work, slo, eff, gpu_memory_utilization, gpus_per_node, engine,
                    requested_spec(spec, engine, spec_acceptance, num_speculative_tokens))


def make_plan(model: str = DEFAULT_MODEL, gpu: str | None = DEFAULT_GPU, *, num_gpus: int | None = None,
              tp: int | None = None, pp: int | None = None, ep: int | None = None,
              dp_attention: bool | None = None, price_file: str | None = None, gpu_file: str | None = None,
              **settings: Any) -> Plan:
    s = build_settings(model, **settings)
    catalog = Catalog.load(gpu_file, price_file)
    auto = gpu is None and s.slo.given or (gpu or "").lower() == "auto"
    gpus: list[GpuSpec] = list(catalog) if auto else [catalog.get(gpu or DEFAULT_GPU)]
    fixed = {k: v for k, v in (("tp", tp), ("pp", pp), ("ep", ep), ("dp_attention", dp_attention)) if v is not None}
    _check_fixed(s, num_gpus, fixed)
    best, scored = search(s, gpus, counts=[num_gpus] if num_gpus else None, fixed=fixed)
    if best is None:
        where = f"on {num_gpus}x " if num_gpus else "on up to a 16-node cluster of "
        what = f"of {s.model.name} {where}{'any catalog GPU' if auto else gpus[0].name}"
        suggestion = _suggest(s, gpus) if num_gpus or fixed else ""
        if not scored and num_gpus:
            per_gpu = weights_bytes_total(s.model, s.precision) / num_gpus / 1e9
            what += (f" (weights alone are {per_gpu:,.1f} GB per GPU, over the usable "
                     f"{gpus[0].memory_bytes * s.gpu_memory_utilization / 1e9:,.1f} GB)")
        require(None, scored, what, suggestion)
    assert best is not None and best.perf is not None
    return Plan(s, best, host_requirements(s.model, s.precision, best.layout, best.perf, s.workload), auto)


def _check_fixed(s: Settings, num_gpus: int | None, fixed: dict[str, Any]) -> None:
    """Reject impossible flag combinations before searching, with the rule they break."""
    if num_gpus is not None and num_gpus < 1:
        raise UsageError("--num-gpus must be at least 1")
    tp, pp = fixed.get("tp", 1), fixed.get("pp", 1)
    dp = bool(fixed.get("dp_attention"))
    if dp and not s.model.mla:
        raise UsageError(f"--dp-attention needs MLA attention; {s.model.name} uses GQA/MHA")
    if dp and "tp" not in fixed:
        return  # the search picks a TP size for the data-parallel attention group
    ep = fixed.get("ep", tp if dp else 1)
    check_layout(s.model, Layout(num_gpus or tp * pp, tp, pp, ep, dp, max(s.gpus_per_node, tp * pp)))


def _suggest(s: Settings, gpus: list[GpuSpec]) -> str:
    """What would work instead: the fewest GPUs of the same kind with a free layout."""
    best, _ = search(s, gpus)
    if best is None:
        return ""
    return f"; would fit: {best.layout.num_gpus}x {best.gpu.name} ({best.layout.describe()})"


def plan_deployment(model: str = DEFAULT_MODEL, gpu: str | None = DEFAULT_GPU, **options: Any) -> dict[str, Any]:
    """The `r1deploy plan --json` object for `model` on `gpu` (None or "auto": search the catalog)."""
    return make_plan(model, gpu, **options).to_dict()
