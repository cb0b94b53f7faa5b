"""`doctor --server PID`: a running server's rank binding against its GPUs' NUMA nodes (fake two-node host, fake
/proc readings), its cgroup limits against the plan (a fake cgroup tree), and the CLI on a real process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_doctor import GIB, gpu_report, h200, make_host, make_plan

from r1deploy.cli import main
from r1deploy.doctor.checks import FAIL, PASS, WARN
from r1deploy.doctor.host import NumaNode
from r1deploy.doctor.requirements import requirements_from_plan
from r1deploy.doctor.serving import check_binding, check_cgroup, proc_binding

NODE0, NODE1 = frozenset(range(0, 64)), frozenset(range(64, 128))
TWO_NODE_HOST = make_host(
    numa_nodes=(NumaNode(0, "0-63", 64, 1024 * GIB), NumaNode(1, "64-127", 64, 1024 * GIB)),
    gpu=gpu_report(tuple(h200(i, numa_node=i // 4) for i in range(8))))


def test_bound_ranks_pass_and_an_unbound_one_warns() -> None:
    on_gpu = {100: 0, 101: 5, 102: 6}
    readings = {100: (NODE0, "prefer:0"), 101: (NODE1, "prefer:1"), 102: (NODE0 | NODE1, "default")}
    checks = check_binding(TWO_NODE_HOST, [100, 101, 102, 103], on_gpu, readings.__getitem__)
    assert [c.status for c in checks] == [PASS, PASS, WARN]
    assert "GPU 6 is on node 1" in checks[2].message and "64 off node 1" in checks[2].message
    assert "--numa-bind" in checks[2].advice


def test_right_cpus_but_memory_elsewhere_warns() -> None:
    checks = check_binding(TWO_NODE_HOST, [100], {100: 7}, lambda pid: (NODE1, "prefer:0"))
    assert checks[0].status == WARN


def test_one_node_host_and_no_gpu_process() -> None:
    assert check_binding(make_host(), [1], {}, proc_binding)[0].message == "one NUMA node: nothing to bind"
    assert check_binding(TWO_NODE_HOST, [1], {}, proc_binding)[0].status == WARN


def _cgroup(tmp_path: Path, memory_max: str, cpu_max: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    (root / "serve").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "serve" / "memory.max").write_text(memory_max + "\n")
    (root / "serve" / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("0::/serve\n")
    return proc, root


@pytest.mark.parametrize(("memory_max", "cpu_max", "status"), [
    (str(1024 * GIB), "max 100000", PASS),
    (str(64 * GIB), "max 100000", FAIL),  # the plan needs 512 GiB of host memory
    (str(1024 * GIB), "800000 100000", WARN),  # 8 CPUs, the plan wants 32
])
def test_server_cgroup_against_the_plan(tmp_path: Path, memory_max: str, cpu_max: str, status: str) -> None:
    proc, root = _cgroup(tmp_path, memory_max, cpu_max)
    check = check_cgroup(42, requirements_from_plan(make_plan(), "test"), proc=proc, root=root)
    assert check.status == status, check


def test_doctor_server_on_this_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--server", str(os.getpid()), "--json", "--read-test-mib", "0"]) == 0
    names = [c["name"] for c in json.loads(capsys.readouterr().out)["checks"]]
    assert "server cgroup" in names
    assert proc_binding(os.getpid())[0] == frozenset(os.sched_getaffinity(0))


def test_doctor_server_without_such_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--server", str(2**22 + 1), "--read-test-mib", "0"]) == 2
    assert "no such process" in capsys.readouterr().err


