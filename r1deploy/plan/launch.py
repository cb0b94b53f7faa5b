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


# Rendezvous placeholders of multi-node lines: node 0's address on the private rank network, and a port.
HEAD, PORT = "HEAD_NODE_IP", 29500


def launch_commands(plan: dict[str, Any]) -> dict[str, str]:
    """{engine: command line}; a plan over N > 1 nodes adds "{engine} node R" lines for nodes 1..N-1
    ("nodes 1-{N-1}" with $NODE_RANK when N > 2). Rank networks: docs/distributed.md."""
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
    if nodes > 1:  # Ray forms the cluster: a head on node 0, workers joining it
        vllm = ["ray start --head --port 6379 &&", *vllm, "--distributed-executor-backend ray"]

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
    # Presets carry no weights: our line names a local checkpoint directory.
    if serve_runs_layout(plan):
        ours = ["r1deploy serve /path/to/" + repo.split("/")[-1], f"--max-model-len {max_len}"]
        if tp > 1:
            ours.insert(1, f"--tp {tp}" + (" --dp-attention" if dep["dp_attention"] else ""))
        if nodes > 1:
            ours.insert(2, f"--nnodes {nodes} --node-rank 0 --master-addr {HEAD} --master-port {PORT}")
        if fp8_kv:
            ours.append("--kv-cache-dtype fp8")
        commands["r1deploy"] = " ".join(ours)
    if nodes > 1:
        commands.update(_other_nodes(commands, nodes))
    return commands


def serve_runs_layout(plan: dict[str, Any]) -> bool:
    """r1deploy serve runs TP over one or more nodes, with MoE experts split over the TP ranks (EP = TP),
    optionally with data-parallel MLA attention (--dp-attention); PP and replicas are not implemented yet."""
    dep = plan["deployment"]
    return (not plan["model"]["moe"] or dep["ep"] == dep["tp"]) and dep["pp"] == 1 and dep["replicas"] == 1


def _other_nodes(commands: dict[str, str], nodes: int) -> dict[str, str]:
    """The lines for nodes 1..N-1: node 0's with its node rank changed (vLLM: a Ray worker joining the head)."""
    rank = "1" if nodes == 2 else "$NODE_RANK"
    which = "node 1" if nodes == 2 else f"nodes 1-{nodes - 1}"
    others = {f"vllm {which}": f"ray start --address {HEAD}:6379 --block"}
    for engine in ("sglang", "r1deploy"):
        if engine in commands:
            others[f"{engine} {which}"] = commands[engine].replace("--node-rank 0", f"--node-rank {rank}")
    return others
