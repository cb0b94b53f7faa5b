"""Multi-node launch on the CPU: two "nodes" on localhost, each started the way an operator starts one
(node 1 through `r1deploy serve --node-rank 1` in its own process, node 0 as the engine that serve builds),
give TP = 2 greedy tokens and logprobs equal to TP = 1; node 1 exits 0 when rank 0 shuts down; a rendezvous
nobody joins, missing GPUs and a layout that does not add up are clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_tensor_parallel import generate, save_tiny

from r1deploy.distributed.group import free_port
from r1deploy.distributed.nodes import IFNAME_VARIABLES, MultiNodeConfig
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig
from r1deploy.errors import UsageError


def start_node(model_dir: Path, node_rank: int, port: int, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "r1deploy", "serve", str(model_dir), "--tp", "2", "--nnodes", "2",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "--device", "cpu", "--dtype", "float32", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture()
def clean_ifname_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 0 runs in this process and sets GLOO/NCCL_SOCKET_IFNAME: undo that after the test."""
    for variable in IFNAME_VARIABLES:
        monkeypatch.setenv(variable, "unset")  # records the original value for teardown
        monkeypatch.delenv(variable)


def test_two_nodes_equal_one_rank(tmp_path: Path, clean_ifname_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_tiny(tmp_path / "llama", "llama")
    single = LLMEngine(str(model_dir), device="cpu", dtype="float32")
    expected = generate(single)
    port = free_port("127.0.0.1")
    node1 = start_node(model_dir, 1, port)
    try:
        parallel = MultiNodeConfig(tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port)
        node0 = LLMEngine(str(model_dir), config=EngineConfig(parallel=parallel), device="cpu", dtype="float32")
        try:
            assert node0.executor.processes == []  # rank 1 lives on the other node
            got = generate(node0)
        finally:
            node0.shutdown()
        out, err = node1.communicate(timeout=60)
    finally:
        node1.kill()  # our own process; a no-op once it has exited
    assert node1.returncode == 0, err
    assert "ranks 1-1 joining 127.0.0.1" in out and "rank 0 shut down" in out
    assert "rank network via lo" in capsys.readouterr().out
    for (tokens, logprobs, _), (ref_tokens, ref_logprobs, _) in zip(got, expected, strict=True):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < 1e-5


def test_rendezvous_nobody_joins_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = save_tiny(tmp_path / "llama", "llama")
    node1 = start_node(model_dir, 1, free_port("127.0.0.1"), "--dist-init-timeout", "2")
    try:
        _, err = node1.communicate(timeout=60)
    finally:
        node1.kill()
    assert node1.returncode == 1
    assert "did not form within 2s" in err and "worker 1 exited (exit code 1)" in err


def test_layout_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from r1deploy.cli import main

    with pytest.raises(UsageError, match="--node-rank 2 must be in"):
        MultiNodeConfig(tensor_parallel_size=2, nnodes=2, node_rank=2, master_port=29500)
    with pytest.raises(UsageError, match="the product must equal --tp"):
        MultiNodeConfig(tensor_parallel_size=4, nnodes=2, nproc_per_node=1, master_port=29500)
    with pytest.raises(UsageError, match="needs --master-port"):
        MultiNodeConfig(tensor_parallel_size=2, nnodes=2)
    model_dir = save_tiny(tmp_path / "llama", "llama")
    capsys.readouterr()  # transformers' save progress
    # More GPUs asked of this node than it has: one line, before any process starts.
    assert main(["serve", str(model_dir), "--tp", "2", "--nnodes", "2", "--node-rank", "1", "--master-port", "29500",
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tp 2 needs 1 GPUs on node 1 (--nproc-per-node), found" in err


def test_plan_prints_a_line_per_node() -> None:
    from r1deploy.plan.planner import plan_deployment

    launch = plan_deployment("deepseek-r1", "h100", num_gpus=16, tp=16, ep=16, dp_attention=False,
                             concurrency=32)["launch"]
    assert "--tp 16 --nnodes 2 --node-rank 0 --master-addr HEAD_NODE_IP --master-port 29500" in launch["r1deploy"]
    assert launch["r1deploy node 1"] == launch["r1deploy"].replace("--node-rank 0", "--node-rank 1")
    assert "--node-rank 1" in launch["sglang node 1"] and "ray start --address" in launch["vllm node 1"]
    dp = plan_deployment("deepseek-r1", "h100")["launch"]  # DP-attention over 2 nodes
    assert "--tp 16 --dp-attention --nnodes 2 --node-rank 0" in dp["r1deploy"] and "--node-rank 1" in dp["r1deploy node 1"]
