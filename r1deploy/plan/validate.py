"""`r1deploy plan --validate`: planned vs every published and measured point the engine profiles know.

Published points (engines/NAME.json `points`) are predicted on their own hardware and layout with the
engine's profile; measured points are the engine's committed runs (`runs`, read by points.py) predicted
with its factors. Each row carries its set: `fitted` (the profile was fitted on it), `held_out`, or
`other_version` (shown, outside the targets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1deploy.plan.catalog import Catalog
from r1deploy.plan.engines import ENGINE_NAMES, EngineProfile, load_engine
from r1deploy.plan.memory import plan_memory
from r1deploy.plan.model_spec import ModelSpec, load_model
from r1deploy.plan.parallel import DEFAULT_GPUS_PER_NODE, Layout
from r1deploy.plan.planner import DEFAULT_GPU_MEMORY_UTILIZATION
from r1deploy.plan.points import error_pct
from r1deploy.plan.run_points import load_points
from r1deploy.plan.precision import make_precision
from r1deploy.plan.roofline import Efficiency, stage_cost
from r1deploy.plan.serving import Performance, Workload, predict

REPO_ROOT = Path(__file__).resolve().parents[2]
# Targets (issue 21): a fitted point within 15%, a held-out one within 25%.
FITTED_LIMIT_PCT, HELD_OUT_LIMIT_PCT = 15.0, 25.0
METRICS = {
    "output_tok_s": lambda p, gpus: p.output_tokens_per_s,
    "output_tok_s_per_gpu": lambda p, gpus: p.output_tokens_per_s / gpus,
    "tpot_ms": lambda p, gpus: p.tpot_s * 1e3,
    "tok_s_per_user": lambda p, gpus: p.tokens_per_s_per_user,
}


def point_model(point: dict[str, Any]) -> ModelSpec:
    return load_model(point["model"], point.get("config_overrides"))


def _perf(profile: EngineProfile, point: dict[str, Any], catalog: Catalog, mtp: bool,
          eff: Efficiency | None) -> Performance:
    model = point_model(point)
    gpu = catalog.get(point["gpu"])
    precision = make_precision(point.get("weights"), point.get("kv_cache_dtype", "auto"), None,
                               model.checkpoint_weights, model.checkpoint_group_size)
    tp = point["tp"]
    layout = Layout(point.get("num_gpus", tp), tp, 1, point.get("ep", 1), bool(point.get("dp_attention")),
                    DEFAULT_GPUS_PER_NODE)
    cost = stage_cost(model, precision, layout, gpu, eff or profile.eff(model))
    n_in, n_out = point["input_len"], point["output_len"]
    concurrency, rate = point.get("concurrency"), point.get("request_rate")
    if concurrency == "max":  # the largest load the engine runs: KV capacity, capped by its batch limit
        mem = plan_memory(model, precision, layout, gpu, DEFAULT_GPU_MEMORY_UTILIZATION)
        concurrency = mem.kv_capacity_tokens // (n_in + n_out) * layout.replicas
        if profile.max_running:
            concurrency = min(concurrency, profile.max_running * layout.replicas)
    work = Workload(n_in, n_out, concurrency, rate, n_in + n_out)
    return predict(cost, work, profile.spec_decode(model) if mtp else None)


def published_terms(profile: EngineProfile, point: dict[str, Any], catalog: Catalog) -> dict[str, float]:
    """The terms behind a published point's prediction: its decode step (with MTP when the point has it: the
    verify step), the per-step overhead, the prefill, and MTP's tokens per step."""
    mtp = bool(point.get("mtp")) or point["metric"] == "mtp_speedup"
    perf = _perf(profile, point, catalog, mtp, None)
    model = point_model(point)
    spec = profile.spec_decode(model) if mtp else None
    return {**perf.decode.terms(), "step_overhead_ms": profile.eff(model).step_overhead_s * 1e3,
            "prefill_ms": perf.prefill_s * 1e3, "concurrency": perf.concurrency,
            **({"mtp_tokens_per_step": spec.tokens_per_step} if spec else {})}


def predict_published(profile: EngineProfile, point: dict[str, Any], catalog: Catalog,
                      eff: Efficiency | None = None) -> float:
    """The profile's prediction of one published point's metric (with `eff` instead of its factors, if given)."""
    gpus = point.get("num_gpus", point["tp"])
    if point["metric"] == "mtp_speedup":  # TPOT without MTP over TPOT with it
        return _perf(profile, point, catalog, False, eff).tpot_s / _perf(profile, point, catalog, True, eff).tpot_s
    return METRICS[point["metric"]](_perf(profile, point, catalog, bool(point.get("mtp")), eff), gpus)


def _row(engine: str, kind: str, set_: str, source: str, what: str, metric: str, measured: float,
         planned: float, terms: dict[str, float] | None) -> dict[str, Any]:
    return {"engine": engine, "kind": kind, "set": set_, "source": source, "point": what, "metric": metric,
            "measured": measured, "planned": planned, "error_pct": error_pct(planned, measured), "terms": terms}


def validate_engine(profile: EngineProfile, catalog: Catalog) -> list[dict[str, Any]]:
    rows = [_row(profile.name, "published", p["set"], p["source"], p["id"], p["metric"], p["measured"],
                 predict_published(profile, p, catalog), published_terms(profile, p, catalog)) for p in profile.points]
    for run in profile.runs:
        if not (REPO_ROOT / run).is_file():  # an installed package without the repository's benchmarks/
            continue
        for pt in load_points([str(REPO_ROOT / run)]):
            set_ = "fitted" if pt.fits else "held_out"  # `plan --calibrate` fits on every point with a `fits`
            eff = profile.family_eff(pt.family)
            rows.append(_row(profile.name, "measured", set_, pt.source, f"{pt.model}: {pt.workload}", pt.metric,
                             pt.measured, pt.predict(eff), pt.explain(eff) if pt.explain else None))
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = out.setdefault(r["engine"], {"fitted_points": 0, "held_out_points": 0, "fitted_max_abs_error_pct": 0.0,
                                         "held_out_max_abs_error_pct": 0.0})
        if r["set"] == "other_version":
            continue
        key = r["set"]
        s[f"{key}_points"] += 1
        s[f"{key}_max_abs_error_pct"] = max(s[f"{key}_max_abs_error_pct"], abs(r["error_pct"]))
    for s in out.values():
        s["fitted_within_target"] = s["fitted_max_abs_error_pct"] <= FITTED_LIMIT_PCT
        s["held_out_within_target"] = s["held_out_max_abs_error_pct"] <= HELD_OUT_LIMIT_PCT
    return out


def _terms_text(terms: dict[str, float] | None) -> str:
    if not terms:
        return ""
    return ", ".join(f"{k.removesuffix('_ms')} {v:.2f}" for k, v in terms.items() if k not in ("compute_ms", "memory_ms"))


def run_validate(engine: str | None, as_json: bool, console: Any, gpu_file: str | None = None,
                 explain: bool = False) -> int:
    """`explain`: a column with each point's terms (ms): the step's roofline (kernel groups at their own
    max(compute, memory)), collectives, fixed per-layer latencies, the per-step overhead, the prefill."""
    catalog = Catalog.load(gpu_file, None)
    rows = [r for name in ([engine] if engine else ENGINE_NAMES) for r in validate_engine(load_engine(name), catalog)]
    out = {"rows": rows, "summary": summary(rows),
           "targets_pct": {"fitted": FITTED_LIMIT_PCT, "held_out": HELD_OUT_LIMIT_PCT}}
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="planned vs measured per engine (error = planned / measured - 1)")
    for col in ("engine", "set", "point", "metric", "measured", "planned", "error", "source") + (
            ("terms (ms)",) if explain else ()):
        table.add_column(col, justify="right" if col in ("measured", "planned", "error") else "left")
    for r in rows:
        table.add_row(r["engine"], r["set"], r["point"], r["metric"], f"{r['measured']:,.2f}", f"{r['planned']:,.2f}",
                      f"{r['error_pct']:+.1f}%", r["source"], *((_terms_text(r["terms"]),) if explain else ()))
    console.print(table)
    st = Table(title=f"max |error| per engine (targets: fitted {FITTED_LIMIT_PCT:g}%, held out {HELD_OUT_LIMIT_PCT:g}%)")
    for col in ("engine", "fitted points", "fitted max", "held-out points", "held-out max"):
        st.add_column(col, justify="left" if col == "engine" else "right")
    for name, s in out["summary"].items():
        st.add_row(name, str(s["fitted_points"]), f"{s['fitted_max_abs_error_pct']:.1f}%", str(s["held_out_points"]),
                   f"{s['held_out_max_abs_error_pct']:.1f}%")
    console.print(st)
    return 0

