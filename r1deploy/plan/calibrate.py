"""`r1deploy plan --calibrate RUN.json ...`: fit the roofline's efficiency factors to measured runs and show
planned vs measured. Reading the runs is points.py's job, fitting fit.py's; this module renders and writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.fit import FITTED_INT4, Fit, fit, fit_families, fit_moe
from r1deploy.plan.points import Point, error_pct
from r1deploy.plan.run_points import load_points
from r1deploy.plan.roofline import Efficiency

__all__ = ["FITTED_INT4", "fit", "fit_families", "fit_moe", "load_points", "render", "result_dict", "run_calibrate"]


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
