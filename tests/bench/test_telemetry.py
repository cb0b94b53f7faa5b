from __future__ import annotations

import pytest

from r1deploy.bench.telemetry import Telemetry, fragmentation_pct, parse_prometheus, summarize_samples


def test_fragmentation() -> None:
    assert fragmentation_pct(1000.0, 950.0) == pytest.approx(5.0)
    assert fragmentation_pct(None, 1.0) is None and fragmentation_pct(0.0, 0.0) is None


def test_prometheus_allocator_and_kv_series() -> None:
    text = ("# HELP r1deploy_allocator_reserved_bytes x\n"
            "r1deploy_allocator_reserved_bytes{gpu=\"0\"} 2000\nr1deploy_allocator_reserved_bytes{gpu=\"1\"} 2000\n"
            "r1deploy_allocator_allocated_bytes{gpu=\"0\"} 1900\nr1deploy_allocator_allocated_bytes{gpu=\"1\"} 1900\n"
            "r1deploy_kv_blocks_used 12\nr1deploy_requests_total{status=\"ok\"} 5\n")
    stats = parse_prometheus(text)
    assert stats.reserved_bytes == 4000 and stats.allocated_bytes == 3800 and stats.kv_blocks_used == 12


def test_samples_summary_and_missing_gpu_reason() -> None:
    samples = [{"t": 0.0, "gpus": [{"util_pct": 90.0, "power_w": 300.0}], "rss_bytes": 1.0, "reserved_bytes": 100.0,
                "allocated_bytes": 98.0, "num_ooms": 1.0, "kv_blocks_used": 0.0},
               {"t": 1.0, "gpus": [{"util_pct": 100.0, "power_w": 500.0}], "rss_bytes": 2.0, "reserved_bytes": 100.0,
                "allocated_bytes": 90.0, "num_ooms": 1.0, "kv_blocks_used": 0.0}]
    s = summarize_samples(samples, ["H200"], "", "", 0.5)
    assert s["gpu_util_mean_pct"] == pytest.approx(95.0) and s["power_mean_w"] == pytest.approx(400.0)
    assert s["fragmentation_max_pct"] == pytest.approx(10.0) and s["allocator_ooms"] == 0
    telemetry = Telemetry(0.05)
    telemetry.start(0.0)
    telemetry.stop()
    summary = telemetry.summary()
    if not telemetry.nvml.handles:  # the CPU CI machine: reported as not measured, never faked
        assert summary["gpu_util_mean_pct"] is None and "no GPU" in summary["gpu_reason"]
