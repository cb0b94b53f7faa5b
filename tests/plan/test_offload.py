"""Expert offload on one GPU + host memory (`r1deploy plan --offload experts`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1deploy.cli import main
from r1deploy.errors import UsageError
from r1deploy.plan.catalog import GB, Catalog
from r1deploy.plan.offload import PCIE_COPY_EFFICIENCY, plan_offload
from r1deploy.plan.planner import build_settings
from r1deploy.plan.roofline import ACT_BYTES
from r1deploy.presets import resolve_config_path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

H200 = Catalog.load().get("h200")


def test_hand_computed_small_case() -> None:
    s = build_settings("deepseek-v2-lite", concurrency=1)
    m = s.model
    n = m.n_routed_experts * m.num_moe_layers
    o = plan_offload(s, H200, 0.0, pcie_gbs=32, host_bandwidth_gbs=100, host_tflops=1, cpu_compute="auto")
    each = o.expert_bytes_total / n
    k = m.num_experts_per_tok
    # B = 1: one token touches exactly k experts per layer; nothing resident, so every one misses.
    assert o.expert_slots == 0 and o.hit_rate == 0
    assert o.touched_per_layer == pytest.approx(k)
    assert o.misses_per_step == pytest.approx(k * m.num_moe_layers)
    assert o.copy_s_per_expert == pytest.approx(each / 32e9)
    params_each = m.routed_expert_params / n
    host = max(2 * params_each * 1 / 1e12, each / 100e9) + 2 * m.hidden_size * ACT_BYTES / 32e9
    assert o.host_s_per_expert == pytest.approx(host)
    per_miss = min(each / 32e9, host)
    assert o.step_s == pytest.approx(o.gpu_step_s + s.eff.step_overhead_s + k * m.num_moe_layers * per_miss)
    assert o.decode_tokens_per_s == pytest.approx(1 / o.step_s)
    # Half of the experts resident: half the misses.
    half = plan_offload(s, H200, o.expert_bytes_total / 2 / GB + 1e-6, pcie_gbs=32, host_bandwidth_gbs=100,
                        host_tflops=1, cpu_compute="auto")
    assert half.hit_rate == pytest.approx(0.5, abs=1e-3)
    assert half.misses_per_step == pytest.approx(k * m.num_moe_layers / 2, rel=1e-2)
    # All resident: no misses, the plain one-GPU roofline step.
    full = plan_offload(s, H200, o.expert_bytes_total / GB + 1)
    assert full.hit_rate == 1 and full.miss_s == 0 and full.step_s == pytest.approx(full.gpu_step_s + 0.002)


def test_miss_path_follows_the_engine_and_measured_pcie() -> None:
    """Misses are copied unless the engine is told to compute on the host (its default: never), and the
    default PCIe rate is the H200's measured share of the catalog's."""
    s = build_settings("deepseek-r1", concurrency=1)
    copy = plan_offload(s, H200, 45.0)
    host = plan_offload(s, H200, 45.0, cpu_compute="always")
    auto = plan_offload(s, H200, 45.0, cpu_compute="auto")
    assert copy.miss_path == "pcie_copy" and host.miss_path == "host_compute"
    assert copy.pcie_bytes_per_s_one_direction == pytest.approx(H200.pcie_gb_s / 2 * PCIE_COPY_EFFICIENCY * GB)
    assert auto.step_s == pytest.approx(min(copy.step_s, host.step_s))
    with pytest.raises(UsageError):
        plan_offload(s, H200, 45.0, cpu_compute="sometimes")


def test_r1_offload_prediction_against_the_h200_run(tmp_path: Path) -> None:
    """The measured run: R1 cut to 1 dense + 16 MoE layers in FP8, 4 layers' worth of expert slots, batch 1
    (benchmarks/results/h200_r1_offload.json). The planner's step, from the LRU hit rate and the measured PCIe
    share, must land within 25% of the measured step. Its hit rate is the share of expert uses resident
    before the step: the run counts a prefetched expert as a hit, but its bytes crossed PCIe all the same."""
    run = json.loads((RESULTS / "h200_r1_offload.json").read_text())
    case = run["offload"]
    raw = json.loads(resolve_config_path("r1").read_text())
    raw.update(num_hidden_layers=1 + case["moe_layers"], first_k_dense_replace=1, num_nextn_predict_layers=0)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    s = build_settings(str(tmp_path / "config.json"), weights="fp8", concurrency=1, input_len=run["prompt_len"],
                       output_len=run["batches"]["bs1"])
    o = plan_offload(s, H200, run["gpu_weight_budget_gb"])
    store = case["bs1"]["store"]
    resident_before_step = (store["hits"] - store["prefetch_hits"]) / (store["hits"] + store["misses"])
    assert o.hit_rate == pytest.approx(resident_before_step, abs=0.05)
    assert o.step_s == pytest.approx(case["bs1"]["median_step_ms"] / 1e3, rel=0.25)


@settings(max_examples=30, deadline=None)
@given(a=st.floats(0, 120), b=st.floats(0, 120), conc=st.integers(1, 16), overlap=st.floats(0, 1))
def test_more_budget_never_slower(a: float, b: float, conc: int, overlap: float) -> None:
    s = build_settings("deepseek-r1", concurrency=conc, input_len=512, output_len=512)
    lo, hi = sorted((a, b))
    slow = plan_offload(s, H200, lo, prefetch_overlap=overlap)
    fast = plan_offload(s, H200, hi, prefetch_overlap=overlap)
    assert fast.decode_tokens_per_s >= slow.decode_tokens_per_s * (1 - 1e-12)
    assert fast.hit_rate >= slow.hit_rate


def test_r1_on_one_h200_with_100gb_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--offload", "experts", "--gpu-weight-budget", "100", "--concurrency", "8", "--json"]) == 0
    o = json.loads(capsys.readouterr().out)["offload"]
    assert o["feasible"] and o["gpu"] == "h200"
    assert o["host_ram_bytes"] >= o["host_pinned_bytes"] >= o["experts_on_host_only_bytes"] > 500e9
    assert o["experts_on_host_only_bytes"] == pytest.approx(o["expert_bytes_total"] - 100e9, rel=0.01)
    assert 0 < o["hit_rate"] < 1 and o["decode_tokens_per_s"] > 0
    assert main(["plan", "--offload", "experts", "--gpu-weight-budget", "100", "--concurrency", "8"]) == 0
    assert "Expert offload" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--gpu-weight-budget", "100"], "needs --offload"),
    (["plan", "--host-bandwidth-gbs", "100"], "needs --offload"),
    (["plan", "--offload", "experts"], "needs --gpu-weight-budget"),
    (["plan", "--offload", "experts", "--gpu-weight-budget", "100"], "no feasible expert-offload plan"),
    (["plan", "--offload", "experts", "--gpu-weight-budget", "-1", "--concurrency", "1"], "must be positive"),
    (["plan", "--offload", "attention", "--gpu-weight-budget", "1"], "invalid choice"),
    (["plan", "--offload", "layers"], "--offload layers needs --gpu-weight-budget"),
    (["plan", "--offload", "layers", "--gpu-weight-budget", "60", "--host-tflops", "2"], "experts only"),
])
def test_offload_errors_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
