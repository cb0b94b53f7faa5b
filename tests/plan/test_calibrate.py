"""`r1deploy plan --calibrate`: the fit recovers known factors, the CLI reads both run formats, bad files exit 2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from r1deploy.cli import main
from r1deploy.plan.calibrate import fit, load_points
from r1deploy.plan.roofline import Efficiency, load_calibration

TRUE = Efficiency(prefill_flops=0.62, memory_bandwidth=0.7, step_overhead_s=0.0012)

ENGINE = {  # benchmarks/results/h200_dense.json's layout, trimmed
    "command": "...", "machine": "one NVIDIA H200",
    "ours_r1_distill_qwen_7b": {"shape": "r1-distill-qwen-7b", "gpu": "NVIDIA H200", "ttft_2048_ms": 47.0,
                                "decode_bs1_tok_s": 191.7, "decode_bs1_median_step_ms": 5.16,
                                "decode_bs32_median_step_ms": 6.01, "offline_out_tok_s": 10670.0,
                                "offline_in_tokens": 144831},
    "peer_r1_distill_qwen_7b": {"shape": "r1-distill-qwen-7b", "prefill_bs1_len2048_ms": 55.0},
    "ours_r1_distill_qwen_32b": {"shape": "r1-distill-qwen-32b", "gpu": "NVIDIA H200",
                                 "decode_bs1_median_step_ms": 18.52},
}


def bench_report(**summary: float) -> dict:
    return {"schema": "r1deploy-bench/1",
            "config": {"model": "r1-distill-qwen-7b", "input_len": 512, "output_len": 256, "batch": None,
                       "concurrency": 8, "max_concurrency": None},
            "summary": {"p99_ttft_ms": 60.0, "median_ttft_ms": 40.0, "median_tpot_ms": 7.0,
                        "output_throughput": 900.0, **summary},
            "telemetry": {"gpus": ["NVIDIA H200"]}, "requests": []}


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def synthetic(points: list, eff: Efficiency) -> list:
    """The same workloads, 'measured' as the planner itself predicts them with `eff`."""
    return [replace(p, measured=p.predict(eff)) for p in points]


def test_fit_recovers_factors_from_engine_points(tmp_path: Path) -> None:
    points = synthetic(load_points([write(tmp_path, "engine.json", ENGINE)]), TRUE)
    result = fit(points, Efficiency())
    assert result.fitted.prefill_flops == pytest.approx(TRUE.prefill_flops, abs=1e-3)
    assert result.fitted.memory_bandwidth == pytest.approx(TRUE.memory_bandwidth, abs=1e-3)
    assert result.fitted.step_overhead_s == pytest.approx(TRUE.step_overhead_s, abs=1e-6)
    assert result.used == {"prefill": 1, "decode": 3} and not result.notes
    for p in points:  # after the fit the planner reproduces every measurement
        assert p.predict(result.fitted) == pytest.approx(p.measured, rel=2e-3)


def test_one_decode_point_fits_bandwidth_and_keeps_overhead(tmp_path: Path) -> None:
    entry = {k: v for k, v in ENGINE["ours_r1_distill_qwen_32b"].items()}
    points = synthetic(load_points([write(tmp_path, "one.json", entry)]), TRUE)
    start = Efficiency(step_overhead_s=TRUE.step_overhead_s)
    result = fit(points, start)
    assert result.fitted.memory_bandwidth == pytest.approx(TRUE.memory_bandwidth, abs=1e-3)
    assert result.fitted.step_overhead_s == TRUE.step_overhead_s
    assert any("step_overhead_s kept" in n for n in result.notes)
    assert any("prefill_flops kept" in n for n in result.notes)


def test_fit_recovers_factors_through_the_serving_model(tmp_path: Path) -> None:
    """A bench report's TTFT (p99, with queueing) and TPOT (with prefill interference)."""
    points = load_points([write(tmp_path, "report.json", bench_report())])
    assert [p.fits for p in points] == ["prefill", "decode", None]
    points = synthetic(points, TRUE)
    result = fit(points, Efficiency(step_overhead_s=TRUE.step_overhead_s))
    assert result.fitted.prefill_flops == pytest.approx(TRUE.prefill_flops, abs=2e-3)
    assert result.fitted.memory_bandwidth == pytest.approx(TRUE.memory_bandwidth, abs=2e-3)


def test_fit_clamps_to_sane_ranges(tmp_path: Path) -> None:
    points = load_points([write(tmp_path, "engine.json", ENGINE)])
    slow = [replace(p, measured=p.measured * 50) for p in points]
    result = fit(slow, Efficiency())
    assert result.fitted.prefill_flops == 0.1 and result.fitted.memory_bandwidth >= 0.3
    assert 0 <= result.fitted.step_overhead_s <= 0.02
    assert any("clamped" in n for n in result.notes)


def test_cli_engine_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cal.json"
    assert main(["plan", "--calibrate", write(tmp_path, "engine.json", ENGINE), "--calibration-out", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("TTFT ms", "TPOT ms", "output tok/s", "planned before", "planned after", "prefill_flops",
                 "memory_bandwidth", "step_overhead_s", "r1-distill-qwen-32b"):
        assert word in text
    assert "prefill_bs1_len2048" not in text  # the peer (transformers) entry is not our engine
    eff = load_calibration(out)  # the written file is what --calibration reads
    assert 0.6 < eff.prefill_flops < 0.7 and 0.7 < eff.memory_bandwidth < 0.9
    assert set(json.loads(out.read_text())) == {"prefill_flops", "memory_bandwidth", "step_overhead_s"}


def test_cli_bench_report_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "report.json", bench_report())
    assert main(["plan", "--calibrate", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["metric"] for r in out["points"]] == ["TTFT ms (p99)", "TPOT ms (median)", "output tok/s"]
    ttft = out["points"][0]
    assert ttft["measured"] == 60.0 and ttft["error_after_pct"] == pytest.approx(0, abs=0.5)
    assert "1x h200" in ttft["workload"] and "8 concurrent, 512/256 tok" in ttft["workload"]
    assert set(out["factors"]) == {"prefill_flops", "memory_bandwidth", "step_overhead_s"}


def test_cli_prints_calibration_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--calibrate", write(tmp_path, "r.json", bench_report()), "--gpu", "h100"]) == 0
    text = capsys.readouterr().out
    assert "H100" in text or "h100" in text
    tail = text[text.rindex("{"):]
    assert set(json.loads(tail)) >= {"prefill_flops", "memory_bandwidth", "step_overhead_s"}


def _bad(tmp_path: Path, data: object) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("data, needle", [
    ({"schema": "r1deploy-bench/1", "config": {"model": "r1-distill-qwen-7b"}, "summary": {"median_tpot_ms": 5.0},
      "telemetry": {"gpus": ["NVIDIA H200"]}}, "input_len"),
    ({"schema": "r1deploy-bench/1", "config": {"input_len": 128}, "summary": {"median_tpot_ms": 5.0}}, "model"),
    ({"schema": "r1deploy-bench/1", "config": {"model": "r1-distill-qwen-7b", "input_len": 128},
      "summary": {"median_tpot_ms": 5.0}, "telemetry": {"gpus": []}}, "--gpu"),
    ({"schema": "r1deploy-bench/1", "config": {"model": "r1-distill-qwen-7b", "input_len": 128},
      "summary": {}, "telemetry": {"gpus": ["NVIDIA H200"]}}, "summary has none"),
    ({"schema": "r1deploy-bench/1", "config": {"model": "no-such-model", "input_len": 128},
      "summary": {"median_tpot_ms": 5.0}, "telemetry": {"gpus": ["NVIDIA H200"]}}, "unknown model"),
    ({"ours": {"shape": "no-such-model", "gpu": "NVIDIA H200", "ttft_2048_ms": 40.0}}, "unknown model"),
    ({"ours": {"shape": "r1-distill-qwen-7b", "gpu": "NVIDIA Z9000", "ttft_2048_ms": 40.0}}, "not in the planner"),
    ({"ours": {"shape": "r1-distill-qwen-7b", "gpu": "NVIDIA H200", "ttft_2048_ms": -1}}, "positive number"),
    ({"something": 1}, "neither a bench report"),
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
])
def test_bad_files_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: object,
                                        needle: str) -> None:
    assert main(["plan", "--calibrate", _bad(tmp_path, data)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err


def test_missing_file_and_stray_flag_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--calibrate", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["plan", "--calibration-out", str(tmp_path / "x.json")]) == 2
    assert "--calibrate" in capsys.readouterr().err


def test_shipped_h200_calibration_loads() -> None:
    path = Path(__file__).resolve().parents[2] / "r1deploy" / "plan" / "calibration_h200.json"
    eff = load_calibration(path)
    assert eff != Efficiency() and eff.decode_flops == Efficiency().decode_flops
