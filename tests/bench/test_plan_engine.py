"""bench --plan-engine: planned vs measured for the engine being driven (issue 21)."""

from __future__ import annotations

import argparse

from r1deploy.bench import planlink
from r1deploy.bench.benchmark import _plan_engine
from r1deploy.bench.cli import register


def test_plan_engine_reaches_the_plan_and_its_label() -> None:
    work = {"input_len": 512, "output_len": 256, "concurrency": 4}
    datasheet = planlink.plan("r1-distill-qwen-7b", "h100", **work)
    vllm = planlink.plan("r1-distill-qwen-7b", "h100", **work, engine="vllm")
    assert datasheet is not None and vllm is not None
    assert datasheet["deployment"]["engine"] is None and vllm["deployment"]["engine"] == "vllm"
    assert vllm["performance"]["tpot_s"] != datasheet["performance"]["tpot_s"]
    assert planlink.deployment_hint(vllm).endswith(", vllm profile")
    assert "profile" not in planlink.deployment_hint(datasheet)


def test_plan_engine_flag() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--url", "http://x", "--model", "r1-distill-qwen-7b", "--plan-engine", "vllm"])
    assert _plan_engine(args) == {"engine": "vllm"}
    assert _plan_engine(parser.parse_args(["bench", "--url", "http://x"])) == {}
