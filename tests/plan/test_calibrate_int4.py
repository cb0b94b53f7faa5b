"""INT4 (awq/gptq) decode: dequantising kernels below copy bandwidth, the AWQ run reader and its fit, and the
shipped calibration against the committed H200 AWQ run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from r1deploy.cli import main
from r1deploy.plan.calibrate import FITTED_INT4, fit, load_points
from r1deploy.plan.catalog import Catalog
from r1deploy.plan.model_spec import load_model
from r1deploy.plan.parallel import Layout
from r1deploy.plan.planner import make_plan
from r1deploy.plan.precision import make_precision
from r1deploy.plan.roofline import Efficiency, decode_stage, load_calibration, stage_cost

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "r1deploy" / "plan" / "calibration_h200.json"
AWQ_RUN = ROOT / "benchmarks" / "results" / "h200_quant_awq.json"
MEASURED = json.loads(AWQ_RUN.read_text())["awq"]
TOLERANCE = 0.15


def step_ms(weights: str, batch: int, eff: Efficiency) -> float:
    """The 7B's decode step on one H200 (no step overhead), prompt 128 + 128 of 256 new tokens."""
    model = load_model("r1-distill-qwen-7b")
    precision = make_precision(weights, "auto", None, model.checkpoint_weights, model.checkpoint_group_size)
    cost = stage_cost(model, precision, Layout(1, 1, 1, 1, False, 8), Catalog.load(None, None).get("h200"), eff)
    return decode_stage(cost, batch, 256).total_s * 1e3


def test_reader_of_awq_run() -> None:
    points = load_points([str(AWQ_RUN)])
    assert [(p.model, p.metric, p.fits) for p in points] == [
        ("r1-distill-qwen-7b bf16", "TPOT ms", "decode"),
        ("r1-distill-qwen-7b bf16", "output tok/s", None),
        ("r1-distill-qwen-7b bf16", "output tok/s", None),
        ("r1-distill-qwen-7b awq", "TPOT ms", "int4_read"),
        ("r1-distill-qwen-7b awq", "output tok/s", "int4_multirow"),
        ("r1-distill-qwen-7b awq", "output tok/s", "int4_multirow"),
    ]
    assert points[3].measured == MEASURED["awq_decode_bs1_median_step_ms"]
    assert "8 running" in points[5].workload  # the benchmark's engine runs 8 sequences at a time


def test_int4_reads_below_copy_bandwidth_and_tiles_no_faster_than_a_floor() -> None:
    eff = Efficiency()
    # one row: 4x fewer bytes, read at int4_read of the 16-bit rate -> faster than bf16, by less than 4x
    assert 1.3 < step_ms("bf16", 1, eff) / step_ms("awq", 1, eff) < 3
    # the default floor (0.25) does not bind: several rows cost what the packed bytes cost
    assert step_ms("awq", 4, eff) == pytest.approx(step_ms("awq", 1, eff), rel=0.05)
    # a floor of 1: INT4 beyond one row is no faster than bf16; one row keeps the GEMV's rate
    slow_tiles = replace(eff, int4_multirow=1.0)
    assert step_ms("awq", 4, slow_tiles) >= step_ms("bf16", 4, slow_tiles)
    assert step_ms("awq", 1, slow_tiles) == step_ms("awq", 1, eff)
    assert step_ms("bf16", 4, slow_tiles) == step_ms("bf16", 4, eff)  # 16-bit weights do not care


def test_fit_recovers_known_int4_factors() -> None:
    true = load_calibration(SHIPPED)
    true = replace(true, int4_read=0.45, int4_multirow=0.95)
    points = [replace(p, measured=p.predict(true)) for p in load_points([str(AWQ_RUN)])]
    fitted = fit(points, replace(true, int4_read=0.5, int4_multirow=0.25)).fitted  # the defaults' int4 values
    assert fitted.int4_read == pytest.approx(true.int4_read, abs=2e-3)
    assert fitted.int4_multirow == pytest.approx(true.int4_multirow, abs=2e-3)


@pytest.mark.parametrize("label, workload, key", [
    ("bf16", "decode batch 1,", "bf16_decode_bs1_median_step_ms"),
    ("awq", "decode batch 1,", "awq_decode_bs1_median_step_ms"),
    ("awq", "4 prompts at once", "awq_decode_bs4_out_tok_s"),
    ("awq", "16 prompts at once", "awq_decode_bs16_out_tok_s"),
])
def test_shipped_calibration_within_15_percent_of_the_awq_run(label: str, workload: str, key: str) -> None:
    point = next(p for p in load_points([str(AWQ_RUN)]) if p.model.endswith(label) and p.workload.startswith(workload))
    assert point.measured == MEASURED[key]
    assert point.predict(load_calibration(SHIPPED)) == pytest.approx(MEASURED[key], rel=TOLERANCE)


@pytest.mark.parametrize("weights", ["bf16", "awq"])
def test_calibrated_plan_batch1_tpot_within_15_percent(weights: str) -> None:
    """What `r1deploy plan ... --concurrency 1 --calibration calibration_h200.json` reports (queueing included)."""
    plan = make_plan("r1-distill-qwen-7b", "h200", weights=weights, concurrency=1, input_len=128, output_len=256,
                     calibration=str(SHIPPED))
    assert plan.chosen.perf.tpot_s * 1e3 == pytest.approx(MEASURED[f"{weights}_decode_bs1_median_step_ms"],
                                                          rel=TOLERANCE)


def test_cli_writes_int4_factors_only_when_fitted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cal.json"
    assert main(["plan", "--calibrate", str(AWQ_RUN), "--calibration-out", str(out)]) == 0
    assert "int4_multirow" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(FITTED_INT4) <= set(written)
    assert load_calibration(out).int4_read == written["int4_read"]
