"""Measured points of the multi-GPU and offload runs, for `plan --validate` and `plan --calibrate` (points.py
and load_points below):
- a tensor-parallel file (benchmarks/results/h200_tp*.json, as benchmarks/h200_tp.py writes it): sections
  `tp7b` / `tp70b`, each with entries `tpN` holding `model`, `tp`, `decode_bs1_median_step_ms` (one decode step
  of one sequence, prompt 128, 256 new tokens) and `offline_out_tok_s` (`offline_requests` prompts at once,
  `offline_new_tokens` each, `offline_in_tokens` in all);
- an expert-offload file (benchmarks/results/h200_r1_offload.json, as benchmarks/h200_offload.py writes it):
  DeepSeek-R1 cut to 1 dense + `moe_layers` MoE layers on one GPU, `gpu_weight_budget_gb` of expert slots,
  every expert in pinned host memory; `offload.bsB.median_step_ms` is one decode step of B sequences.
None of these points is fitted (`fits` None): they check the factors fitted elsewhere on layouts and paths
(TP all-reduce, PCIe expert copies) the fitted points do not exercise.
`load_points` reads any committed run file, dispatching to points.py's readers or these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import Catalog
from r1deploy.plan.parallel import DEFAULT_GPUS_PER_NODE, Layout
from r1deploy.plan.points import (
    BENCH_SCHEMA,
    ENGINE_DECODE_NEW,
    ENGINE_DECODE_PROMPT,
    LAYERS_DEFAULT_MODEL,
    Point,
    _bench_points,
    _engine_points,
    _gpu,
    _layers_points,
    _number,
    _quant_points,
    _wave_points,
    decode_terms,
)
from r1deploy.plan.roofline import Efficiency, calibration_family, decode_stage, stage_cost
from r1deploy.plan.serving import Workload, predict

# All-reduce latency inside a decode CUDA graph on two H200s with torch's symmetric-memory one-shot kernel (bf16
# messages up to 1 MiB; README "Tensor parallel": 7 us, NCCL 12 us). A TP entry that names this kernel in its
# `all_reduce` field is predicted with it instead of the profile's NCCL floor.
ONE_SHOT_ALLREDUCE_S = 7e-6
# The planner's mean context of benchmarks/h200_tp.py's decode (prompt 128, 256 new tokens).
TP_DECODE_CONTEXT = ENGINE_DECODE_PROMPT + ENGINE_DECODE_NEW / 2
# benchmarks/h200_offload.py's run: 64 new tokens at batch 1, 16 at batch 32, after a 128-token prompt.
OFFLOAD_NEW_TOKENS = {1: 64, 32: 16}


def is_tp_file(data: dict[str, Any]) -> bool:
    return any(re.fullmatch(r"tp\d+b", k) and isinstance(v, dict) for k, v in data.items())


def is_offload_file(data: dict[str, Any]) -> bool:
    return isinstance(data.get("offload"), dict) and isinstance(data.get("moe_layers"), int)


def tp_points(path: str, data: dict[str, Any], catalog: Catalog, gpu_flag: str | None,
              options: dict[str, Any]) -> list[Point]:
    from r1deploy.plan.memory import plan_memory
    from r1deploy.plan.planner import build_settings

    gpus = data.get("gpus") or []
    if not gpu_flag and not gpus:
        raise UsageError(f"{path}: no 'gpus'; pass --gpu NAME")
    gpu = _gpu(catalog, str(gpu_flag or gpus[0]))
    points: list[Point] = []
    for section, entries in sorted(data.items()):
        if not (re.fullmatch(r"tp\d+b", section) and isinstance(entries, dict)):
            continue
        for label, entry in sorted(entries.items()):
            if not (re.fullmatch(r"tp\d+", label) and isinstance(entry, dict) and entry.get("model")):
                continue
            where = f"{path} [{section}.{label}]"
            tp = entry.get("tp")
            if not isinstance(tp, int) or tp < 1:
                raise UsageError(f"{where}: 'tp' must be a positive integer")
            s = build_settings(str(entry["model"]), input_len=ENGINE_DECODE_PROMPT, output_len=ENGINE_DECODE_NEW,
                               concurrency=1, calibration=options.get("calibration"))
            layout = Layout(tp, tp, 1, 1, False, DEFAULT_GPUS_PER_NODE)
            if not plan_memory(s.model, s.precision, layout, gpu, 0.9).fits:
                raise UsageError(f"{where}: {s.model.name} does not fit {tp}x {gpu.name} in the planner's memory model")
            cost = stage_cost(s.model, s.precision, layout, gpu, s.eff)
            one_shot = "one-shot" in str(entry.get("all_reduce") or "")

            def run_eff(eff: Efficiency, one_shot: bool = one_shot) -> Efficiency:
                return replace(eff, intranode_latency_s=ONE_SHOT_ALLREDUCE_S) if one_shot else eff

            common = {"source": Path(path).name, "model": f"{s.model.name} TP{tp}" + (" one-shot AR" if one_shot else ""),
                      "family": calibration_family(s.model), "fits": None}
            step = _number(entry, "decode_bs1_median_step_ms", where)
            if step is not None:
                points.append(Point(**common, workload=f"decode batch 1, prompt {ENGINE_DECODE_PROMPT}/"
                                    f"{ENGINE_DECODE_NEW} new, {tp}x {gpu.name}", metric="TPOT ms", measured=step,
                                    explain=lambda eff, c=cost, r=run_eff: decode_terms(c, 1, TP_DECODE_CONTEXT)(r(eff)),
                                    predict=lambda eff, c=cost, r=run_eff: (
                                        decode_stage(replace(c, eff=r(eff)), 1, TP_DECODE_CONTEXT).total_s + eff.step_overhead_s) * 1e3))
            offline = _number(entry, "offline_out_tok_s", where)
            requests, new = entry.get("offline_requests"), entry.get("offline_new_tokens")
            in_tokens = _number(entry, "offline_in_tokens", where)
            if offline is not None and isinstance(requests, int) and isinstance(new, int) and in_tokens:
                prompt = max(1, round(in_tokens / requests))
                work = Workload(prompt, new, requests, None, prompt + new)
                points.append(Point(**common, workload=f"offline {requests} req, ~{prompt}/{new} tok, {tp}x {gpu.name}",
                                    metric="output tok/s", measured=offline,
                                    predict=lambda eff, c=cost, w=work, r=run_eff: predict(
                                        replace(c, eff=r(eff)), w).output_tokens_per_s))
    return points


def offload_points(path: str, data: dict[str, Any], catalog: Catalog, gpu_flag: str | None,
                   options: dict[str, Any]) -> list[Point]:
    """The expert-offload decode steps against plan_offload with the engine's default miss path (copy)."""
    from r1deploy.plan.model_spec import load_model
    from r1deploy.plan.offload import plan_offload
    from r1deploy.plan.planner import build_settings

    gpu = _gpu(catalog, str(gpu_flag or data.get("gpu") or ""))
    budget = _number(data, "gpu_weight_budget_gb", path)
    if budget is None:
        raise UsageError(f"{path}: no 'gpu_weight_budget_gb'")
    moe_layers, prompt = data["moe_layers"], int(data.get("prompt_len") or ENGINE_DECODE_PROMPT)
    model = load_model(LAYERS_DEFAULT_MODEL, {"num_hidden_layers": 1 + moe_layers, "first_k_dense_replace": 1,
                                              "num_nextn_predict_layers": 0})
    weights = "fp8" if data.get("fp8_weights", True) else "bf16"
    points: list[Point] = []
    for key, entry in sorted((data.get("offload") or {}).items()):
        m = re.fullmatch(r"bs(\d+)", key)
        if not m or not isinstance(entry, dict):
            continue
        batch = int(m.group(1))
        step = _number(entry, "median_step_ms", f"{path} [offload.{key}]")
        if step is None:
            continue
        new = int(entry.get("new_tokens") or OFFLOAD_NEW_TOKENS.get(batch, ENGINE_DECODE_NEW))
        base = build_settings(LAYERS_DEFAULT_MODEL, weights=weights, concurrency=batch, input_len=prompt,
                              output_len=new, calibration=options.get("calibration"))

        def step_ms(eff: Efficiency, base: Any = base) -> float:
            s = replace(base, model=model, eff=eff)
            return plan_offload(s, gpu, budget).step_s * 1e3

        points.append(Point(Path(path).name, f"{model.name} 1d+{moe_layers}m offload", f"decode batch {batch}, "
                            f"{budget:.0f} GB of expert slots, experts over PCIe", "TPOT ms", step, None, step_ms,
                            calibration_family(model)))
    return points


def load_points(paths: Sequence[str], gpu: str | None = None, **options: Any) -> list[Point]:
    catalog = Catalog.load(options.get("gpu_file"), None)
    points: list[Point] = []
    for path in paths:
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except FileNotFoundError:
            raise UsageError(f"--calibrate {path}: no such file") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--calibrate {path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--calibrate {path}: expected a JSON object")
        if "schema" in data or "summary" in data:
            found = _bench_points(path, data, catalog, gpu, options)
        elif isinstance(data.get("awq"), dict):  # before the engine file: it has a top-level 'shape' too
            found = _quant_points(path, data, catalog, gpu, options)
        elif isinstance(data.get("shape"), str):
            found = _engine_points(path, data, "", catalog, gpu, options)
        elif isinstance(data.get("models"), list):
            found = _layers_points(path, data, catalog, gpu, options)
        elif isinstance(data.get("decode"), list) and "tp" in data:
            found = _wave_points(path, data, catalog, gpu, options)
        elif is_tp_file(data):
            found = tp_points(path, data, catalog, gpu, options)
        elif is_offload_file(data):
            found = offload_points(path, data, catalog, gpu, options)
        else:
            found = []
            for label, entry in data.items():
                if isinstance(entry, dict) and isinstance(entry.get("shape"), str) and any(
                        re.fullmatch(r"ttft_\d+_ms|decode_bs\d+_median_step_ms|offline_out_tok_s", k) for k in entry):
                    found += _engine_points(path, entry, label, catalog, gpu, options)
            if not found:
                raise UsageError(f"--calibrate {path}: neither a bench report (schema {BENCH_SCHEMA}) nor an engine "
                                 "benchmark file (entries with 'shape' and ttft_N_ms / decode_bsN_median_step_ms) "
                                 "nor a reduced-depth DeepSeek file (a 'models' list) nor an AWQ file (an 'awq' "
                                 "object) nor a full-model run (a 'decode' list and 'tp')")
        if not found:
            raise UsageError(f"--calibrate {path}: no measured TTFT, TPOT or throughput in it")
        points += found
    return points
