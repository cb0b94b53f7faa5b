from __future__ import annotations

import statistics

import pytest

from r1deploy.bench.arrivals import Concurrency, Rate, Rounds, intervals


def test_poisson_mean_gap_is_one_over_rate() -> None:
    gaps = intervals(rate=4.0, burstiness=1.0, n=20000, seed=1)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    # Exponential gaps: coefficient of variation 1.
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)


def test_gamma_burstiness_keeps_mean_and_changes_spread() -> None:
    bursty = intervals(4.0, 0.25, 20000, seed=2)
    smooth = intervals(4.0, 4.0, 20000, seed=2)
    for gaps in (bursty, smooth):
        assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    # CV of gamma = 1 / sqrt(shape): 2 for burstiness 0.25, 0.5 for 4.
    assert statistics.pstdev(bursty) / statistics.fmean(bursty) == pytest.approx(2.0, rel=0.1)
    assert statistics.pstdev(smooth) / statistics.fmean(smooth) == pytest.approx(0.5, rel=0.1)


def test_seed_makes_arrivals_repeatable() -> None:
    assert intervals(2.0, 1.0, 50, seed=7) == intervals(2.0, 1.0, 50, seed=7)
    assert intervals(2.0, 1.0, 50, seed=7) != intervals(2.0, 1.0, 50, seed=8)


def test_schedules_validate_and_describe() -> None:
    assert Rounds(32, 100).total == 3200
    assert "100 rounds of 32" in Rounds(32, 100).describe()
    assert Concurrency(4, 10).total == 10
    assert "Poisson" in Rate(2.0, 10).describe() and "gamma" in Rate(2.0, 10, 0.5).describe()
    for bad in (lambda: Rounds(0, 1), lambda: Rate(0.0, 5), lambda: Rate(1.0, 5, burstiness=-1),
                lambda: Concurrency(1, 0)):
        with pytest.raises(ValueError):
            bad()
