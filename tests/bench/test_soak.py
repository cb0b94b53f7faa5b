"""Soak runs against the fake server: the verdict reads the server's process series (never the bench
client's own), checkpoints are taken at idle, clients drop requests on purpose, variants are tallied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_harness import FakeServerOptions, run_bench

from r1deploy.bench.checkpoints import checkpoint, soak_checks
from r1deploy.bench.record import RequestRecord

SOAK = ["--no-progress", "--warmup", "1", "--telemetry-interval", "0.05", "--concurrency", "3", "--seq", "8",
        "--output-len", "6", "--duration", "1.6s", "--checkpoint-interval", "0.5s", "--slo-profile", "none"]


def _checks(out: Path) -> tuple[dict, dict]:
    rep = json.loads((out / "report.json").read_text())
    return rep, {c["metric"]: c for c in rep["slo"]["checks"]}


def test_url_soak_reads_the_server_rss_and_flags_its_growth(fake_server, tmp_path: Path) -> None:
    url = fake_server(FakeServerOptions(rss_growth_per_scrape=5e6, token_delay_s=0.02))
    code = run_bench(["--url", url, *SOAK, "--disconnect-rate", "0.3", "--abort-rate", "0.2", "--mix", "0.3",
                      "--out", str(tmp_path)])
    rep, checks = _checks(tmp_path)
    points = rep["soak"]["checkpoints"]
    assert len(points) >= 3 and all(p["rss_bytes"] >= 1e9 for p in points)  # the server's, not ours (~100 MB)
    assert checks["rss_growth_pct"]["status"] == "FAIL"  # the fake server grows 5 MB per scrape
    assert checks["open_fds_growth"]["status"] == "PASS" and points[0]["open_fds"] == 20
    assert checks["server_5xx"]["status"] == "PASS"
    assert rep["soak"]["dropped"].get("abort", 0) > 0 and rep["soak"]["dropped"].get("disconnect", 0) > 0
    assert sum(v.get("2xx", 0) for v in rep["soak"]["variants"].values()) > 0
    assert all(p["window"]["p99_tpot_ms"] is not None for p in points[:-1])
    assert code == 1


def test_url_soak_without_process_series_is_not_measured(fake_server, tmp_path: Path) -> None:
    url = fake_server()
    run_bench(["--url", url, *SOAK, "--out", str(tmp_path)])
    rep, checks = _checks(tmp_path)
    assert checks["rss_growth_pct"]["status"] == "NOT MEASURED"
    assert "process_resident_memory_bytes" in checks["rss_growth_pct"]["note"]
    assert rep["soak"]["checkpoints"][0]["rss_bytes"] is None


def test_bad_drop_rates_are_usage_errors(fake_server, tmp_path: Path, capsys) -> None:
    url = fake_server()
    assert run_bench(["--url", url, *SOAK, "--abort-rate", "0.7", "--disconnect-rate", "0.6",
                      "--out", str(tmp_path)]) == 2
    assert "must not exceed 1" in capsys.readouterr().err


def _point(kv: float, rss: float, tpot_s: float, status: int = 200, fds: float = 10.0) -> dict:
    record = RequestRecord("r", 0.0, 1.0 + 9 * tpot_s, (1.0,), output_tokens=10, status=status)
    sample = {"gpus": [], "rss_bytes": rss, "open_fds": fds, "threads": 4.0, "kv_blocks_used": kv,
              "reserved_bytes": None, "allocated_bytes": None}
    return checkpoint(0.0, sample, [record])


def test_checks_flag_kv_left_over_tpot_drift_and_5xx() -> None:
    base = _point(0, 100.0, 0.01)
    good = {c.target.metric: c.status for c in soak_checks(base, [_point(0, 100.0, 0.01), _point(0, 101.0, 0.0105)], 0, 4)}
    assert good["kv_blocks_over_baseline"] == good["rss_growth_pct"] == good["p99_tpot_drift_pct"] == "PASS"
    bad = {c.target.metric: c for c in soak_checks(base, [_point(2, 100.0, 0.01, 503), _point(0, 103.0, 0.02, fds=15.0)], 1, 4)}
    assert bad["kv_blocks_over_baseline"].value == 2 and bad["kv_blocks_over_baseline"].status == "FAIL"
    assert bad["rss_growth_pct"].value == pytest.approx(3.0) and bad["p99_tpot_drift_pct"].value == pytest.approx(100.0)
    assert bad["server_5xx"].value == 2 and bad["open_fds_growth"].status == "FAIL"  # 5 fds over 4 connections
    assert good["open_fds_growth"] == "PASS"


def test_one_checkpoint_says_why_growth_is_not_measured() -> None:
    checks = {c.target.metric: c for c in soak_checks(_point(0, 1.0, 0.01), [_point(0, 1.0, 0.01)], 0, 4)}
    assert checks["rss_growth_pct"].status == "NOT MEASURED" and "2 checkpoints" in checks["rss_growth_pct"].note
