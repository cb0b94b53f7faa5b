"""`r1deploy bench --offload experts`: the in-process engine serves a MoE model's routed experts from the
tiered store, and the report carries the store's counters (hits, misses, hit rate, bytes moved, stall
time) over the measured phase, in report.json, the console summary and the HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_harness import run_bench

FAST = ["--no-progress", "--telemetry-interval", "0.05"]
TINY_DEEPSEEK = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "float32",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_group": 4,
    "topk_group": 2, "num_experts_per_tok": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "max_position_embeddings": 512,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}
EXPERT_BYTES = 3 * 64 * 32 * 4  # gate, up, down in fp32


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with a config.json and no weights: --load-format dummy."""
    pytest.importorskip("r1deploy.weights.tiered_store")
    path = tmp_path_factory.mktemp("tiny_deepseek")
    (path / "config.json").write_text(json.dumps(TINY_DEEPSEEK))
    return path


def test_offload_report_has_expert_store_statistics(config_only_dir: Path, tmp_path: Path, capsys) -> None:
    budget_gb = 3 * EXPERT_BYTES / 1e9  # 3 of the 16 routed experts (2 MoE layers x 8) fit on the "GPU"
    code = run_bench(["--engine", str(config_only_dir), "--load-format", "dummy", "--device", "cpu",
                      "--dtype", "float32", "--offload", "experts", "--gpu-weight-budget", str(budget_gb),
                      "--batch", "2", "--repeat", "2", "--seq", "8", "--output-len", "4", "--warmup", "1",
                      "--slo-profile", "none", "--out", str(tmp_path), *FAST])
    assert code == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    off = rep["expert_offload"]
    assert off["counted_from"] == "start of the measured phase"
    assert off["gpu_slots"] == 3 and off["host_slots"] == 16 and off["pinned_bytes"] == 0  # CPU: pageable
    assert off["misses"] > 0 and off["hits"] + off["misses"] > 0
    assert off["hit_rate"] == pytest.approx(off["hits"] / (off["hits"] + off["misses"]))
    # Every copy into a slot is one expert: get() misses (none computed on the host here) and prefetches.
    assert off["cpu_computes"] == 0 and off["disk_reads"] == 0
    assert off["bytes_to_device"] == (off["misses"] + off["prefetches"]) * EXPERT_BYTES
    assert off["bytes_to_device_per_output_token"] == pytest.approx(off["bytes_to_device"] / (4 * 4))
    assert off["stall_s"] > 0 and off["stall_ms_per_output_token"] == pytest.approx(1e3 * off["stall_s"] / 16)
    assert "experts offloaded: 3 GPU slots" in rep["config"]["target"]
    assert rep["config"]["offload"] == "experts"
    out = capsys.readouterr().out
    assert "expert offload" in out and "Hit rate (%)" in out and "Stall time (s)" in out
    assert "Expert offload" in (tmp_path / "report.html").read_text()


def test_offload_counters_follow_each_sweep_point(config_only_dir: Path, tmp_path: Path) -> None:
    budget_gb = 4 * EXPERT_BYTES / 1e9
    run_bench(["--engine", str(config_only_dir), "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
               "--offload", "experts", "--gpu-weight-budget", str(budget_gb), "--sweep-concurrency", "1,2",
               "--num-requests", "2", "--seq", "8", "--output-len", "3", "--warmup", "0",
               "--slo", "tpot:100000,ttft:100000", "--slo-profile", "none", "--out", str(tmp_path), *FAST])
    rep = json.loads((tmp_path / "report.json").read_text())
    points = rep["sweep"]["points"]
    assert all(p["expert_offload"]["hits"] + p["expert_offload"]["misses"] > 0 for p in points)
    chosen = next(p for p in points if p["load"] == rep["sweep"]["best_load"])
    assert rep["expert_offload"] == chosen["expert_offload"]  # the reported point's counters, not the last's


def test_offload_flag_errors(capsys) -> None:
    assert run_bench(["--gpu-weight-budget", "10", *FAST]) == 2
    assert "--gpu-weight-budget needs --offload experts" in capsys.readouterr().err
    assert run_bench(["--offload", "experts", *FAST]) == 2
    assert "needs --gpu-weight-budget" in capsys.readouterr().err
    assert run_bench(["--url", "http://127.0.0.1:9", "--offload", "experts", "--gpu-weight-budget", "1", *FAST]) == 2
    assert "r1deploy serve --offload experts" in capsys.readouterr().err


def test_offload_needs_a_moe_model(tmp_path: Path, capsys) -> None:
    dense = {k: v for k, v in TINY_DEEPSEEK.items() if k not in ("n_routed_experts",)}
    dense.update(architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(dense))
    assert run_bench(["--engine", str(tmp_path), "--load-format", "dummy", "--device", "cpu", "--offload", "experts",
                      "--gpu-weight-budget", "1", "--seq", "8", *FAST]) == 2
    assert "MoE" in capsys.readouterr().err
