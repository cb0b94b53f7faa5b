"""Schema-driven fuzzing: schemathesis draws positive and negative cases for every route of the server's
own OpenAPI document and sends them to the real server (uvicorn, tiny model). No response may be a 5xx,
every error must be in OpenAI's shape {"error": {message, type, param, code}}, and every response must be
what the document says (schemathesis's status-code, content-type and response-schema conformance checks:
invalid input is a documented 400 with the OpenAI error schema, not FastAPI's 422).

CI runs a bounded number of cases; the committed 5,000-case result is this test with
R1DEPLOY_SCHEMA_CASES=5000 R1DEPLOY_SCHEMA_OUT=benchmarks/results/schemathesis_5000.json.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance
from schemathesis.core.failures import Failure, FailureGroup
from serve_util import free_port
from server_harness import tiny_engine

from r1deploy.server.app import create_app
from r1deploy.server.state import ServerSettings

CASES = int(os.environ.get("R1DEPLOY_SCHEMA_CASES", "300"))
BODYLESS_CASES = 5  # a route without parameters has few distinct cases to draw
DOCUMENT_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_url(tiny_dir: Path) -> Iterator[str]:
    app = create_app(ServerSettings(), lambda: tiny_engine(tiny_dir))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def keep_cheap(body: object) -> None:
    """Valid requests stay cheap on the CPU: at most 4 tokens and 2 choices (larger valid values are as
    valid; a wrong type or a negative number is left alone, to be refused)."""
    if isinstance(body, dict):
        for key, limit in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2), ("min_tokens", 2)):
            if type(body.get(key)) is int and body[key] > limit:
                body[key] = limit


def openai_error_problem(response: httpx.Response) -> str | None:
    """Why an error response is not in OpenAI's shape, or None when it is."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return "body is not a JSON object"
    if not isinstance(error, dict):
        return "no error object"
    if not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
        return "error.message or error.type is not a string"
    if "param" not in error or "code" not in error:
        return "error.param or error.code missing"
    return None


def fuzz(url: str, total_cases: int) -> dict:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    with_inputs = [op for op in operations if op.body or any(True for _ in op.iter_parameters())]
    per_mode = max(1, total_cases // (2 * max(1, len(with_inputs))))
    outcomes: Counter = Counter()
    problems: list[str] = []
    def run_cases(op, mode, examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=(Phase.generate,))
        @given(case=op.as_strategy(generation_mode=mode))
        def one(case) -> None:
            keep_cheap(case.body)
            try:
                response = case.call(base_url=url, timeout=60)
            except Exception as exc:  # noqa: BLE001 - no answer at all is a finding too, not a crash
                outcomes[f"{op.label} {mode.value} no-response"] += 1
                problems.append(f"{op.label}: no response ({type(exc).__name__}) for {case.body!r:.300}")
                return
            outcomes[f"{op.label} {mode.value} {response.status_code}"] += 1
            try:  # the document tells the truth: status, content type and body schema, errors included
                case.validate_response(response, checks=DOCUMENT_CHECKS)
            except (Failure, FailureGroup) as exc:
                problems.append(f"{op.label}: HTTP {response.status_code} breaks the OpenAPI document: "
                                f"{exc!s:.300} for {case.body!r:.200}")
            if response.status_code >= 500:
                problems.append(f"{op.label}: HTTP {response.status_code} for {case.body!r:.300}")
            elif response.status_code >= 400 and (why := openai_error_problem(response)):
                problems.append(f"{op.label}: HTTP {response.status_code} not OpenAI-shaped ({why})")

        one()

    for op in operations:
        # A route without inputs has no negative case to draw.
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if op in with_inputs else (GenerationMode.POSITIVE,)
        for mode in modes:
            examples = per_mode if op in with_inputs else BODYLESS_CASES

            run_cases(op, mode, examples)
    statuses = Counter()
    for key, n in outcomes.items():
        statuses[key.rsplit(" ", 1)[1]] += n
    return {"cases": sum(outcomes.values()), "by_status": dict(statuses), "by_route": dict(outcomes),
            "server_errors": sum(n for code, n in statuses.items() if code.startswith("5")),
            "problems": problems[:50], "num_problems": len(problems)}


def test_schema_driven_fuzz_no_5xx_and_openai_errors(live_url: str) -> None:
    started = time.monotonic()
    result = fuzz(live_url, CASES)
    result["wall_s"] = round(time.monotonic() - started, 1)
    if out := os.environ.get("R1DEPLOY_SCHEMA_OUT"):
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    assert result["cases"] >= min(CASES, 100), result["by_route"]
    assert result["num_problems"] == 0, result["problems"]
    assert any(k.endswith("400") for k in result["by_route"]), "no negative case was refused"
    assert not any(k.endswith("422") for k in result["by_route"]), "FastAPI's 422 leaked"
    assert any("POST" in k and k.endswith("200") for k in result["by_route"]), "no positive case reached the engine"
