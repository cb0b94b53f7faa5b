"""`r1deploy plan`: argparse wiring only; the work happens in planner.py, matrix.py and report.py."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.engines import ENGINE_NAMES
from r1deploy.plan.precision import KV_DTYPES, WEIGHT_FORMATS

_PLAN_OPTIONS = ("num_gpus", "tp", "pp", "ep", "weights", "group_size", "kv_cache_dtype", "concurrency",
                 "request_rate", "input_len", "output_len", "max_model_len", "gpu_memory_utilization",
                 "slo_ttft_ms", "slo_tpot_ms", "gpus_per_node", "price_file", "gpu_file", "calibration", "engine",
                 "spec_acceptance", "num_speculative_tokens")
# Options that describe one deployment and make no sense for the fixed-band matrix.
_NOT_WITH_MATRIX = ("num_gpus", "tp", "pp", "ep", "dp_attention", "gpu", "model", "model_pos", "explain")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="size GPUs, memory, speed and cost for a DeepSeek-R1-family model",
                       description="Plan a deployment: weights, KV cache, parallelism, roofline speed, cost, host.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="preset name, config.json or model directory")
    p.add_argument("--model", help="same as MODEL (default deepseek-r1)")
    p.add_argument("--gpu", help="GPU name from the catalog, or 'auto' to search it (default h200; auto with SLOs)")
    p.add_argument("--num-gpus", type=int)
    p.add_argument("--tp", type=int, help="tensor-parallel size (must divide the attention heads)")
    p.add_argument("--pp", type=int, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, help="expert-parallel size (MoE; divides --tp)")
    p.add_argument("--dp-attention", action="store_true", default=None, help="data-parallel attention (MLA)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, help="default: the checkpoint's own (fp8 for R1/V3)")
    p.add_argument("--group-size", type=int, help="AWQ/GPTQ group size (default 128)")
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto")
    p.add_argument("--concurrency", type=int, help="requests in flight (default 64)")
    p.add_argument("--request-rate", type=float, help="requests per second (instead of --concurrency)")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, help="longest sequence to hold (default input + output)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--slo-ttft-ms", type=float, help="p99 time to first token")
    p.add_argument("--slo-tpot-ms", type=float, help="time per output token")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--price-file", help="JSON {gpu: usd_per_gpu_hour}")
    p.add_argument("--gpu-file", help="JSON {gpu: {spec}} adding or overriding catalog GPUs")
    p.add_argument("--calibration", help="JSON of efficiency factors overriding the defaults")
    p.add_argument("--engine", choices=(*ENGINE_NAMES, "roofline"),
                   help="predict this engine with its profile fitted on published or our runs (plan/engines/*.json); "
                        "roofline: datasheet peaks x default efficiencies (default: r1deploy, or --calibration's)")
    p.add_argument("--spec-acceptance", type=float, metavar="A",
                   help="speculative decoding (MTP): acceptance of the first draft token, in performance.spec_decode "
                        "(default 0.85, DeepSeek-V3's published MTP figure)")
    p.add_argument("--num-speculative-tokens", type=int, metavar="K",
                   help="speculative decoding: draft tokens per step (default the engine's MTP setting, else 1)")
    p.add_argument("--validate", action="store_true", help="planned vs every published and measured point of the "
                   "engine profiles (--engine: one), with errors")
    p.add_argument("--offload", choices=("experts", "layers"),
                   help="also plan one GPU + host memory: experts = routed experts in pinned host RAM, a GPU cache of "
                        "them; layers = decoder layers beyond the budget streamed from pinned host RAM every step")
    p.add_argument("--gpu-weight-budget", type=float, metavar="GB",
                   help="with --offload experts: GPU GB for expert slots; layers: GPU GB for all weights")
    p.add_argument("--host-bandwidth-gbs", type=float, help="with --offload: host memory bandwidth (default 200)")
    p.add_argument("--pcie-gbs", type=float,
                   help="with --offload: PCIe GB/s one direction (default: catalog / 2; for expert copies x 0.63, "
                        "as measured on an H200)")
    p.add_argument("--cpu-compute", choices=("never", "always", "auto"),
                   help="with --offload experts: how the engine serves a missed expert: copy it in (never, the "
                        "engine's default), compute it on the host (always), or the cheaper (auto)")
    p.add_argument("--host-tflops", type=float, help="with --offload: host matmul TFLOPS (default 2)")
    p.add_argument("--prefetch-overlap", type=float,
                   help="with --offload: fraction of miss time hidden behind GPU work, 0-1 (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--explain", action="store_true", help="show every formula with its numbers")
    p.add_argument("--matrix", action="store_true", help="hardware selection matrix for the size bands")
    p.add_argument("--calibrate", nargs="+", metavar="RUN.json",
                   help="fit the efficiency factors to measured runs (bench reports or engine benchmark files)")
    p.add_argument("--calibration-out", metavar="FILE.json",
                   help="with --calibrate: write the fitted factors here (default: print them)")
    from r1deploy.deploy.cli import add_emit_arguments

    add_emit_arguments(p)
    p.set_defaults(func=run)


_OFFLOAD_OPTIONS = ("gpu_weight_budget", "host_bandwidth_gbs", "pcie_gbs", "host_tflops", "prefetch_overlap",
                    "cpu_compute")


def _with_offload(plan: Any, args: argparse.Namespace) -> Any:
    """The main plan plus `offload`: one GPU of the asked kind (the chosen kind under 'auto')."""
    import dataclasses

    from r1deploy.plan.catalog import Catalog
    from r1deploy.plan.offload import plan_offload

    auto = args.gpu is None and plan.searched_catalog or (args.gpu or "").lower() == "auto"
    gpu = plan.chosen.gpu if auto else Catalog.load(args.gpu_file, args.price_file).get(args.gpu or "h200")
    extra = {k: getattr(args, k) for k in _OFFLOAD_OPTIONS[1:] if getattr(args, k) is not None}
    if args.offload == "layers":  # reported beside the plan (run() adds it), not in Plan.offload
        from r1deploy.plan.offload import plan_layer_offload

        extra.pop("cpu_compute", None)  # experts only
        offload = plan_layer_offload(plan.settings, gpu, args.gpu_weight_budget, **extra)
        if not offload.feasible:
            raise UsageError(f"no feasible layer-offload plan: {offload.problem}")
        return offload
    offload = plan_offload(plan.settings, gpu, args.gpu_weight_budget, mode=args.offload, **extra)
    if not offload.feasible:
        raise UsageError(f"no feasible expert-offload plan: {offload.problem}")
    return dataclasses.replace(plan, offload=offload)


def _model(args: argparse.Namespace) -> str:
    if args.model_pos and args.model and args.model_pos != args.model:
        raise UsageError(f"two models given: {args.model_pos!r} and --model {args.model!r}")
    return args.model_pos or args.model or "deepseek-r1"


def _clean(value: Any) -> Any:
    """JSON without NaN/Infinity (invalid JSON): non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from r1deploy.plan import report

    options = {k: getattr(args, k) for k in _PLAN_OPTIONS if getattr(args, k) is not None}
    if options.get("engine") == "roofline":  # the datasheet roofline with the named default factors
        del options["engine"]
    elif not args.calibration and not args.validate:
        options.setdefault("engine", "r1deploy")  # our engine, fitted on our committed runs
    console = Console(soft_wrap=False, width=max(Console().width, 160 if args.matrix or args.calibrate else 120))
    if args.calibration_out and not args.calibrate:
        raise UsageError("--calibration-out needs --calibrate RUN.json")
    offload_flags = [k for k in _OFFLOAD_OPTIONS if getattr(args, k) is not None]
    if offload_flags and not args.offload:
        raise UsageError(f"--{offload_flags[0].replace('_', '-')} needs --offload experts")
    if args.offload and args.gpu_weight_budget is None:
        raise UsageError(f"--offload {args.offload} needs --gpu-weight-budget GB")
    expert_only = [k for k in _OFFLOAD_OPTIONS[1:] if k != "pcie_gbs" and getattr(args, k) is not None]
    if args.offload == "layers" and expert_only:
        raise UsageError(f"--{expert_only[0].replace('_', '-')} applies to --offload experts only")
    if args.offload and (args.matrix or args.calibrate):
        raise UsageError("--offload plans one deployment; drop --matrix/--calibrate")
    if args.emit and (args.matrix or args.calibrate or args.validate):
        raise UsageError("--emit writes files for one deployment; drop --matrix/--calibrate/--validate")
    if args.validate:
        from r1deploy.plan.validate import run_validate

        return run_validate(args.engine, args.json, console, args.gpu_file, args.explain)
    if args.calibrate:
        if args.matrix or args.explain:
            raise UsageError("--calibrate is its own output; drop --matrix/--explain")
        from r1deploy.plan.calibrate import run_calibrate

        return run_calibrate(args.calibrate, args.calibration_out, args.json, console, args.gpu, **options)
    if args.matrix:
        given = [k for k in _NOT_WITH_MATRIX if getattr(args, k) not in (None, False)]
        if given:
            flags = ", ".join("MODEL" if k == "model_pos" else "--" + k.replace("_", "-") for k in given)
            raise UsageError(f"--matrix covers fixed model bands and picks the GPUs itself; drop {flags}")
        from r1deploy.plan.matrix import build_matrix, row_dict

        rows = build_matrix(**options)
        if args.json:
            print(json.dumps(_clean({"matrix": [row_dict(r) for r in rows]}), indent=2))
        else:
            report.render_matrix(rows, console)
        return 0
    if args.json and args.explain:
        raise UsageError("--json and --explain are separate outputs; pick one")
    from r1deploy.plan.planner import make_plan

    plan = make_plan(_model(args), args.gpu, dp_attention=args.dp_attention, **options)
    layers = None  # --offload layers: a LayerOffloadPlan printed after the main plan
    if args.offload == "layers":
        layers = _with_offload(plan, args)
    elif args.offload:
        plan = _with_offload(plan, args)
    if args.emit:
        from r1deploy.deploy.cli import emit_files

        if args.offload or args.json or args.explain:
            raise UsageError("--emit writes files for the plan's GPU layout; drop --offload/--json/--explain")
        return emit_files(plan.to_dict(), args)
    if args.json:
        d = plan.to_dict() | ({"offload": layers.to_dict()} if layers is not None else {})
        sys.stdout.write(json.dumps(_clean(d), indent=2) + "\n")
        return 0
    if args.explain:
        report.render_explain(plan, console)
    else:
        report.render_plan(plan, console)
    if layers is not None:
        from r1deploy.plan.offload import layer_offload_rows

        title = f"Layer offload (1x {layers.gpu} + host memory, {layers.concurrency} concurrent)"
        console.print(report._table(title, layer_offload_rows(layers.to_dict())))
    return 0
