"""Launch lines follow the plan they are printed with."""

from __future__ import annotations

from r1deploy.plan.planner import plan_deployment


def test_r1_lines_carry_tp_ep_and_dp_attention() -> None:
    launch = plan_deployment("deepseek-r1", "h200")["launch"]
    assert "vllm serve deepseek-ai/DeepSeek-R1 --tensor-parallel-size 8" in launch["vllm"]
    assert "--enable-expert-parallel" in launch["vllm"]
    assert "--enable-dp-attention --dp 8" in launch["sglang"] and "--ep-size 8" in launch["sglang"]
    assert "r1deploy serve /path/to/DeepSeek-R1 --tp 8 --dp-attention" in launch["r1deploy"]


def test_dense_model_gets_our_tp_line_and_fp8_kv() -> None:
    plan = plan_deployment("r1-distill-llama-70b", "h100", kv_cache_dtype="fp8")
    tp = plan["deployment"]["tp"]
    launch = plan["launch"]
    assert f"--tp {tp}" in launch["r1deploy"] and "--kv-cache-dtype fp8" in launch["r1deploy"]
    assert f"--tensor-parallel-size {tp}" in launch["vllm"] and "--kv-cache-dtype fp8" in launch["vllm"]
    assert "--trust-remote-code" not in launch["sglang"]


def test_multi_node_lines_name_the_rendezvous() -> None:
    plan = plan_deployment("deepseek-r1", "h100")
    assert plan["deployment"]["nodes"] == 2
    assert "--nnodes 2 --node-rank 0 --dist-init-addr" in plan["launch"]["sglang"]
    assert "--distributed-executor-backend ray" in plan["launch"]["vllm"]
