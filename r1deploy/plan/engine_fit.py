"""Fitting a published engine's profile (engines/NAME.json) to its `fitted` points only.

The profile names the factors to fit (`fitted_factors`: "name" for the top level, fitted on dense-model
points; "moe.name" for the MoE/MLA section, fitted on DeepSeek points). Each is a 1-D least squares on
log(planned / measured) (fit.py's golden section), a few rounds when several share points. Held-out points
never enter. tests/plan/test_engines.py checks that the shipped factors are what this gives.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from r1deploy.plan.catalog import Catalog
from r1deploy.plan.engines import EngineProfile
from r1deploy.plan.fit import fit_one
from r1deploy.plan.points import Point
from r1deploy.plan.roofline import calibration_family
from r1deploy.plan.validate import point_model, predict_published

LATENCY_RANGE_S = (1e-6, 0.01)
FACTOR_RANGE = (0.05, 1.0)
ROUNDS = 4


def fitted_points(profile: EngineProfile, catalog: Catalog, family: str) -> list[Point]:
    """The profile's `fitted` published points of one calibration family, as points.py's Point."""
    out = []
    for p in profile.points:
        if p["set"] != "fitted" or calibration_family(point_model(p)) != family:
            continue
        out.append(Point(p["source"], p["model"], p["id"], p["metric"], float(p["measured"]), "engine",
                         lambda eff, p=p: predict_published(profile, p, catalog, eff), family))
    return out


def fit_profile(profile: EngineProfile, catalog: Catalog) -> dict[str, Any]:
    """The profile's `efficiency` object with its `fitted_factors` refitted."""
    efficiency = {k: (dict(v) if isinstance(v, dict) else v) for k, v in profile.efficiency.items()}
    for family, section in (("dense", None), ("moe", "moe")):
        names = [f.partition(".")[2] if section else f for f in profile.fitted_factors
                 if (f.startswith("moe.") if section else "." not in f)]
        if not names:
            continue
        points = fitted_points(profile, catalog, family)
        if not points:
            raise ValueError(f"engine {profile.name}: {names} to fit but no fitted {family} point")
        eff = profile.family_eff(family)
        for _ in range(ROUNDS if len(names) > 1 else 1):
            for name in names:
                bounds = LATENCY_RANGE_S if name.endswith("_s") else FACTOR_RANGE
                eff = replace(eff, **{name: fit_one(points, eff, name, bounds)})
        target = efficiency.setdefault("moe", {}) if section else efficiency
        for name in names:
            target[name] = round(getattr(eff, name), 6 if name.endswith("_s") else 3)
    return efficiency
