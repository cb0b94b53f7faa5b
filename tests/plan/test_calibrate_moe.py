"""MoE/MLA calibration: the reduced-depth DeepSeek reader, the separate fit, the shipped 'moe' section."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from r1deploy.cli import main
from r1deploy.plan.calibrate import fit_families, fit_moe, load_points
from r1deploy.plan.model_spec import layer_overrides, load_model
from r1deploy.plan.planner import build_settings
from r1deploy.plan.roofline import Efficiency, calibration_family, load_calibration

SHIPPED = Path(__file__).resolve().parents[2] / "r1deploy" / "plan" / "calibration_h200.json"

LAYERS = {  # benchmarks/results/h200_r1_layers.json, trimmed to what the reader uses
    "command": "benchmarks/h200_deepseek.py --sweep", "gpu": "NVIDIA H200",
    "kernels": [{"kernel": "fp8_gemm", "M": 16}],
    "models": [
        {"dense_layers": 1, "moe_layers": 0, "weights": "fp8 (config)", "decode_bs1_step_ms": 0.8357,
         "decode_bs32_step_ms": 1.1039, "decode_bs256_step_ms": 2.7727, "prefill_2048_ms": 19.822,
         "peak_memory_GiB": 11.4},
        {"dense_layers": 3, "moe_layers": 0, "weights": "fp8 (config)", "decode_bs1_step_ms": 1.6345,
         "decode_bs32_step_ms": 2.3644, "decode_bs256_step_ms": 6.7969, "prefill_2048_ms": 58.662},
        {"dense_layers": 3, "moe_layers": 8, "weights": "fp8 (config)", "decode_bs1_step_ms": 6.7689,
         "decode_bs32_step_ms": 28.317, "decode_bs256_step_ms": 58.363, "prefill_2048_ms": 260.39},
    ],
    "per_layer": {"decode_bs1_step_ms": {"base_ms": 0.436}},
}
TRUE = Efficiency(prefill_flops=0.2, decode_flops=0.3, memory_bandwidth=0.6, step_overhead_s=0.0004,
                  layer_overhead_s=0.0002, embedding_read=0.0)


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def sq_log_error(points: list, eff: Efficiency) -> float:
    return sum(math.log(p.predict(eff) / p.measured) ** 2 for p in points)


def test_layer_overrides_give_reduced_depth_specs() -> None:
    full = load_model("deepseek-r1")
    assert (full.num_dense_layers, full.num_moe_layers, full.num_mtp_layers) == (3, 58, 1)
    assert load_model("deepseek-r1", None) == full  # the default API is unchanged
    for dense, moe in ((1, 0), (3, 0), (3, 8)):
        m = load_model("deepseek-r1", layer_overrides(dense, moe))
        assert (m.num_dense_layers, m.num_moe_layers, m.num_mtp_layers) == (dense, moe, 0)
        assert m.hidden_size == full.hidden_size and m.n_routed_experts == 256 and m.mla
        assert calibration_family(m) == "moe"
    assert calibration_family(load_model("r1-distill-qwen-7b")) == "dense"


def test_reader_of_reduced_depth_file(tmp_path: Path) -> None:
    points = load_points([write(tmp_path, "layers.json", LAYERS)])
    assert len(points) == 12 and {p.family for p in points} == {"moe"}
    assert [p.workload for p in points[:4]] == ["decode batch 1, context 1024", "decode batch 32, context 1024",
                                                "decode batch 256, context 1024", "prefill 2048 tok, batch 1"]
    assert [p.fits for p in points[:4]] == ["decode", "decode", "decode", "prefill"]
    assert points[-1].model == "deepseek-r1 3d+8m" and points[-1].measured == 260.39
    eff = Efficiency()
    by = {(p.model, p.workload): p.predict(eff) for p in points}
    # deeper models and bigger batches take longer; the MoE model reads more experts at batch 32 than at 1
    assert by[("deepseek-r1 3d+0m", "decode batch 1, context 1024")] > by[("deepseek-r1 1d+0m",
                                                                              "decode batch 1, context 1024")]
    moe1, moe32 = (by[("deepseek-r1 3d+8m", f"decode batch {b}, context 1024")] for b in (1, 32))
    assert moe32 > 3 * moe1


def test_fit_recovers_known_moe_factors(tmp_path: Path) -> None:
    points = [replace(p, measured=p.predict(TRUE)) for p in load_points([write(tmp_path, "l.json", LAYERS)])]
    result = fit_moe(points, Efficiency())
    for name in ("prefill_flops", "decode_flops", "memory_bandwidth"):
        assert getattr(result.fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.02), name
    for p in points:
        assert p.predict(result.fitted) == pytest.approx(p.measured, rel=0.02)


def test_fit_reduces_error_on_the_measured_points(tmp_path: Path) -> None:
    points = load_points([write(tmp_path, "l.json", LAYERS)])
    result = fit_families(points, {"dense": Efficiency(), "moe": Efficiency()})
    assert set(result) == {"moe"}
    fitted = result["moe"].fitted
    for kind in ("prefill", "decode"):
        group = [p for p in points if p.fits == kind]
        assert sq_log_error(group, fitted) < 0.5 * sq_log_error(group, Efficiency()), kind


def test_shipped_file_keeps_dense_fit_and_adds_moe_section() -> None:
    data = json.loads(SHIPPED.read_text())
    dense = {k: v for k, v in data.items() if k != "moe"}
    # the dense fit (h200_dense.json + h200_quant_awq.json; test_calibrate_int4.py checks its numbers)
    # ... and NCCL's measured all-reduce floor (h200_tp.json), for every family
    assert set(dense) == {"prefill_flops", "memory_bandwidth", "step_overhead_s", "int4_read", "int4_multirow",
                          "intranode_latency_s"}
    assert load_calibration(SHIPPED) == replace(Efficiency(), **dense)  # dense models: unchanged
    moe = load_calibration(SHIPPED, "moe")
    # the top level (the INT4 kernels' factors too) overridden by the "moe" section
    assert moe == replace(Efficiency(), **{**dense, **data["moe"]}) and moe != load_calibration(SHIPPED)
    # the planner picks the section by model; without --calibration nothing changes (opt-in, as before)
    assert build_settings("deepseek-r1", calibration=str(SHIPPED)).eff == moe
    assert build_settings("r1-distill-qwen-7b", calibration=str(SHIPPED)).eff == load_calibration(SHIPPED)
    assert build_settings("deepseek-r1").eff == Efficiency()


def test_shipped_moe_fit_reproduces_the_runs_better(tmp_path: Path) -> None:
    points = load_points([write(tmp_path, "l.json", LAYERS)])
    cal = load_calibration(SHIPPED, "moe")
    assert sq_log_error(points, cal) < 0.3 * sq_log_error(points, Efficiency())


def test_cli_writes_moe_section_and_keeps_dense_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cal.json"
    args = ["plan", "--calibrate", write(tmp_path, "l.json", LAYERS), "--calibration", str(SHIPPED),
            "--calibration-out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "deepseek-r1 3d+8m" in text and "layer_overhead_s" in text
    written = json.loads(out.read_text())
    assert {k: v for k, v in written.items() if k != "moe"} == {
        k: v for k, v in json.loads(SHIPPED.read_text()).items() if k != "moe"}
    assert set(written["moe"]) >= {"prefill_flops", "decode_flops", "memory_bandwidth", "layer_overhead_s"}


def test_bad_moe_section_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cal = write(tmp_path, "cal.json", {"memory_bandwidth": 0.8, "moe": {"memory_bandwith": 0.5}})
    assert main(["plan", "--calibration", cal]) == 2
    assert "unknown keys" in capsys.readouterr().err
