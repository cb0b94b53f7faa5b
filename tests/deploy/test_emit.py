"""`r1deploy plan --emit ...`: every emitted file checked against its format's own validator: Kubernetes objects
against a current release's OpenAPI schema (kubernetes-validate), the LeaderWorkerSet against its CRD's schema,
compose against the compose specification, units through `systemd-analyze verify`, the sbatch script through
`bash -n`. Schema sources: fixtures/SOURCES.md."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from r1deploy.cli import main
from r1deploy.deploy import compose, k8s, slurm, systemd
from r1deploy.deploy.spec import target_from_plan
from r1deploy.distributed.numa import NumaTopology
from r1deploy.errors import UsageError
from r1deploy.plan.planner import plan_deployment

FIXTURES = Path(__file__).parent / "fixtures"
# A current Kubernetes release, as bundled with kubernetes-validate (>= 1.31).
K8S_VERSION = kubernetes_validate.latest_version()

ONE_NODE = {"model": "r1-distill-qwen-7b", "gpu": "h100-sxm"}
TWO_NODES = {"model": "deepseek-r1", "gpu": "h100-sxm", "num_gpus": 16, "tp": 16}


@pytest.fixture(scope="module")
def plans() -> dict[str, dict]:
    return {"one": plan_deployment(**ONE_NODE), "two": plan_deployment(**TWO_NODES)}


@pytest.fixture(scope="module")
def lws_schema() -> dict:
    with gzip.open(FIXTURES / "leaderworkerset.x-k8s.io_leaderworkersets.yaml.gz", "rt") as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _validate_k8s(docs: list[dict], lws_schema: dict) -> list[str]:
    kinds = []
    for doc in docs:
        if doc["kind"] == "LeaderWorkerSet":
            assert doc["apiVersion"] == k8s.LWS_API
            jsonschema.validate(doc, lws_schema)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    return kinds


def test_one_node_k8s_is_a_valid_deployment_service_pvc_and_hpa(plans: dict, lws_schema: dict) -> None:
    target = target_from_plan(plans["one"], hpa_max_replicas=4)
    docs = k8s.manifests(target)
    assert _validate_k8s(docs, lws_schema) == ["PersistentVolumeClaim", "Deployment", "Service",
                                               "HorizontalPodAutoscaler"]
    container = docs[1]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert docs[3]["spec"]["metrics"][0]["pods"]["metric"]["name"] == "r1deploy_num_requests_waiting"


def test_two_node_k8s_is_a_valid_leader_worker_set(plans: dict, lws_schema: dict) -> None:
    target = target_from_plan(plans["two"])
    docs = k8s.manifests(target)
    assert _validate_k8s(docs, lws_schema) == ["PersistentVolumeClaim", "LeaderWorkerSet", "Service"]
    template = docs[1]["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    # one command for both roles: the worker index from LWS_WORKER_INDEX decides (launcher_env.py)
    assert leader["command"] == worker["command"] == target.serve_args()
    assert leader["command"][:3] == ["r1deploy", "serve", "/models/DeepSeek-R1"]
    assert "--tp" in leader["command"] and "--node-rank" not in leader["command"]
    assert "readinessProbe" in leader and "readinessProbe" not in worker  # workers serve no HTTP
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "NCCL_IB_DISABLE", "value": "0"} in worker["env"]
    anti = template["workerTemplate"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_k8s_validators_catch_a_broken_object(plans: dict, lws_schema: dict) -> None:
    """The validators above can fail: a misspelt field and a wrong LWS type are rejected."""
    docs = k8s.manifests(target_from_plan(plans["one"]))
    docs[1]["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(docs[1], K8S_VERSION, strict=True)
    lws = k8s.leader_worker_set(target_from_plan(plans["two"]))
    lws["spec"]["leaderWorkerTemplate"]["size"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(lws, lws_schema)


def test_compose_is_valid_against_the_compose_spec(plans: dict) -> None:
    # The spec names draft-07 (its $schema URL lacks the '#' jsonschema looks for)
    validator = jsonschema.Draft7Validator(json.loads((FIXTURES / "compose-spec.json").read_text()))
    text = compose.emit(target_from_plan(plans["one"]))["compose.yaml"]
    doc = yaml.safe_load(text)
    validator.validate(doc)
    service = doc["services"]["r1deploy"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert service["volumes"] == ["model-cache:/models"] and service["shm_size"].endswith("gb")
    service["shm_size"] = ["not", "a", "size"]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(doc)


def _fake_topology() -> NumaTopology:
    """Two NUMA nodes of 4 CPUs, 8 GPUs: 0-3 on node 0, 4-7 on node 1."""
    return NumaTopology({0: frozenset(range(4)), 1: frozenset(range(4, 8))}, (0, 0, 0, 0, 1, 1, 1, 1))


@pytest.mark.parametrize("which", ["one", "two"])
def test_systemd_units_verify(plans: dict, which: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    target = target_from_plan(plans[which])
    files = systemd.emit(target, _fake_topology(), executable=shutil.which("true"))
    units = [name for name in files if name.endswith(".service")]
    assert len(units) == target.nodes
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / u) for u in units)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even for lines it ignores; each problem is one stderr line naming the unit file
    assert result.returncode == 0 and result.stderr == "", result.stderr
    first = files[units[0]]
    if which == "one":  # one GPU, on node 0 of two: the service is confined to node 0
        assert "CPUAffinity=0-3\nNUMAPolicy=preferred\nNUMAMask=0\n" in first
    else:  # 8 GPUs over both nodes: each rank is bound by serve --numa-bind instead
        assert "CPUAffinity" not in first and "--node-rank 0" in first
        assert "--master-addr ${R1DEPLOY_MASTER_ADDR}" in first
        assert "R1DEPLOY_MASTER_ADDR=" in files["r1deploy.env"]


def test_systemd_verify_rejects_a_broken_unit(plans: dict, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    files = systemd.emit(target_from_plan(plans["one"]), _fake_topology(), executable=shutil.which("true"))
    name, text = next((n, t) for n, t in files.items() if n.endswith(".service"))
    (tmp_path / name).write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                            timeout=60)
    assert f"{name}:" in result.stderr and "sometimes" in result.stderr


def test_sbatch_script_parses_and_uses_one_task_per_node(plans: dict, tmp_path: Path) -> None:
    target = target_from_plan(plans["two"])
    script = tmp_path / slurm.SCRIPT
    script.write_text(slurm.emit(target)[slurm.SCRIPT])
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
    assert "srun --kill-on-bad-exit=1 r1deploy serve /models/DeepSeek-R1" in text


def test_cli_writes_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", ONE_NODE["model"], "--gpu", ONE_NODE["gpu"], "--out", str(tmp_path)]
    for fmt in ("docker", "compose", "k8s", "systemd", "slurm"):
        argv += ["--emit", fmt]
    assert main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "Dockerfile", "Dockerfile.cpu", "compose.yaml", "k8s.yaml", "r1deploy-deepseek-r1-distill-qwen-7b.service",
        "r1deploy.env", "r1deploy.sbatch"}
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["deepseek-r1", "--gpu", "h100-sxm", "--num-gpus", "16", "--tp", "16", "--emit", "compose"], "compose runs one"),
    (["deepseek-r1", "--gpu", "h200", "--num-gpus", "16", "--tp", "8", "--pp", "2", "--emit", "k8s"],
     "does not run this layout"),
    (["r1-distill-qwen-7b", "--emit", "k8s"], "--emit needs --out"),
    (["r1-distill-qwen-7b", "--emit", "docker", "--hpa", "3"], "--hpa applies to --emit k8s"),
])
def test_cli_refuses_clearly(argv: list[str], message: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = [] if "--emit needs" in message else ["--out", str(tmp_path)]
    assert main(["plan", *argv, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_target_refuses_a_port_out_of_range(plans: dict) -> None:
    with pytest.raises(UsageError, match="--port"):
        target_from_plan(plans["one"], port=70000)
