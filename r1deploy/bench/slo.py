"""SLO targets, profiles and the PASS / FAIL verdict.

The seed profile is the seed guide's validation step, made precise:
- GPU utilisation >= 95 %: NVML utilization.gpu, mean over the run on every GPU (time a kernel ran).
- "P99 latency <= 100 ms" is read as per-token latency: P99 TPOT (the guide's numbers only make
  sense per token; a 128-token answer cannot finish in 100 ms end to end at R1's size).
- first token <= 30 ms: P99 TTFT.
- no OOM: zero out-of-memory errors (allocator counter and request errors).
- fragmentation <= 5 %: worst (reserved - allocated) / reserved seen during the run.
A target that could not be measured is NOT MEASURED and does not pass: no fake PASS on a CPU box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from r1deploy.bench.metrics import GoodputLimits
from r1deploy.errors import UsageError

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "NOT MEASURED"


@dataclass(frozen=True)
class Target:
    metric: str  # key of the measurements dict
    label: str
    op: str  # "<=" or ">="
    threshold: float
    unit: str

    def holds(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def describe(self) -> str:
        return f"{self.label} {self.op} {self.threshold:g}{self.unit}"


@dataclass(frozen=True)
class Check:
    target: Target
    value: float | None
    status: str
    note: str = ""

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.4g}{self.target.unit}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.status:<12} {self.target.describe():<34} measured {shown}{note}"


def _latency(key: str, threshold: float) -> Target:
    names = {"ttft": "P99 TTFT", "tpot": "P99 TPOT (per-token latency)", "e2e": "P99 E2E latency",
             "itl": "P99 ITL"}
    return Target(f"p99_{key}_ms", names[key], "<=", threshold, " ms")


PROFILES: dict[str, tuple[Target, ...]] = {
    "seed": (
        Target("gpu_util_mean_pct", "GPU utilisation (mean)", ">=", 95, " %"),
        _latency("tpot", 100),
        _latency("ttft", 30),
        Target("oom_count", "OOM errors", "<=", 0, ""),
        Target("fragmentation_max_pct", "allocator fragmentation (max)", "<=", 5, " %"),
    ),
    # MLPerf Inference loadgen limits for DeepSeek-R1 (mlperf.conf), both at P99.
    "mlperf-r1": (_latency("ttft", 2000), _latency("tpot", 80)),
    "mlperf-r1-interactive": (_latency("ttft", 1500), _latency("tpot", 15)),
    "none": (),
}

_SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e", "itl": "itl"}


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft:30,tpot:100,e2e:5000' (ms; ':' or '=') -> {'ttft': 30.0, ...}."""
    if not text:
        return {}
    limits: dict[str, float] = {}
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        key, sep, value = item.replace("=", ":").partition(":")
        key = key.strip().lower()
        if not sep or key not in _SLO_KEYS:
            raise UsageError(f"--slo: {item!r} is not KEY:MS with KEY one of ttft, tpot, e2e, itl")
        try:
            limits[_SLO_KEYS[key]] = float(value.removesuffix("ms"))
        except ValueError:
            raise UsageError(f"--slo: {item!r}: {value!r} is not a number of milliseconds") from None
        if limits[_SLO_KEYS[key]] <= 0:
            raise UsageError(f"--slo: {item!r}: the limit must be > 0 ms")
    return limits


def targets_for(profile: str, slo: Mapping[str, float]) -> tuple[Target, ...]:
    """The profile's targets, with --slo limits replacing or adding P99 latency targets."""
    if profile not in PROFILES:
        raise UsageError(f"unknown --slo-profile {profile!r}; choose from {', '.join(PROFILES)}")
    targets = list(PROFILES[profile])
    for key, limit in slo.items():
        new = _latency(key, limit)
        index = next((i for i, t in enumerate(targets) if t.metric == new.metric), None)
        if index is None:
            targets.append(new)
        else:
            targets[index] = replace(targets[index], threshold=limit)
    return tuple(targets)


def goodput_limits(targets: Sequence[Target]) -> GoodputLimits:
    """Per-request limits for goodput: the latency targets of the verdict (vLLM keys ttft/tpot/e2el)."""
    by_metric = {t.metric: t.threshold for t in targets}
    return GoodputLimits(by_metric.get("p99_ttft_ms"), by_metric.get("p99_tpot_ms"), by_metric.get("p99_e2e_ms"))


def verdict(targets: Sequence[Target], measured: Mapping[str, float | None],
            missing: Mapping[str, str] | None = None, caveats: Mapping[str, str] | None = None) -> list[Check]:
    """One Check per target. missing[metric] says why a value is absent (e.g. 'no GPU');
    caveats[metric] qualifies a measured one (e.g. 'request errors only')."""
    missing, caveats = missing or {}, caveats or {}
    checks = []
    for target in targets:
        value = measured.get(target.metric)
        if value is None:
            checks.append(Check(target, None, NOT_MEASURED, missing.get(target.metric) or "not measured"))
        else:
            checks.append(Check(target, value, PASS if target.holds(value) else FAIL, caveats.get(target.metric, "")))
    return checks


def all_pass(checks: Sequence[Check]) -> bool:
    return all(c.status == PASS for c in checks)
