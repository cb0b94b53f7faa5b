"""Measured points for `plan --calibrate` and `plan --validate`: each measured number beside a function
that predicts it from efficiency factors, read from the benchmarks' result files.

Four inputs are read:
- a bench run report (schema r1deploy-bench/1): the model, concurrency and lengths come from its
  `config`, the GPU from `telemetry.gpus` (or `--gpu`); the planner's chosen deployment for that
  workload predicts p99 TTFT, TPOT and output tokens/s, compared with the measured p99 TTFT, median
  TPOT and output throughput;
- an engine benchmark file (benchmarks/results/h200_dense.json, or one entry of it as
  benchmarks/h200_dense.py writes it): per entry with a `shape`, one GPU, `ttft_N_ms` (a prompt of N
  tokens alone: the prefill time), `decode_bsB_median_step_ms` (B sequences, prompt 128, 256 new
  tokens: one decode step) and `offline_out_tok_s` (256 requests at once, 512 new tokens; shown, not
  fitted);
- a reduced-depth DeepSeek file (benchmarks/results/h200_r1_layers.json, as benchmarks/h200_deepseek.py
  writes it): a `models` list, each with `dense_layers` / `moe_layers` (the same model at that depth,
  model_spec.layer_overrides), `decode_bsB_step_ms` (CUDA-graph replay of one decode step of B sequences,
  every one at `context` tokens, 1024 unless the file says) and `prefill_N_ms` (one N-token prompt);
  the model is the file's `model` (default deepseek-r1), on one GPU, with the checkpoint's weights
  (FP8 for R1) unless an entry's `weights` starts with "bf16";
- an AWQ file (benchmarks/results/h200_quant_awq.json, as benchmarks/h200_quant.py writes it): the model
  `shape` on one GPU in bf16 and AWQ INT4; its `awq` object holds `{bf16,awq}_decode_bs1_median_step_ms`
  (one decode step) and `{bf16,awq}_decode_bsB_out_tok_s` (B prompts at once, prompt 128, 256 new tokens,
  at most QUANT_MAX_NUM_SEQS running: waves of prefill then decode).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import Catalog, GpuSpec
from r1deploy.plan.memory import plan_memory
from r1deploy.plan.parallel import DEFAULT_GPUS_PER_NODE, Layout
from r1deploy.plan.roofline import (
    Efficiency,
    StageCost,
    calibration_family,
    decode_stage,
    prefill_stage,
    stage_cost,
)
from r1deploy.plan.serving import Performance, Workload, predict

BENCH_SCHEMA = "r1deploy-bench/1"
# benchmarks/h200_dense.py's workloads.
ENGINE_DECODE_PROMPT, ENGINE_DECODE_NEW = 128, 256
ENGINE_OFFLINE_REQUESTS, ENGINE_OFFLINE_NEW = 256, 512
# benchmarks/h200_quant.py's AWQ engine runs at most this many sequences at once (EngineConfig max_num_seqs,
# recorded as awq.engine_max_num_seqs by later versions of the script): its "batch 16" runs as two waves of 8.
QUANT_MAX_NUM_SEQS = 8
# bench's defaults when its config leaves them unset (r1deploy/bench/benchmark.py).
BENCH_DEFAULT_BATCH, BENCH_DEFAULT_OUTPUT_LEN = 8, 128
# benchmarks/h200_deepseek.py's defaults.
LAYERS_DEFAULT_MODEL, LAYERS_DEFAULT_CONTEXT = "deepseek-r1", 1024


@dataclass(frozen=True)
class Point:
    """One measured number and how the planner predicts it for given efficiency factors."""

    source: str
    model: str
    workload: str
    metric: str  # "TTFT ms", "TPOT ms", "output tok/s"
    measured: float
    fits: str | None  # "prefill", "decode", an INT4 factor (FITTED_INT4) or None (shown only)
    predict: Callable[[Efficiency], float]
    family: str = "dense"  # calibration family of the model (roofline.calibration_family)
    # The predicted step's terms in ms (StepTime.terms plus the per-step overhead), where the point is a step.
    explain: Callable[[Efficiency], dict[str, float]] | None = None



def decode_terms(cost: StageCost, batch: float, context: float) -> Callable[[Efficiency], dict[str, float]]:
    """The terms of one decode step of `cost` at `batch` sequences (for Point.explain)."""
    return lambda eff: {**decode_stage(replace(cost, eff=eff), batch, context).terms(),
                        "step_overhead_ms": eff.step_overhead_s * 1e3}


def error_pct(planned: float, measured: float) -> float:
    return 100.0 * (planned - measured) / measured


def _gpu(catalog: Catalog, name: str) -> GpuSpec:
    """A catalog GPU from an NVML/torch name ('NVIDIA H200', 'NVIDIA H100 80GB HBM3') or a catalog name."""
    for candidate in (name, name.removeprefix("NVIDIA "), name.removeprefix("NVIDIA ").replace(" ", "-")):
        try:
            return catalog.get(candidate)
        except UsageError:
            continue
    lower = name.lower()
    names = sorted({n for n in catalog.gpus} | {a for g in catalog for a in g.aliases}, key=len, reverse=True)
    for n in names:
        if re.search(rf"(?<![a-z0-9]){re.escape(n)}(?![a-z0-9])", lower):
            return catalog.get(n)
    raise UsageError(f"GPU {name!r} is not in the planner's catalog; pass --gpu NAME (known: "
                     f"{', '.join(catalog.gpus)})")


def _number(entry: dict[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise UsageError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _one_gpu_cost(where: str, entry: dict[str, Any], catalog: Catalog, gpu_flag: str | None,
                  options: dict[str, Any]) -> StageCost:
    """The planner's cost of the engine benchmark's model (`shape`) on one GPU; `options` as the CLI's."""
    from r1deploy.plan.planner import build_settings

    shape = entry.get("shape")
    if not isinstance(shape, str) or not shape:
        raise UsageError(f"{where}: no 'shape' (the model the engine ran)")
    gpu_name = gpu_flag or entry.get("gpu")
    if not gpu_name:
        raise UsageError(f"{where}: no 'gpu'; pass --gpu NAME")
    gpu = _gpu(catalog, str(gpu_name))
    s = build_settings(shape, input_len=ENGINE_DECODE_PROMPT, output_len=ENGINE_DECODE_NEW, concurrency=1,
                       **{k: v for k, v in options.items() if k in ("weights", "group_size", "kv_cache_dtype",
                                                                     "calibration")})
    layout = Layout(1, 1, 1, 1, False, DEFAULT_GPUS_PER_NODE)  # the engine benchmarks run on one GPU
    mem = plan_memory(s.model, s.precision, layout, gpu, options.get("gpu_memory_utilization", 0.9))
    if not mem.fits:
        raise UsageError(f"{where}: {s.model.name} does not fit on one {gpu.name} in the planner's memory model")
    return stage_cost(s.model, s.precision, layout, gpu, s.eff)


def _engine_points(path: str, entry: dict[str, Any], label: str, catalog: Catalog, gpu_flag: str | None,
                   options: dict[str, Any]) -> list[Point]:
    where = f"{path} [{label}]" if label else path
    cost = _one_gpu_cost(where, entry, catalog, gpu_flag, options)

    def at(eff: Efficiency) -> StageCost:
        return replace(cost, eff=eff)

    points: list[Point] = []
    common = {"source": Path(path).name, "model": cost.model.name, "family": calibration_family(cost.model)}
    for key in sorted(entry):
        m = re.fullmatch(r"ttft_(\d+)_ms", key)
        if m:
            n = int(m.group(1))
            value = _number(entry, key, where)
            if value is not None:
                points.append(Point(**common, workload=f"prefill {n} tok, batch 1", metric="TTFT ms",
                                    measured=value, fits="prefill",
                                    predict=lambda eff, n=n: prefill_stage(at(eff), n).total_s * 1e3))
    ctx = ENGINE_DECODE_PROMPT + ENGINE_DECODE_NEW / 2  # the planner's mean context
    decode = sorted((int(m.group(1)), key) for key in entry
                    if (m := re.fullmatch(r"decode_bs(\d+)_median_step_ms", key)))
    for batch, key in decode:
        value = _number(entry, key, where)
        if value is not None:
            points.append(Point(
                **common, workload=f"decode batch {batch}, prompt {ENGINE_DECODE_PROMPT}/{ENGINE_DECODE_NEW} new",
                metric="TPOT ms", measured=value, fits="decode", explain=decode_terms(cost, batch, ctx),
                predict=lambda eff, b=batch: (decode_stage(at(eff), b, ctx).total_s + eff.step_overhead_s) * 1e3))
    offline = _number(entry, "offline_out_tok_s", where)
    if offline is not None:
        in_tokens = _number(entry, "offline_in_tokens", where)
        prompt = max(1, round(in_tokens / ENGINE_OFFLINE_REQUESTS)) if in_tokens else 562
        work = Workload(prompt, ENGINE_OFFLINE_NEW, ENGINE_OFFLINE_REQUESTS, None, prompt + ENGINE_OFFLINE_NEW)
        points.append(Point(
            **common, workload=f"offline {ENGINE_OFFLINE_REQUESTS} req, ~{prompt}/{ENGINE_OFFLINE_NEW} tok",
            metric="output tok/s", measured=offline, fits=None,
            predict=lambda eff: predict(at(eff), work).output_tokens_per_s))
    return points


def _quant_points(path: str, data: dict[str, Any], catalog: Catalog, gpu_flag: str | None,
                  options: dict[str, Any]) -> list[Point]:
    """benchmarks/h200_quant.py's AWQ result: the same model (`shape`) in bf16 and AWQ INT4 on one GPU. Batch-1
    TPOTs fit memory_bandwidth and step_overhead_s (bf16) and int4_read (AWQ); batch-B output tokens/s (B
    prompts at once) fit int4_multirow (AWQ) and are shown for bf16."""
    awq, sizes = data["awq"], data.get("sizes") or {}
    prompt, new = sizes.get("prompt", ENGINE_DECODE_PROMPT), sizes.get("new", ENGINE_DECODE_NEW)
    ctx = prompt + new / 2  # the planner's mean context
    points: list[Point] = []
    for label, fits_tpot, fits_tput in (("bf16", "decode", None), ("awq", "int4_read", "int4_multirow")):
        where = f"{path} [awq.{label}_*]"
        weights = {"weights": label, "group_size": awq.get("group_size") if label == "awq" else None}
        cost = _one_gpu_cost(where, data, catalog, gpu_flag, {**options, **weights})
        common = {"source": Path(path).name, "model": f"{cost.model.name} {label}",
                  "family": calibration_family(cost.model)}

        def step_s(eff: Efficiency, rows: int, cost: StageCost = cost) -> float:
            return decode_stage(replace(cost, eff=eff), rows, ctx).total_s + eff.step_overhead_s

        tpot = _number(awq, f"{label}_decode_bs1_median_step_ms", where)
        if tpot is not None:
            points.append(Point(**common, workload=f"decode batch 1, prompt {prompt}/{new} new", metric="TPOT ms",
                                measured=tpot, fits=fits_tpot, predict=lambda eff, f=step_s: f(eff, 1) * 1e3))
        for batch, key in sorted((int(m.group(1)), key) for key in awq
                                 if (m := re.fullmatch(rf"{label}_decode_bs(\d+)_out_tok_s", key))):
            value = _number(awq, key, where)
            if value is None:
                continue
            # The engine admits QUANT_MAX_NUM_SEQS at a time: waves of `rows` prompts, each prefilled
            # together (one prefill of rows x prompt tokens) and then decoded `new` steps.
            rows = min(batch, int(awq.get("engine_max_num_seqs", QUANT_MAX_NUM_SEQS)))
            waves = math.ceil(batch / rows)

            def tput(eff: Efficiency, batch: int = batch, rows: int = rows, waves: int = waves,
                     cost: StageCost = cost, step_s: Callable[[Efficiency, int], float] = step_s) -> float:
                wave_s = prefill_stage(replace(cost, eff=eff), rows * prompt).total_s + new * step_s(eff, rows)
                return batch * new / (waves * wave_s)

            points.append(Point(**common, workload=f"{batch} prompts at once, {prompt}/{new} new, "
                                                   f"{rows} running", metric="output tok/s",
                                measured=value, fits=fits_tput, predict=tput))
    return points


def _layers_points(path: str, data: dict[str, Any], catalog: Catalog, gpu_flag: str | None,
                   options: dict[str, Any]) -> list[Point]:
    """benchmarks/h200_deepseek.py's result: reduced-depth models of one DeepSeek model on one GPU."""
    from r1deploy.plan.model_spec import layer_overrides, load_model
    from r1deploy.plan.precision import make_precision

    gpu_name = gpu_flag or data.get("gpu")
    if not gpu_name:
        raise UsageError(f"{path}: no 'gpu'; pass --gpu NAME")
    gpu = _gpu(catalog, str(gpu_name))
    model = str(data.get("model") or LAYERS_DEFAULT_MODEL)
    points: list[Point] = []
    for i, entry in enumerate(data["models"]):
        where = f"{path} [models[{i}]]"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected an object")
        dense, moe = entry.get("dense_layers"), entry.get("moe_layers")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (dense, moe)):
            raise UsageError(f"{where}: dense_layers and moe_layers must be integers >= 0")
        context = entry.get("context", data.get("context", LAYERS_DEFAULT_CONTEXT))
        if not isinstance(context, int) or isinstance(context, bool) or context < 1:
            raise UsageError(f"{where}: context must be a positive integer")
        spec = load_model(model, layer_overrides(dense, moe))
        weights = options.get("weights") or ("bf16" if str(entry.get("weights", "")).startswith("bf16") else None)
        precision = make_precision(weights, options.get("kv_cache_dtype", "auto"), options.get("group_size"),
                                   spec.checkpoint_weights, spec.checkpoint_group_size)
        layout = Layout(1, 1, 1, 1, False, DEFAULT_GPUS_PER_NODE)
        cost = stage_cost(spec, precision, layout, gpu, Efficiency())
        common = {"source": Path(path).name, "model": f"{spec.name} {dense}d+{moe}m",
                  "family": calibration_family(spec)}

        def at(eff: Efficiency, cost: StageCost = cost) -> StageCost:
            return replace(cost, eff=eff)

        for key in sorted(entry, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]):
            if m := re.fullmatch(r"prefill_(\d+)_ms", key):
                n = int(m.group(1))
                value = _number(entry, key, where)
                if value is not None:
                    points.append(Point(**common, workload=f"prefill {n} tok, batch 1", metric="TTFT ms",
                                        measured=value, fits="prefill",
                                        predict=lambda eff, n=n, at=at: prefill_stage(at(eff), n).total_s * 1e3))
            elif m := re.fullmatch(r"decode_bs(\d+)_step_ms", key):
                batch = int(m.group(1))
                value = _number(entry, key, where)
                if value is not None:
                    points.append(Point(
                        **common, workload=f"decode batch {batch}, context {context}", metric="TPOT ms",
                        measured=value, fits="decode", explain=decode_terms(cost, batch, context),
                        predict=lambda eff, b=batch, c=context, at=at: (
                            decode_stage(at(eff), b, c).total_s + eff.step_overhead_s) * 1e3))
    return points


def _bench_points(path: str, data: dict[str, Any], catalog: Catalog, gpu_flag: str | None,
                  options: dict[str, Any]) -> list[Point]:
    from r1deploy.plan.planner import make_plan

    if data.get("schema") != BENCH_SCHEMA:
        raise UsageError(f"{path}: schema {data.get('schema')!r} is not {BENCH_SCHEMA}")
    config, summary = data.get("config"), data.get("summary")
    if not isinstance(config, dict) or not isinstance(summary, dict):
        raise UsageError(f"{path}: a bench report needs 'config' and 'summary' objects")
    model = config.get("engine") or config.get("model")
    if not model:
        raise UsageError(f"{path}: config has no 'model' (or 'engine'): cannot tell what was measured")
    gpus = (data.get("telemetry") or {}).get("gpus") or []
    if not gpu_flag and not gpus:
        raise UsageError(f"{path}: telemetry.gpus is empty (no GPU seen); pass --gpu NAME")
    gpu = catalog.get(gpu_flag) if gpu_flag else _gpu(catalog, str(gpus[0]))
    input_len = config.get("input_len")
    if not isinstance(input_len, int) or input_len < 1:
        raise UsageError(f"{path}: config.input_len missing or not a positive integer")
    output_len = config.get("output_len") or BENCH_DEFAULT_OUTPUT_LEN
    concurrency = (config.get("batch") or config.get("concurrency") or config.get("max_concurrency")
                   or BENCH_DEFAULT_BATCH)
    measured = {
        "ttft": ("TTFT ms (p99)", _number(summary, "p99_ttft_ms", path)),
        "tpot": ("TPOT ms (median)", _number(summary, "median_tpot_ms", path)),
        "tput": ("output tok/s", _number(summary, "output_throughput", path)),
    }
    if measured["ttft"][1] is None and _number(summary, "median_ttft_ms", path) is not None:
        measured["ttft"] = ("TTFT ms (median)", _number(summary, "median_ttft_ms", path))
    if all(v is None for _, v in measured.values()):
        raise UsageError(f"{path}: summary has none of p99_ttft_ms, median_ttft_ms, median_tpot_ms, "
                         "output_throughput")
    plan_opts = {k: v for k, v in options.items() if k in ("num_gpus", "tp", "pp", "ep", "weights", "group_size",
                                                            "kv_cache_dtype", "gpu_memory_utilization",
                                                            "gpus_per_node", "gpu_file", "calibration")}
    plan = make_plan(str(model), gpu.name, input_len=input_len, output_len=int(output_len),
                     concurrency=int(concurrency), **plan_opts)
    s, chosen = plan.settings, plan.chosen
    cost = stage_cost(s.model, s.precision, chosen.layout, chosen.gpu, s.eff)
    cache: dict[Efficiency, Performance] = {}

    def perf(eff: Efficiency) -> Performance:
        if eff not in cache:
            cache[eff] = predict(replace(cost, eff=eff), s.workload)
        return cache[eff]

    desc = (f"{int(concurrency)} concurrent, {input_len}/{output_len} tok, "
            f"{chosen.layout.num_gpus}x {chosen.gpu.name} {chosen.layout.describe()}")
    getters = {"ttft": ("prefill", lambda eff: perf(eff).ttft_s * 1e3),
               "tpot": ("decode", lambda eff: perf(eff).tpot_s * 1e3),
               "tput": (None, lambda eff: perf(eff).output_tokens_per_s)}
    return [Point(Path(path).name, s.model.name, desc, metric, value, getters[key][0], getters[key][1],
                  calibration_family(s.model))
            for key, (metric, value) in measured.items() if value is not None]


def _wave_points(path: str, data: dict[str, Any], catalog: Catalog, gpu_flag: str | None,
                 options: dict[str, Any]) -> list[Point]:
    """benchmarks/h200_r1_full.py's result: DeepSeek (its `model` config keys over deepseek-r1, e.g. cut to 17
    layers) on `num_gpus` GPUs at TP `tp` (EP = TP), one wave per `decode` entry: `concurrency` prompts sent at
    once, each `input_len` in / `output_len` out. A wave is not a steady state: every prompt is prefilled
    first (one after another, the last waits for all), then all decode together; so the wave lasts
    c x prefill + output_len x step(c), the mean TTFT is (c + 1) / 2 prefills, and the mean TPOT is the rest of
    the wave over output_len - 1 tokens (a steady-state queue model would be optimistic here). The engine
    really prefills whole prompts in chunks of its step's token budget, mixed with decode steps; a chunked
    model fitted these runs worse (docs/benchmarks.md)."""
    from r1deploy.plan.model_spec import load_model
    from r1deploy.plan.precision import make_precision

    gpu_name = gpu_flag or data.get("gpu")
    if not gpu_name:
        raise UsageError(f"{path}: no 'gpu'; pass --gpu NAME")
    gpu = _gpu(catalog, str(gpu_name))
    tp = data.get("tp")
    if not isinstance(tp, int) or tp < 1:
        raise UsageError(f"{path}: 'tp' must be a positive integer")
    overrides = {k: v for k, v in (data.get("model") or {}).items() if k in ("num_hidden_layers", "first_k_dense_replace")}
    spec = load_model(str(data.get("preset") or LAYERS_DEFAULT_MODEL), overrides)
    precision = make_precision(options.get("weights"), options.get("kv_cache_dtype", "auto"), options.get("group_size"),
                               spec.checkpoint_weights, spec.checkpoint_group_size)
    layout = Layout(tp, tp, 1, tp, bool(data.get("dp_attention")), DEFAULT_GPUS_PER_NODE)
    cost = stage_cost(spec, precision, layout, gpu, Efficiency())
    name = f"{spec.name} {spec.num_dense_layers}d+{spec.num_moe_layers}m"
    points: list[Point] = []
    for i, entry in enumerate(data.get("decode") or []):
        where = f"{path} [decode[{i}]]"
        c, n_in, n_out = (entry.get(k) for k in ("concurrency", "input_len", "output_len"))
        if not all(isinstance(v, int) and v >= 1 for v in (c, n_in, n_out)) or n_out < 2:
            raise UsageError(f"{where}: concurrency, input_len and output_len must be positive integers")

        def wave(eff: Efficiency, c: int = c, n_in: int = n_in, n_out: int = n_out) -> tuple[float, float, float]:
            """(whole wave, mean TTFT, mean TPOT) in seconds."""
            at = replace(cost, eff=eff)
            prefill_s = prefill_stage(at, n_in).total_s
            step_s = decode_stage(at, c, n_in + n_out / 2).total_s + eff.step_overhead_s
            wave_s, ttft_s = c * prefill_s + n_out * step_s, (c + 1) / 2 * prefill_s
            return wave_s, ttft_s, (wave_s - ttft_s) / (n_out - 1)

        desc = f"one wave of {c}, {n_in}/{n_out} tok, {layout.num_gpus}x {gpu.name} {layout.describe()}"

        def terms(eff: Efficiency, c: int = c, n_in: int = n_in, n_out: int = n_out) -> dict[str, float]:
            return {**decode_terms(cost, c, n_in + n_out / 2)(eff),
                    "prefill_per_prompt_ms": prefill_stage(replace(cost, eff=eff), n_in).total_s * 1e3}

        common = {"source": Path(path).name, "model": name, "workload": desc, "family": calibration_family(spec),
                  "explain": terms}
        ttft, tpot = _number(entry, "mean_ttft_ms", where), _number(entry, "mean_tpot_ms", where)
        tput = _number(entry, "output_tok_s", where)
        if ttft is not None:
            points.append(Point(**common, metric="TTFT ms (mean)", measured=ttft, fits=None,
                                predict=lambda eff, w=wave: w(eff)[1] * 1e3))
        if tpot is not None:
            # Only a wave of one is a clean decode measurement: in larger waves the mean TPOT takes in the steps
            # that also prefill later prompts, packed as their arrival timing allowed (not recorded): shown only.
            points.append(Point(**common, metric="TPOT ms (mean)", measured=tpot, fits="decode" if c == 1 else None,
                                predict=lambda eff, w=wave: w(eff)[2] * 1e3))
        if tput is not None:
            points.append(Point(**common, metric="output tok/s", measured=tput, fits=None,
                                predict=lambda eff, w=wave, c=c, n=n_out: c * n / w(eff)[0]))
    return points
