"""Fitting the roofline's efficiency factors to measured points (points.py).

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
wider: prefill_flops as above (wider range) from the prompts that meet no routed expert (dense-only depths),
and moe_flops (the experts' grouped GEMM) from those that do, when both kinds are given; then the decode factors
(memory_bandwidth, step_overhead_s, layer_overhead_s, and decode_flops, fp8_moe_bandwidth and attention_flops
where the points separate them: `_decode_free`) jointly by bounded least squares on log error (scipy);
embedding_read is set to 0 (the engine's lookup reads only the batch's rows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from r1deploy.plan.points import Point
from r1deploy.plan.roofline import Efficiency

# Sane ranges for fitted factors.
PREFILL_FLOPS_RANGE = (0.1, 1.0)
MEMORY_BANDWIDTH_RANGE = (0.3, 1.0)
STEP_OVERHEAD_RANGE_S = (0.0, 0.02)
# A point informs a factor when that factor's term is at least this share of the predicted time.
MIN_SENSITIVITY = 0.3

FITTED = ("prefill_flops", "memory_bandwidth", "step_overhead_s")
# Fitted too when INT4 points are given (an AWQ file), each from the points whose `fits` names it.
FITTED_INT4 = ("int4_read", "int4_multirow")
INT4_RANGE = (0.1, 1.0)
# The MoE/MLA family's fitted set and ranges (fit_moe).
FITTED_MOE = ("prefill_flops", "moe_flops", "fp8_flops", "decode_flops", "memory_bandwidth", "fp8_moe_bandwidth",
              "attention_flops", "step_overhead_s", "layer_overhead_s")
# Decode kernel groups' shares (roofline._step), fitted when the decode points separate them from the rest: the
# routed FP8 experts' bandwidth (some steps meet them, some do not) and the attention core's FLOP rate (some
# steps are bound by it, some not), each probed at SHARE_PROBE so a default of 1 does not hide it.
DECODE_SHARES = ("fp8_moe_bandwidth", "attention_flops")
SHARE_PROBE = 0.1
MOE_PREFILL_FLOPS_RANGE = (0.01, 1.0)
MOE_DECODE_FLOPS_RANGE = (0.01, 1.0)
MOE_MEMORY_BANDWIDTH_RANGE = (0.1, 1.0)
MOE_FLOPS_RANGE = (0.05, 1.0)
PREFILL_ROUNDS = 200
LAYER_OVERHEAD_RANGE_S = (0.0, 0.005)


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



def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _sensitive(p: Point, eff: Efficiency, factor: str) -> bool:
    """Share of the predicted time that scales with 1/factor (1 = wholly bound by it)."""
    base = p.predict(eff)
    bumped = p.predict(replace(eff, **{factor: getattr(eff, factor) * 1.01}))
    share = (base - bumped) / base / (1 - 1 / 1.01) if base > 0 else 0.0
    return share >= MIN_SENSITIVITY


def fit_one(points: list[Point], eff: Efficiency, factor: str, bounds: tuple[float, float]) -> float:
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
            eff = replace(eff, prefill_flops=fit_one(prefill, eff, "prefill_flops", PREFILL_FLOPS_RANGE))
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
            eff = replace(eff, **{factor: round(fit_one(group, eff, factor, INT4_RANGE), 3)})
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


def _decode_free(points: list[Point], eff: Efficiency) -> list[str]:
    """The MoE decode factors these points determine: memory_bandwidth and the fixed latencies always;
    decode_flops when some step is compute-bound at a low probe; each of DECODE_SHARES where some points are
    bound by it and some are not (else it is confounded with memory_bandwidth / decode_flops)."""
    free = ["memory_bandwidth", "step_overhead_s", "layer_overhead_s"]
    probe = replace(eff, decode_flops=SHARE_PROBE)
    if any(_sensitive(p, probe, "decode_flops") for p in points):
        free.append("decode_flops")
    for factor in DECODE_SHARES:
        probe = replace(eff, **{factor: SHARE_PROBE})
        bound = [_sensitive(p, probe, factor) for p in points]
        if any(bound) and not all(bound):
            free.append(factor)
    return free


def _fit_moe_decode(points: list[Point], eff: Efficiency, free: list[str]) -> Efficiency:
    """The `free` decode factors jointly: bounded least squares on log(planned / measured) (scipy), shares
    in log space, latencies in milliseconds."""
    from scipy.optimize import least_squares

    ranges = {"memory_bandwidth": MOE_MEMORY_BANDWIDTH_RANGE, "decode_flops": MOE_DECODE_FLOPS_RANGE,
              "step_overhead_s": STEP_OVERHEAD_RANGE_S, "layer_overhead_s": LAYER_OVERHEAD_RANGE_S,
              **{f: MOE_FLOPS_RANGE for f in DECODE_SHARES}}

    def to_x(name: str, value: float) -> float:
        return value * 1e3 if name.endswith("_s") else math.log(value)

    def at(x: list[float]) -> Efficiency:
        return replace(eff, **{n: v / 1e3 if n.endswith("_s") else math.exp(v) for n, v in zip(free, x)})

    lo, hi = ([to_x(n, ranges[n][k]) for n in free] for k in (0, 1))
    x0 = [min(max(to_x(n, _clamp(getattr(eff, n), ranges[n])), a), b) for n, a, b in zip(free, lo, hi)]
    result = least_squares(lambda x: [math.log(p.predict(at(x)) / p.measured) for p in points], x0,
                           bounds=(lo, hi), xtol=1e-10, ftol=1e-12)
    return at(list(result.x))


def _fit_prefill(points: list[Point], eff: Efficiency) -> Efficiency:
    """prefill_flops, plus moe_flops (routed experts' grouped GEMM) when some prompts meet experts and some do not,
    and fp8_flops when some run FP8 linears and some do not (each else confounded with prefill_flops): a few
    rounds of 1-D least squares on log error over all the points, one factor at a time."""
    free = [("prefill_flops", MOE_PREFILL_FLOPS_RANGE)]
    for factor in ("moe_flops", "fp8_flops"):
        bound = [_sensitive(p, eff, factor) for p in points]
        if any(bound) and not all(bound):
            free.append((factor, MOE_FLOPS_RANGE))
    for _ in range(1 if len(free) == 1 else PREFILL_ROUNDS):  # coordinate descent until it settles
        before = eff
        for factor, bounds in free:
            eff = replace(eff, **{factor: fit_one(points, eff, factor, bounds)})
        if all(math.isclose(getattr(eff, f), getattr(before, f), rel_tol=1e-4) for f, _ in free):
            break
    return eff


def fit_moe(points: list[Point], start: Efficiency) -> Fit:
    """The MoE/MLA family's fit (module docstring): prefill_flops, then decode_flops, memory_bandwidth,
    step_overhead_s and layer_overhead_s, with the embedding read as a lookup."""
    notes: list[str] = []
    eff = replace(start, embedding_read=0.0)
    prefill = [p for p in points if p.fits == "prefill"]
    decode = [p for p in points if p.fits == "decode"]
    free: list[str] = []
    for _ in range(3):
        prefill = [p for p in points if p.fits == "prefill" and _sensitive(p, eff, "prefill_flops")]
        if prefill:
            eff = _fit_prefill(prefill, eff)
        if decode:
            free = _decode_free(decode, eff)
            eff = _fit_moe_decode(decode, eff, free)
    flops = "decode_flops" in free
    if not prefill:
        notes.append("prefill_flops kept: no compute-bound TTFT point")
    if not decode:
        notes.append("decode factors kept: no TPOT point")
    elif not flops:
        notes.append("decode_flops kept: no decode step is compute-bound")
    eff = replace(eff, **{k: round(getattr(eff, k), 6 if k.endswith("_s") else 3) for k in FITTED_MOE})
    bounds = {"prefill_flops": MOE_PREFILL_FLOPS_RANGE, "moe_flops": MOE_FLOPS_RANGE, "fp8_flops": MOE_FLOPS_RANGE,
              "decode_flops": MOE_DECODE_FLOPS_RANGE,
              "memory_bandwidth": MOE_MEMORY_BANDWIDTH_RANGE, "fp8_moe_bandwidth": MOE_FLOPS_RANGE,
              "attention_flops": MOE_FLOPS_RANGE, "step_overhead_s": STEP_OVERHEAD_RANGE_S,
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
