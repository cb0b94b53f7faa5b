from __future__ import annotations

import pytest

from r1deploy.bench.slo import (
    FAIL,
    NOT_MEASURED,
    PASS,
    all_pass,
    goodput_limits,
    parse_slo,
    targets_for,
    verdict,
)
from r1deploy.errors import UsageError


def test_parse_slo() -> None:
    assert parse_slo("ttft:30,tpot:100,e2e:5000") == {"ttft": 30.0, "tpot": 100.0, "e2e": 5000.0}
    assert parse_slo("ttft=30ms e2el:9") == {"ttft": 30.0, "e2e": 9.0}
    assert parse_slo(None) == {}
    for bad in ("ttft", "speed:3", "ttft:fast", "tpot:-1"):
        with pytest.raises(UsageError):
            parse_slo(bad)


def test_seed_profile_and_overrides() -> None:
    seed = {t.metric: t for t in targets_for("seed", {})}
    assert seed["gpu_util_mean_pct"].threshold == 95 and seed["gpu_util_mean_pct"].op == ">="
    assert seed["p99_tpot_ms"].threshold == 100 and seed["p99_ttft_ms"].threshold == 30
    assert seed["fragmentation_max_pct"].threshold == 5 and seed["oom_count"].threshold == 0
    custom = {t.metric: t for t in targets_for("seed", {"ttft": 200, "e2e": 4000})}
    assert custom["p99_ttft_ms"].threshold == 200 and custom["p99_e2e_ms"].threshold == 4000
    limits = goodput_limits(tuple(custom.values()))
    assert (limits.ttft_ms, limits.tpot_ms, limits.e2e_ms) == (200, 100, 4000)
    with pytest.raises(UsageError, match="seed"):
        targets_for("fastest", {})


def test_verdict_pass_fail_and_not_measured() -> None:
    targets = targets_for("seed", {})
    measured = {"p99_tpot_ms": 20.0, "p99_ttft_ms": 45.0, "oom_count": 0.0, "fragmentation_max_pct": None,
                "gpu_util_mean_pct": None}
    checks = {c.target.metric: c for c in verdict(targets, measured, {"gpu_util_mean_pct": "no GPU"})}
    assert checks["p99_tpot_ms"].status == PASS
    assert checks["p99_ttft_ms"].status == FAIL and "45" in checks["p99_ttft_ms"].line()
    assert checks["gpu_util_mean_pct"].status == NOT_MEASURED and "no GPU" in checks["gpu_util_mean_pct"].line()
    assert not all_pass(list(checks.values()))  # NOT MEASURED never passes
    assert all_pass(verdict(targets_for("mlperf-r1", {}), {"p99_ttft_ms": 100.0, "p99_tpot_ms": 10.0}))
