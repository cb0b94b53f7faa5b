"""Hand-checked numbers: parameter counts, weight bytes, KV bytes per token, fewest GPUs."""

from __future__ import annotations

import json

import pytest

from r1deploy.errors import UsageError
from r1deploy.plan.catalog import Catalog
from r1deploy.plan.memory import kv_bytes_per_token, weights_bytes_total
from r1deploy.plan.model_spec import load_model
from r1deploy.plan.parallel import valid_tp_sizes
from r1deploy.plan.planner import make_plan, plan_deployment
from r1deploy.plan.precision import Precision, make_precision
from r1deploy.presets import PRESET_DIR, preset_names

# Published totals (HF model cards / DeepSeek READMEs), in billions.
PUBLISHED = {
    "r1-distill-qwen-1.5b": 1.78, "r1-distill-qwen-7b": 7.62, "r1-distill-qwen-14b": 14.8,
    "r1-distill-qwen-32b": 32.8, "r1-distill-llama-8b": 8.03, "r1-distill-llama-70b": 70.6,
    "deepseek-v2-lite": 15.7,
}
KV_BF16 = {
    "deepseek-r1": 70_272, "deepseek-v3": 70_272, "r1-distill-qwen-1.5b": 28_672, "r1-distill-qwen-7b": 57_344,
    "r1-distill-llama-8b": 131_072, "r1-distill-qwen-14b": 196_608, "r1-distill-qwen-32b": 262_144,
    "r1-distill-llama-70b": 327_680,
}


def test_all_presets_ship_as_hf_configs() -> None:
    assert set(preset_names()) == {"deepseek-r1", "deepseek-v3", "deepseek-v2-lite", *PUBLISHED}
    for name in preset_names():
        config = json.loads((PRESET_DIR / f"{name}.json").read_text())
        for key in ("architectures", "model_type", "torch_dtype", "bos_token_id", "eos_token_id", "vocab_size"):
            assert key in config, (name, key)
    r1 = json.loads((PRESET_DIR / "deepseek-r1.json").read_text())
    assert r1["quantization_config"]["weight_block_size"] == [128, 128]
    assert r1["rope_scaling"]["factor"] == 40


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name: str) -> None:
    assert load_model(name).total_params / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)


def test_r1_params_main_mtp_active() -> None:
    m = load_model("r1")
    assert m.total_params / 1e9 == pytest.approx(671, rel=0.005)
    assert m.checkpoint_params / 1e9 == pytest.approx(685, rel=0.01)  # HF "685B" = main + MTP
    assert 11.5e9 < m.mtp_params < 15e9
    assert 36.7e9 < m.active_params < 38e9  # README "37B"
    assert m.num_dense_layers == 3 and m.num_moe_layers == 58


@pytest.mark.parametrize("name", sorted(KV_BF16))
def test_kv_bytes_per_token(name: str) -> None:
    m = load_model(name)
    assert kv_bytes_per_token(m, Precision("bf16", "bf16")) == KV_BF16[name]
    assert kv_bytes_per_token(m, Precision("bf16", "fp8")) == KV_BF16[name] // 2


def test_r1_weight_bytes() -> None:
    m = load_model("deepseek-r1")
    fp8 = weights_bytes_total(m, make_precision(None, "auto", None, m.checkpoint_weights, 0))
    assert 672e9 <= fp8 <= 674e9  # 1 B/weight + fp32 128x128 scales + 16-bit embeddings/head/routers
    bf16 = weights_bytes_total(m, Precision("bf16", "bf16"))
    assert bf16 / 1e9 == pytest.approx(1342, rel=0.002)
    awq = weights_bytes_total(m, Precision("awq", "bf16", 128))
    assert awq / (m.total_params - m.embedding_params - m.lm_head_params) == pytest.approx(4.156 / 8, rel=0.02)


def test_fp8_scale_grid_uses_ceil() -> None:
    p = Precision("fp8", "bf16")
    assert p.linear_bytes(576, 7168) == 576 * 7168 + 5 * 56 * 4  # kv_a_proj_with_mqa: 5x56 scales


def test_fewest_gpus_for_r1_fp8() -> None:
    for gpu, expected in (("h200", 8), ("h100", 16)):
        d = plan_deployment("deepseek-r1", gpu)
        assert d["deployment"]["num_gpus"] == expected
        assert d["memory"]["kv_budget_bytes_per_gpu"] > 10e9  # room for a real KV cache


def test_mla_kv_not_split_by_tp_but_dp_attention_grows_capacity() -> None:
    plain = make_plan("deepseek-r1", "h200", num_gpus=8, tp=8, ep=8, dp_attention=False).chosen.memory
    dp = make_plan("deepseek-r1", "h200", num_gpus=8, tp=8, dp_attention=True).chosen.memory
    assert plain.kv_bytes_per_token_gpu == 70_272
    # Same KV per token per GPU; DP-attention holds each request once, so capacity x8 per byte of budget.
    assert dp.kv_capacity_tokens / dp.kv_budget_bytes == pytest.approx(8 * plain.kv_capacity_tokens
                                                                         / plain.kv_budget_bytes, rel=1e-3)


def test_gqa_kv_split_by_tp_and_replicated_past_kv_heads() -> None:
    m = load_model("r1-distill-llama-70b")  # 8 KV heads
    tp2 = make_plan("r1-distill-llama-70b", "h100", num_gpus=2, tp=2, weights="fp8", concurrency=16).chosen.memory
    tp16 = make_plan("r1-distill-llama-70b", "h100", num_gpus=16, tp=16, concurrency=1).chosen.memory
    assert tp2.kv_bytes_per_token_gpu == 327_680 // 2
    assert tp16.kv_bytes_per_token_gpu == 327_680 // 8  # one whole KV head per GPU
    assert m.num_kv_heads == 8


def test_valid_tp_sizes() -> None:
    assert valid_tp_sizes(load_model("deepseek-r1"), 16) == [1, 2, 4, 8, 16]
    assert valid_tp_sizes(load_model("r1-distill-qwen-1.5b"), 16) == [1, 2, 4, 6, 12]  # 12 heads, 2 KV heads
    assert valid_tp_sizes(load_model("r1-distill-qwen-7b"), 8) == [1, 2, 4]  # 28 heads


def test_ampere_fp8_is_weight_only() -> None:
    plan = make_plan("deepseek-r1", "a100-80gb")
    d = plan.to_dict()
    assert d["deployment"]["fp8_compute"] is False and d["precision"]["compute"] == "bf16"
    assert any("weight-only" in n for n in d["notes"])


def test_slo_search_is_cheapest_feasible() -> None:
    d = plan_deployment("r1-distill-qwen-7b", None, slo_ttft_ms=2000, slo_tpot_ms=50, concurrency=8)
    assert d["deployment"]["searched_catalog"]
    assert d["performance"]["tpot_s"] <= 0.05 and d["performance"]["ttft_s"] <= 2.0
    cheapest = min(g.price_usd_per_hour for g in Catalog.load())
    assert d["cost"]["usd_per_hour"] >= cheapest


def test_request_rate_matches_littles_law() -> None:
    d = plan_deployment("r1-distill-qwen-7b", "h100", request_rate=2.0, input_len=1000, output_len=500)
    p = d["performance"]
    assert p["request_rate"] == pytest.approx(2.0)
    assert p["output_tokens_per_s"] == pytest.approx(2.0 * 500)


def test_decode_memory_bound_at_batch_one_matches_bandwidth_floor() -> None:
    plan = make_plan("r1-distill-qwen-7b", "h200", num_gpus=1, concurrency=1, input_len=128, output_len=128)
    dec = plan.chosen.perf.decode
    assert dec.bound == "memory"
    assert dec.memory_s == pytest.approx(15.2e9 / (4.8e12 * 0.8), rel=0.05)


def test_calibration_and_price_and_gpu_files(tmp_path) -> None:
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"memory_bandwidth": 0.4}))
    slow = plan_deployment("r1-distill-qwen-7b", "h100", num_gpus=1, calibration=str(cal))
    fast = plan_deployment("r1-distill-qwen-7b", "h100", num_gpus=1)
    assert slow["performance"]["tpot_s"] > fast["performance"]["tpot_s"]
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"h100": 1.0}))
    assert plan_deployment("r1-distill-qwen-7b", "h100", price_file=str(prices))["cost"]["usd_per_gpu_hour"] == 1.0
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps({"my-gpu": {"arch": "hopper", "memory_gib": 64, "memory_bandwidth_tb_s": 2,
                                           "bf16_tflops": 500, "fp8_tflops": 1000, "price_usd_per_hour": 1}}))
    assert plan_deployment("r1-distill-qwen-7b", "my-gpu", gpu_file=str(gpus))["deployment"]["gpu"] == "my-gpu"
    cal.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(UsageError, match="unknown keys"):
        plan_deployment("r1-distill-qwen-7b", "h100", calibration=str(cal))


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "gpt-5"}, "deepseek-r1"),
    ({"gpu": "tpu-v5"}, "h200"),
    ({"tp": 3}, "valid: 1, 2, 4, 8"),
    ({"concurrency": 4, "request_rate": 1.0}, "not both"),
    ({"gpu": "h100", "num_gpus": 8}, "would fit: 16x h100-sxm"),
    ({"model": "r1-distill-qwen-7b", "dp_attention": True}, "MLA"),
    ({"model": "r1-distill-qwen-7b", "ep": 2}, "dense"),
    ({"max_model_len": 10**6}, "max_position_embeddings"),
    ({"weights": "bf16", "group_size": 64}, "awq or gptq"),
])
def test_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_deployment(**kwargs)


def test_config_missing_keys_named(tmp_path) -> None:
    config = json.loads((PRESET_DIR / "r1-distill-qwen-7b.json").read_text())
    del config["hidden_size"], config["vocab_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UsageError, match="hidden_size, vocab_size"):
        plan_deployment(str(tmp_path))
