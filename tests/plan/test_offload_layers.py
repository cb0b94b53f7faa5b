"""Layer offload on one GPU + host memory (`r1deploy plan --offload layers`): the runtime's budget split and a
decode step of max(GPU step, streamed bytes / PCIe)."""

from __future__ import annotations

import json

import pytest

from r1deploy.cli import main
from r1deploy.plan.catalog import GB, Catalog
from r1deploy.plan.offload import layer_bytes, plan_layer_offload
from r1deploy.plan.planner import build_settings

H200 = Catalog.load().get("h200")


def test_70b_on_one_h200_with_60gb_budget() -> None:
    s = build_settings("r1-distill-llama-70b", concurrency=1, input_len=1024, output_len=1024)
    o = plan_layer_offload(s, H200, 60)
    layers, nonlayer = layer_bytes(s)
    assert o.num_layers == 80 and len(set(layers)) == 1  # dense: every layer alike
    each = layers[0]
    assert 1.6e9 < each < 1.8e9 and 3.5e9 < nonlayer < 5e9  # bf16: 8192 x (4 x 8192 + 2 x 1024) + 3 x 8192 x 28672
    # The most leading layers with the non-layer weights and a 2-slot ring under 60 GB, and nothing more.
    k = o.resident_layers
    assert nonlayer + k * each + 2 * each <= 60 * GB < nonlayer + (k + 1) * each + 2 * each
    assert o.streamed_layers == 80 - k and o.streamed_bytes_per_step == (80 - k) * each
    pcie = H200.pcie_gb_s / 2 * GB
    assert o.copy_s == pytest.approx(o.streamed_bytes_per_step / pcie)
    assert o.step_s == pytest.approx(max(o.gpu_step_s, o.copy_s) + s.eff.step_overhead_s)
    assert o.bound == "pcie" and o.decode_tokens_per_s == pytest.approx(1 / o.step_s)
    # Bounded by PCIe: at most one step per copy of the streamed bytes; here ~0.75 tok/s at 64 GB/s.
    assert o.decode_tokens_per_s <= pcie / o.streamed_bytes_per_step
    assert 0.5 < o.decode_tokens_per_s < 1.0
    assert o.feasible and o.kv_budget_bytes > o.kv_needed_bytes and o.host_pinned_bytes == o.streamed_bytes_per_step


def test_more_budget_or_pcie_never_slower_and_everything_resident_is_the_roofline() -> None:
    s = build_settings("r1-distill-llama-70b", concurrency=4, input_len=512, output_len=512)
    speeds = [plan_layer_offload(s, H200, gb).decode_tokens_per_s for gb in (20, 40, 60, 80, 100, 120)]
    assert speeds == sorted(speeds)
    assert (plan_layer_offload(s, H200, 60, pcie_gbs=128).decode_tokens_per_s
            > plan_layer_offload(s, H200, 60).decode_tokens_per_s)
    full = plan_layer_offload(s, H200, 150)  # all 141 GB resident (no KV room left: infeasible, same step)
    assert full.streamed_layers == 0 and full.copy_s == 0 and full.bound == "gpu"
    assert full.step_s == pytest.approx(full.gpu_step_s + s.eff.step_overhead_s)


def test_deepseek_dense_layers_first_stay_resident() -> None:
    s = build_settings("deepseek-r1", concurrency=1, input_len=512, output_len=512)
    layers, _ = layer_bytes(s)
    assert layers[:3] == [layers[0]] * 3 and layers[3] > 10 * layers[0]  # 3 dense layers, then MoE (FP8)
    o = plan_layer_offload(s, H200, 100)
    assert o.resident_layers >= 3 and o.slot_bytes == layers[3]


def test_budget_below_the_ring_is_infeasible() -> None:
    s = build_settings("r1-distill-llama-70b", concurrency=1, input_len=512, output_len=512)
    o = plan_layer_offload(s, H200, 5)
    assert not o.feasible and "ring" not in (o.problem or "") and "layer slots" in (o.problem or "")


def test_cli_prints_and_emits_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "r1-distill-llama-70b", "--offload", "layers", "--gpu-weight-budget", "60", "--concurrency", "1"]
    assert main([*argv, "--json"]) == 0
    o = json.loads(capsys.readouterr().out)["offload"]
    assert o["mode"] == "layers" and o["gpu"] == "h200" and o["bound"] == "pcie"
    assert o["decode_tokens_per_s"] * o["streamed_bytes_per_step"] <= o["pcie_bytes_per_s_one_direction"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Layer offload" in out and "decode tokens/s" in out and "pcie-bound" in out
    try:
        code = main(["plan", "r1-distill-llama-70b", "--offload", "layers", "--gpu-weight-budget", "5",
                     "--concurrency", "1"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "no feasible layer-offload plan" in capsys.readouterr().err
