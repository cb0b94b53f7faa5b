"""The roofline terms issue 21 added: fixed latency per FP8 MoE layer, grouped-GEMM and FP8 GEMM shares of MFU,
last-row prefill logits, speculative verify steps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from r1deploy.plan.catalog import Catalog
from r1deploy.plan.model_spec import layer_overrides, load_model
from r1deploy.plan.parallel import Layout
from r1deploy.plan.precision import make_precision
from r1deploy.plan.roofline import Efficiency, StageCost, decode_stage, prefill_stage, stage_cost

H200 = Catalog.load(None, None).get("h200")
DEFAULTS = Efficiency()


def cost_of(name: str, tp: int = 1, weights: str | None = None, overrides: dict | None = None,
            eff: Efficiency = DEFAULTS) -> StageCost:
    m = load_model(name, overrides)
    p = make_precision(weights, "auto", None, m.checkpoint_weights, m.checkpoint_group_size)
    return stage_cost(m, p, Layout(tp, tp, 1, tp, False, 8), H200, eff)


def test_fp8_moe_layer_latency_counts_fp8_moe_layers_and_ignores_tp() -> None:
    eff = replace(Efficiency(), fp8_moe_layer_overhead_s=4e-4)
    r1 = {"overrides": layer_overrides(3, 8), "eff": eff}
    one, two = cost_of("deepseek-r1", 1, **r1), cost_of("deepseek-r1", 2, **r1)
    assert decode_stage(one, 1, 1024).fixed_s == pytest.approx(8 * 4e-4)
    assert decode_stage(two, 1, 1024).fixed_s == pytest.approx(8 * 4e-4)  # TP does not divide a latency
    assert decode_stage(cost_of("deepseek-r1", 1, "bf16", **r1), 1, 1024).fixed_s == 0.0  # bf16 experts
    assert decode_stage(cost_of("deepseek-v2-lite", eff=eff), 1, 1024).fixed_s == 0.0


def test_grouped_gemm_and_fp8_shares_slow_only_their_part() -> None:
    r1 = layer_overrides(3, 8)
    base = prefill_stage(cost_of("deepseek-r1", overrides=r1), 2048).compute_s
    slow_moe = prefill_stage(cost_of("deepseek-r1", overrides=r1, eff=replace(Efficiency(), moe_flops=0.5)), 2048)
    dense_only = layer_overrides(3, 0)
    assert slow_moe.compute_s > base
    assert prefill_stage(cost_of("deepseek-r1", overrides=dense_only, eff=replace(Efficiency(), moe_flops=0.5)),
                         2048).compute_s == pytest.approx(prefill_stage(cost_of("deepseek-r1", overrides=dense_only),
                                                                        2048).compute_s)
    fp8_slow = replace(Efficiency(), fp8_flops=0.5)
    assert prefill_stage(cost_of("deepseek-r1", overrides=r1, eff=fp8_slow), 2048).compute_s > base
    bf16 = cost_of("r1-distill-qwen-7b")
    assert prefill_stage(replace(bf16, eff=fp8_slow), 2048).compute_s == pytest.approx(
        prefill_stage(bf16, 2048).compute_s)  # no FP8 linears: unchanged


def test_prefill_logits_last_row_only() -> None:
    r1 = cost_of("deepseek-r1", overrides=layer_overrides(1, 0))
    r1_last = replace(r1, eff=replace(Efficiency(), prefill_logits=0.0))
    every, last = prefill_stage(r1, 2048), prefill_stage(r1_last, 2048)
    # 2 x 2047 rows x 129,280 x 7,168 fewer FLOPs: R1's logits GEMM
    assert every.flops - last.flops == pytest.approx(2 * 2047 * 129280 * 7168, rel=1e-6)
    assert decode_stage(r1, 8, 1024).flops == decode_stage(r1_last, 8, 1024).flops  # decode samples every row


def test_verify_step_reads_kv_once_for_all_query_tokens() -> None:
    c = cost_of("r1-distill-qwen-7b")
    one, four = decode_stage(c, 8, 2048), decode_stage(c, 8, 2048, query_tokens=4)
    assert four.flops > 3.5 * one.flops  # linear and attention FLOPs per query token
    assert four.bytes == pytest.approx(one.bytes)  # weights and KV read once
