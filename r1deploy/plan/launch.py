"""The launch lines for a plan: ours (where r1deploy serve supports the layout), vLLM's and SGLang's.

Built from the plan's JSON dict only, so they always describe exactly the deployment printed above them.
"""

from __future__ import annotations

from typing import Any

# Preset -> the Hugging Face repository the other engines download from.
HF_REPOS = {
    "deepseek-r1": "deepseek-ai/DeepSeek-R1",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "r1-distill-qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "r1-distill-qwen-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "r1-distill-qwen-14b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "r1-distill-qwen-32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "r1-distill-llama-8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "r1-distill-llama-70b": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
}


def launch_commands(plan: dict[str, Any]) -> dict[str, str]:
    """{engine: command line} for one node (node 0 of a multi-node plan: see the README's Multi-GPU section)."""
    model, dep, wl = plan["model"], plan["deployment"], plan["workload"]
    repo = HF_REPOS.get(model["name"], model["name"])
    tp, pp, ep, nodes = dep["tp"], dep["pp"], dep["ep"], dep["nodes"]
    fp8_kv = plan["precision"]["kv_cache_dtype"] == "fp8"
    max_len = wl["max_model_len"]

    vllm = [f"vllm serve {repo}", f"--tensor-parallel-size {tp}", f"--max-model-len {max_len}"]
    if pp > 1:
        vllm.append(f"--pipeline-parallel-size {pp}")
    if ep > 1:
        vllm.append("--enable-expert-parallel")
    if fp8_kv:
        vllm.append("--kv-cache-dtype fp8")
    if dep["replicas"] > 1:
        vllm.append(f"--data-parallel-size {dep['replicas']}")
    if nodes > 1:
        vllm.append("--distributed-executor-backend ray")

    sglang = [f"python -m sglang.launch_server --model-path {repo}", f"--tp {tp * pp}",
              f"--context-length {max_len}"]
    if dep["dp_attention"]:
        sglang += ["--enable-dp-attention", f"--dp {tp}"]
    elif dep["replicas"] > 1:
        sglang.append(f"--dp {dep['replicas']}")
    if ep > 1:
        sglang.append(f"--ep-size {ep}")
    if fp8_kv:
        sglang.append("--kv-cache-dtype fp8_e5m2")
    if nodes > 1:
        sglang += [f"--nnodes {nodes}", "--node-rank 0", "--dist-init-addr HEAD_NODE_IP:5000"]
    if model["model_type"].startswith("deepseek"):
        sglang.append("--trust-remote-code")

    commands = {"vllm": " ".join(vllm), "sglang": " ".join(sglang)}
    # r1deploy serve runs tensor parallelism for dense models on one node; MoE EP, DP-attention, PP and
    # multi-node are not implemented yet, and presets carry no weights (a local checkpoint directory is needed).
    if not model["moe"] and pp == 1 and nodes == 1 and dep["replicas"] == 1:
        ours = ["r1deploy serve /path/to/" + repo.split("/")[-1], f"--max-model-len {max_len}"]
        if tp > 1:
            ours.insert(1, f"--tp {tp}")
        if fp8_kv:
            ours.append("--kv-cache-dtype fp8")
        commands["r1deploy"] = " ".join(ours)
    return commands
