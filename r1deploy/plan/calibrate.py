"""`r1deploy plan --calibrate RUN.json ...`: fit the roofline's efficiency factors to measured runs.

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

Points are fitted per calibration family (roofline.calibration_family): dense models with the fit
below, written as the file's top-level factors; MoE/MLA models (DeepSeek) separately, written as its
"moe" section, which the planner uses for those models (`fit_moe`, below).

Fit (numerical derivatives of the planner's own predictions, so any layout works):
1. prefill_flops from the TTFT points whose prefill is compute-bound: a 1-D least squares on
   log(planned / measured) (closed form for one point: eff x planned / measured);
2. memory_bandwidth and step_overhead_s from the TPOT points whose step is bandwidth-bound:
   t = a / memory_bandwidth + overhead + rest, linear in (1 / memory_bandwidth, overhead), solved by
   least squares on relative errors; with one point, or points that cannot tell the slope from the
   intercept, only memory_bandwidth is fitted and the overhead kept.
Both are clamped to the ranges below; a clamped factor is fixed and the other refitted.
3. with AWQ points, last (they are shares of the 16-bit read rate fitted in 2): int4_read from the AWQ
   batch-1 step and int4_multirow from the AWQ multi-row throughputs, each a 1-D least squares on log error.

MoE/MLA fit (`fit_moe`): the engine's DeepSeek kernels sit far from the dense models' efficiencies and
pay a fixed latency per layer (dozens of small kernels: router, expert sort, MLA splits), so the set is
wider: prefill_flops as above (wider range); then decode_flops and memory_bandwidth by a search over a
log grid, and for each pair step_overhead_s and layer_overhead_s (linear in them) by least squares on
relative errors; embedding_read is set to 0 (the engine's lookup reads only the batch's rows).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
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
# Sane ranges for fitted factors.
PREFILL_FLOPS_RANGE = (0.1, 1.0)
MEMORY_BANDWIDTH_RANGE = (0.3, 1.0)
STEP_OVERHEAD_RANGE_S = (0.0, 0.02)
# A point informs a factor when that factor's term is at least this share of the predicted time.
MIN_SENSITIVITY = 0.3
# benchmarks/h200_dense.py's workloads.
ENGINE_DECODE_PROMPT, ENGINE_DECODE_NEW = 128, 256
ENGINE_OFFLINE_REQUESTS, ENGINE_OFFLINE_NEW = 256, 512
# benchmarks/h200_quant.py's AWQ engine runs at most this many sequences at once (EngineConfig max_num_seqs,
# recorded as awq.engine_max_num_seqs by later versions of the script): its "batch 16" runs as two waves of 8.
QUANT_MAX_NUM_SEQS = 8
# bench's defaults when its config leaves them unset (r1deploy/bench/benchmark.py).
BENCH_DEFAULT_BATCH, BENCH_DEFAULT_OUTPUT_LEN = 8, 128

FITTED = ("prefill_flops", "memory_bandwidth", "step_overhead_s")
# Fitted too when INT4 points are given (an AWQ file), each from the points whose `fits` names it.
FITTED_INT4 = ("int4_read", "int4_multirow")
INT4_RANGE = (0.1, 1.0)
# The MoE/MLA family's fitted set and ranges (fit_moe).
FITTED_MOE = ("prefill_flops", "decode_flops", "memory_bandwidth", "step_overhead_s", "layer_overhead_s")
MOE_PREFILL_FLOPS_RANGE = (0.01, 1.0)
MOE_DECODE_FLOPS_RANGE = (0.01, 1.0)
MOE_MEMORY_BANDWIDTH_RANGE = (0.1, 1.0)
LAYER_OVERHEAD_RANGE_S = (0.0, 0.005)
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


@dataclass(frozen=True)
class Fit:
    start: Efficiency
    fitted: Efficiency
    used: dict[str, int]  # factor group -> points it was fitted from
    notes: list[str]
    family: str = "dense"

    @property
    def factors(self) -> tuple[str, ...]:
        if self.family == "moe":
            return FITTED_MOE
        return FITTED + FITTED_INT4 if self.used.get("int4") else FITTED

    def calibration(self) -> dict[str, Any]:
        """The --calibration JSON: fitted factors plus any non-default starting ones."""
        default = asdict(Efficiency())
        out = {k: v for k, v in asdict(self.fitted).items() if k in self.factors or v != default[k]}
        return out


def error_pct(planned: float, measured: float) -> float:
    return 100.0 * (planned - measured) / measured


# ---------------------------------------------------------------- reading measured files

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
                metric="TPOT ms", measured=value, fits="decode",
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
                        measured=value, fits="decode",
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
                                 "object)")
        if not found:
            raise UsageError(f"--calibrate {path}: no measured TTFT, TPOT or throughput in it")
        points += found
    return points


# ---------------------------------------------------------------- fitting

def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _sensitive(p: Point, eff: Efficiency, factor: str) -> bool:
    """Share of the predicted time that scales with 1/factor (1 = wholly bound by it)."""
    base = p.predict(eff)
    bumped = p.predict(replace(eff, **{factor: getattr(eff, factor) * 1.01}))
    share = (base - bumped) / base / (1 - 1 / 1.01) if base > 0 else 0.0
    return share >= MIN_SENSITIVITY


def _fit_one(points: list[Point], eff: Efficiency, factor: str, bounds: tuple[float, float]) -> float:
    """1-D least squares on log(planned / measured) over one factor (golden section in log space; on a
    tie it moves up, out of a range where the factor does not bind yet, as int4_multirow's floor)."""
    def loss(log_p: float) -> float:
        e = replace(eff, **{factor: math.exp(log_p)})
        return sum(math.log(p.predict(e) / p.measured) ** 2 for p in points)

    lo, hi = (math.log(v) for v in bounds)
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return _clamp(math.exp((a + b) / 2), bounds)


def _fit_decode(points: list[Point], eff: Efficiency, notes: list[str]) -> tuple[float, float]:
    """(memory_bandwidth, step_overhead_s): t_i = a_i x + b_i o + c_i with x = 1 / memory_bandwidth,
    o = step_overhead_s, linearised numerically and solved by least squares on relative errors; a
    Gauss-Newton step repeated a few times (exact in one step when the steps are bandwidth-bound)."""
    x, o = 1 / eff.memory_bandwidth, eff.step_overhead_s
    x_lo, x_hi = 1 / MEMORY_BANDWIDTH_RANGE[1], 1 / MEMORY_BANDWIDTH_RANGE[0]
    intercept = True
    for _ in range(4):
        rows = []
        for p in points:
            e = replace(eff, memory_bandwidth=1 / x, step_overhead_s=o)
            t0 = p.predict(e)
            dx, do = 1e-3 * x, 1e-4
            a = (p.predict(replace(e, memory_bandwidth=1 / (x + dx))) - t0) / dx
            b = (p.predict(replace(e, step_overhead_s=o + do)) - t0) / do
            w = 1 / p.measured
            rows.append((a * w, b * w, (p.measured - (t0 - a * x - b * o)) * w))  # a x + b o = m - c
        saa = sum(r[0] ** 2 for r in rows)
        sbb = sum(r[1] ** 2 for r in rows)
        sab = sum(r[0] * r[1] for r in rows)
        say = sum(r[0] * r[2] for r in rows)
        sby = sum(r[1] * r[2] for r in rows)
        det = saa * sbb - sab ** 2
        intercept = len(rows) >= 2 and det > 1e-6 * saa * sbb
        if intercept:
            nx, no = (sbb * say - sab * sby) / det, (saa * sby - sab * say) / det
            if not x_lo <= nx <= x_hi:  # slope out of range: fix it, refit the intercept
                nx = _clamp(nx, (x_lo, x_hi))
                no = (sby - sab * nx) / sbb
            if not STEP_OVERHEAD_RANGE_S[0] <= no <= STEP_OVERHEAD_RANGE_S[1]:
                no = _clamp(no, STEP_OVERHEAD_RANGE_S)
                nx = _clamp((say - sab * no) / saa, (x_lo, x_hi))
        else:
            no, nx = o, _clamp((say - sab * o) / saa, (x_lo, x_hi))
        done = abs(nx - x) < 1e-9 * x and abs(no - o) < 1e-12
        x, o = nx, no
        if done:
            break
    if not intercept:
        notes.append("step_overhead_s kept: one decode point (or points that share a slope) cannot separate "
                     "bandwidth from per-step overhead; measure several batch sizes or models")
    return 1 / x, o


def fit(points: list[Point], start: Efficiency) -> Fit:
    notes: list[str] = []
    eff = start
    prefill: list[Point] = []
    decode: list[Point] = []
    for round_ in range(2):  # prefill depends a little on bandwidth and TPOT on prefill (queueing): twice
        prefill = [p for p in points if p.fits == "prefill" and _sensitive(p, eff, "prefill_flops")]
        if prefill:
            eff = replace(eff, prefill_flops=_fit_one(prefill, eff, "prefill_flops", PREFILL_FLOPS_RANGE))
        decode = [p for p in points if p.fits == "decode" and _sensitive(p, eff, "memory_bandwidth")]
        if decode:
            bw, overhead = _fit_decode(decode, eff, notes if round_ == 1 else [])
            eff = replace(eff, memory_bandwidth=bw, step_overhead_s=overhead)
    if not prefill:
        notes.append("prefill_flops kept: no compute-bound TTFT point")
    if not decode:
        notes.append("memory_bandwidth and step_overhead_s kept: no bandwidth-bound TPOT point")
    eff = replace(eff, prefill_flops=round(eff.prefill_flops, 3), memory_bandwidth=round(eff.memory_bandwidth, 3),
                  step_overhead_s=round(eff.step_overhead_s, 6))
    # INT4 factors last: they are shares of the 16-bit read rate the bf16 points fitted above.
    int4 = [p for p in points if p.fits in FITTED_INT4]
    for factor in FITTED_INT4:
        group = [p for p in int4 if p.fits == factor]
        if group:
            eff = replace(eff, **{factor: round(_fit_one(group, eff, factor, INT4_RANGE), 3)})
    bounds = {"prefill_flops": PREFILL_FLOPS_RANGE, "memory_bandwidth": MEMORY_BANDWIDTH_RANGE,
              "step_overhead_s": STEP_OVERHEAD_RANGE_S, "int4_read": INT4_RANGE}
    for name, (lo, hi) in bounds.items():
        value = getattr(eff, name)
        if value != getattr(start, name) and (math.isclose(value, lo) or math.isclose(value, hi)):
            notes.append(f"{name} clamped to {value:g} (range {lo:g}-{hi:g}): the planner's model does not "
                         "explain these measurements well")
    if eff.int4_multirow != start.int4_multirow and math.isclose(eff.int4_multirow, INT4_RANGE[1]):
        notes.append("int4_multirow at its cap 1: INT4 beyond one token row is no faster than bf16 here")
    used = {"prefill": len(prefill), "decode": len(decode)}
    return Fit(start, eff, {**used, "int4": len(int4)} if int4 else used, notes)


def _log_grid(bounds: tuple[float, float], n: int) -> list[float]:
    lo, hi = (math.log(v) for v in bounds)
    return [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def _fit_fixed(points: list[Point], base: list[float], per_layer: list[float]) -> tuple[float, float, float]:
    """(step_overhead_s, layer_overhead_s, loss) minimising sum(((base + o + L l) / measured - 1)^2) within
    their ranges; base and per_layer (L, layers per step) in ms, o and l in seconds."""
    rows = [(1e3 / p.measured, lay * 1e3 / p.measured, 1 - b / p.measured) for p, b, lay in zip(points, base, per_layer)]

    def loss(o: float, l_: float) -> float:
        return sum((a * o + c * l_ - y) ** 2 for a, c, y in rows)

    def best_one(fixed: float, which: int, bounds: tuple[float, float]) -> float:
        # minimise over the free variable with the other fixed
        num = sum((y - (a * fixed if which == 0 else c * fixed)) * (c if which == 0 else a) for a, c, y in rows)
        den = sum((c if which == 0 else a) ** 2 for a, c, y in rows)
        return _clamp(num / den if den > 0 else bounds[0], bounds)

    saa = sum(a * a for a, _, _ in rows)
    scc = sum(c * c for _, c, _ in rows)
    sac = sum(a * c for a, c, _ in rows)
    say = sum(a * y for a, _, y in rows)
    scy = sum(c * y for _, c, y in rows)
    det = saa * scc - sac ** 2
    candidates = []
    if det > 1e-9 * saa * scc:
        o, l_ = (scc * say - sac * scy) / det, (saa * scy - sac * say) / det
        if STEP_OVERHEAD_RANGE_S[0] <= o <= STEP_OVERHEAD_RANGE_S[1] and \
                LAYER_OVERHEAD_RANGE_S[0] <= l_ <= LAYER_OVERHEAD_RANGE_S[1]:
            candidates.append((o, l_))
    for o in STEP_OVERHEAD_RANGE_S:
        candidates.append((o, best_one(o, 0, LAYER_OVERHEAD_RANGE_S)))
    for l_ in LAYER_OVERHEAD_RANGE_S:
        candidates.append((best_one(l_, 1, STEP_OVERHEAD_RANGE_S), l_))
    o, l_ = min(candidates, key=lambda c: loss(*c))
    return o, l_, loss(o, l_)


def _fit_moe_decode(points: list[Point], eff: Efficiency, fit_flops: bool) -> Efficiency:
    """decode_flops and memory_bandwidth on a log grid (refined twice around the best cell); for each,
    the fixed latencies in closed form."""
    zero = replace(eff, step_overhead_s=0.0, layer_overhead_s=0.0)
    per_layer = [(p.predict(replace(zero, layer_overhead_s=1e-3)) - p.predict(zero)) for p in points]  # ms per ms

    def solve(bw: float, df: float) -> tuple[float, Efficiency]:
        e = replace(zero, memory_bandwidth=bw, decode_flops=df)
        o, l_, loss = _fit_fixed(points, [p.predict(e) for p in points], per_layer)
        return loss, replace(e, step_overhead_s=o, layer_overhead_s=l_)

    bw_range, df_range = MOE_MEMORY_BANDWIDTH_RANGE, MOE_DECODE_FLOPS_RANGE if fit_flops else (eff.decode_flops,) * 2
    best = (math.inf, eff)
    for _ in range(3):
        bws, dfs = _log_grid(bw_range, 25), _log_grid(df_range, 25 if fit_flops else 1)
        best = min((solve(bw, df) for bw in bws for df in dfs), key=lambda r: r[0])
        bw, df = best[1].memory_bandwidth, best[1].decode_flops
        step_bw, step_df = (bws[1] / bws[0]) ** 2, ((dfs[1] / dfs[0]) ** 2 if fit_flops else 1.0)
        bw_range = (_clamp(bw / step_bw, MOE_MEMORY_BANDWIDTH_RANGE), _clamp(bw * step_bw, MOE_MEMORY_BANDWIDTH_RANGE))
        if fit_flops:
            df_range = (_clamp(df / step_df, MOE_DECODE_FLOPS_RANGE), _clamp(df * step_df, MOE_DECODE_FLOPS_RANGE))
    return best[1]


def fit_moe(points: list[Point], start: Efficiency) -> Fit:
    """The MoE/MLA family's fit (module docstring): prefill_flops, then decode_flops, memory_bandwidth,
    step_overhead_s and layer_overhead_s, with the embedding read as a lookup."""
    notes: list[str] = []
    eff = replace(start, embedding_read=0.0)
    prefill = [p for p in points if p.fits == "prefill"]
    decode = [p for p in points if p.fits == "decode"]
    flops = False
    for _ in range(2):
        prefill = [p for p in points if p.fits == "prefill" and _sensitive(p, eff, "prefill_flops")]
        if prefill:
            eff = replace(eff, prefill_flops=_fit_one(prefill, eff, "prefill_flops", MOE_PREFILL_FLOPS_RANGE))
        if decode:
            eff = _fit_moe_decode(decode, eff, fit_flops=True)
            flops = any(_sensitive(p, eff, "decode_flops") for p in decode)
            if not flops:  # no compute-bound step: decode_flops is not determined by these points
                eff = _fit_moe_decode(decode, replace(eff, decode_flops=start.decode_flops), fit_flops=False)
    if not prefill:
        notes.append("prefill_flops kept: no compute-bound TTFT point")
    if not decode:
        notes.append("decode factors kept: no TPOT point")
    elif not flops:
        notes.append("decode_flops kept: no decode step is compute-bound")
    eff = replace(eff, **{k: round(getattr(eff, k), 6 if k.endswith("_s") else 3) for k in FITTED_MOE})
    bounds = {"prefill_flops": MOE_PREFILL_FLOPS_RANGE, "decode_flops": MOE_DECODE_FLOPS_RANGE,
              "memory_bandwidth": MOE_MEMORY_BANDWIDTH_RANGE, "step_overhead_s": STEP_OVERHEAD_RANGE_S,
              "layer_overhead_s": LAYER_OVERHEAD_RANGE_S}
    for name, (lo, hi) in bounds.items():
        value = getattr(eff, name)
        if value != getattr(start, name) and value != lo and (math.isclose(value, lo) or math.isclose(value, hi)):
            notes.append(f"{name} clamped to {value:g} (range {lo:g}-{hi:g}): the planner's model does not "
                         "explain these measurements well")
    return Fit(start, eff, {"prefill": len(prefill), "decode": len(decode)}, notes, "moe")


def fit_families(points: list[Point], starts: dict[str, Efficiency]) -> dict[str, Fit]:
    """One fit per calibration family present in `points` (dense: `fit`, moe: `fit_moe`)."""
    out = {}
    for family in ("dense", "moe"):
        group = [p for p in points if p.family == family]
        if group:
            out[family] = (fit_moe if family == "moe" else fit)(group, starts[family])
    return out


# ---------------------------------------------------------------- CLI

def result_dict(points: list[Point], result: Fit | dict[str, Fit],
                base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows of planned vs measured and the factors. `result`: one fit, or one per family (fit_families);
    `base`: the starting calibration file's top-level factors, kept when no dense point refits them."""
    fits = result if isinstance(result, dict) else {"dense": result}
    rows = []
    for p in points:
        r = fits.get(p.family) or next(iter(fits.values()))
        before, after = p.predict(r.start), p.predict(r.fitted)
        rows.append({"source": p.source, "model": p.model, "workload": p.workload, "metric": p.metric,
                     "measured": p.measured, "planned_before": before, "planned_after": after,
                     "error_before_pct": error_pct(before, p.measured),
                     "error_after_pct": error_pct(after, p.measured), "fits": p.fits, "family": p.family})
    per_family = {}
    for family, r in fits.items():
        factors = {f.name: {"before": getattr(r.start, f.name), "after": getattr(r.fitted, f.name)}
                   for f in fields(Efficiency) if f.name in r.factors}
        per_family[family] = {"factors": factors, "points_used": r.used, "notes": r.notes}
    main = per_family.get("dense") or next(iter(per_family.values()))
    if "moe" in fits:
        calibration = dict(fits["dense"].calibration() if "dense" in fits else (base or {}))
        calibration["moe"] = fits["moe"].calibration()
    else:
        calibration = fits["dense"].calibration()
    out = {"points": rows, **main, "calibration": calibration}
    if len(fits) > 1 or "moe" in fits:
        out["families"] = per_family
    return out


def render(out: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title="planned vs measured (error = planned / measured - 1)")
    for col in ("model", "workload", "metric", "measured", "planned before", "planned after", "error before",
                "error after", "fits"):
        table.add_column(col, justify="left" if col in ("model", "workload", "metric", "fits") else "right")
    for r in out["points"]:
        digits = 0 if r["metric"].startswith("output") else 2
        table.add_row(r["model"], r["workload"], r["metric"], f"{r['measured']:,.{digits}f}",
                      f"{r['planned_before']:,.{digits}f}", f"{r['planned_after']:,.{digits}f}",
                      f"{r['error_before_pct']:+.1f}%", f"{r['error_after_pct']:+.1f}%", r["fits"] or "shown")
    console.print(table)
    families = out.get("families") or {"dense": out}
    for family, f in families.items():
        title = "efficiency factors" + ("" if family == "dense" else f" ({family}: MoE/MLA models, the 'moe' section)")
        ft = Table(title=title)
        for col in ("factor", "before", "fitted"):
            ft.add_column(col, justify="left" if col == "factor" else "right")
        for name, v in f["factors"].items():
            fmt = (lambda x: f"{x * 1e3:.3f} ms") if name.endswith("_s") else (lambda x: f"{x:.3f}")
            ft.add_row(name, fmt(v["before"]), fmt(v["after"]))
        console.print(ft)
        for note in f["notes"]:
            console.print(f"[yellow]note{'' if family == 'dense' else f' ({family})'}: {note}[/yellow]",
                          soft_wrap=True)


def run_calibrate(paths: Sequence[str], out_path: str | None, as_json: bool, console: Any, gpu: str | None = None,
                  **options: Any) -> int:
    from r1deploy.plan.roofline import load_calibration

    points = load_points(paths, gpu, **options)
    path = options.get("calibration")
    starts = {family: load_calibration(path, family) for family in ("dense", "moe")}
    base = {k: v for k, v in asdict(starts["dense"]).items() if v != asdict(Efficiency())[k]}
    result = fit_families(points, starts)
    out = result_dict(points, result, base)
    calibration = dict(out["calibration"])
    text = json.dumps(calibration, indent=2) + "\n"
    if out_path:
        try:
            Path(out_path).expanduser().write_text(text)
        except OSError as exc:
            raise UsageError(f"--calibration-out {out_path}: {exc}") from None
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    render(out, console)
    if out_path:
        console.print(f"wrote {out_path} (use it with: r1deploy plan --calibration {out_path})", highlight=False)
    else:
        print(text, end="")
    return 0
