"""doctor --plan FILE reads deployment.engine and checks against that engine's profile (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from r1deploy.cli import main
from r1deploy.doctor.checks import WARN, check_allreduce
from r1deploy.doctor.requirements import assumed_efficiency, requirements_from_plan
from r1deploy.errors import UsageError
from r1deploy.plan.collectives import AllReduceResult
from r1deploy.plan.engines import load_engine
from r1deploy.plan.planner import plan_deployment
from r1deploy.plan.roofline import Efficiency


def test_plan_engine_reaches_the_requirements_and_the_link_check() -> None:
    plan = plan_deployment(model="deepseek-r1", gpu="h200", num_gpus=8, tp=8, engine="trtllm")
    req = requirements_from_plan(plan, "plan.json")
    assert (req.engine, req.family) == ("trtllm", "moe")
    assert assumed_efficiency(req) == load_engine("trtllm").family_eff("moe") != Efficiency()
    host = SimpleNamespace(gpu=SimpleNamespace(gpus=tuple(range(8))))
    slow = check_allreduce(host, req,  # type: ignore[arg-type]
                            lambda n, backend: AllReduceResult(n, backend, 1 << 28, 1.0))
    assert "trtllm profile" in slow.message and slow.status == WARN
    plain = requirements_from_plan(plan_deployment(model="deepseek-r1", gpu="h200"), "plan.json")
    assert plain.engine is None and assumed_efficiency(plain) == Efficiency()  # no engine: datasheet defaults


def test_unknown_plan_engine_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_deployment(model="deepseek-r1", gpu="h200", num_gpus=8, tp=8, engine="vllm")
    plan["deployment"]["engine"] = "tgi"
    with pytest.raises(UsageError, match="deployment.engine 'tgi'"):
        requirements_from_plan(plan, "plan.json")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert main(["doctor", "--plan", str(path), "--read-test-mib", "0"]) == 2
