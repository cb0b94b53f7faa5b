"""bench --plan-engine: planned vs measured for the engine being driven (issue 21)."""

from __future__ import annotations

import argparse

import pytest

from r1deploy.bench import planlink
from r1deploy.bench.benchmark import _plan_engine, _validate
from r1deploy.bench.cli import register
from r1deploy.errors import UsageError


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


def test_engine_name_with_url_plans_with_that_engine() -> None:
    """`bench --url ... --engine vllm`: the server is vLLM, so planned vs measured uses the vllm profile."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--url", "http://x", "--model", "r1-distill-qwen-7b", "--engine", "vllm"])
    _validate(args)
    assert args.engine is None and _plan_engine(args) == {"engine": "vllm"}
    clash = parser.parse_args(["bench", "--url", "http://x", "--engine", "vllm", "--plan-engine", "sglang"])
    with pytest.raises(UsageError, match="different engines"):
        _validate(clash)
    other = parser.parse_args(["bench", "--url", "http://x", "--engine", "r1-distill-qwen-7b"])
    with pytest.raises(UsageError, match="not both"):  # a model name with --url stays an error
        _validate(other)
