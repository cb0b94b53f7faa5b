"""`r1deploy doctor`: host collection on this machine, the NVML probe against a fake library, the checks
against hand-made hosts and plans, and the CLI contract (exit codes, --json, one-line usage errors).

CPU only and fast: the read test uses a few MiB, and GPUs come from a fake pynvml module.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from r1deploy.doctor import checks, gpu_probe, host
from r1deploy.doctor.checks import FAIL, PASS, WARN, Check, run_checks
from r1deploy.doctor.gpu_probe import GpuInfo, GpuReport
from r1deploy.doctor.host import CgroupLimits, CpuInfo, DiskInfo, HostReport, MemoryInfo, NumaNode
from r1deploy.doctor.requirements import requirements_from_plan
from r1deploy.errors import UsageError

GIB = 1 << 30


# --- helpers ---------------------------------------------------------------------------------------


def make_plan(**host_overrides: float) -> dict:
    """A plan shaped like `r1deploy plan --json`: DeepSeek-R1 on 8 H200s, one node."""
    return {
        "deployment": {
            "gpu": "H200",
            "num_gpus": 8,
            "nodes": 1,
            "gpu_memory_bytes": 141 * 10**9,
            "fp8_compute": True,
        },
        "host": {
            "ram_bytes": 512 * GIB,
            "disk_bytes": 700 * GIB,
            "cpu_cores": 32,
            "load_time_s": 300.0,
            "disk_read_bytes_per_s": 2e9,
            "internode_bytes_per_s": 50e9,
            **host_overrides,
        },
        "model": {"total_params": 671_000_000_000},
        "memory": {"weights_bytes": 640 * GIB},
    }


def h200(index: int, numa_node: int = 0) -> GpuInfo:
    return GpuInfo(
        index=index,
        name="NVIDIA H200",
        memory_bytes=143771 << 20,
        memory_used_bytes=500 << 20,
        compute_capability=(9, 0),
        bus_id=f"00000000:{index:02x}:00.0",
        numa_node=numa_node,
        pcie_gen=5,
        pcie_width=16,
        nvlinks_active=18,
    )


def gpu_report(gpus: tuple[GpuInfo, ...], link: str = "NV") -> GpuReport:
    topology = tuple(tuple("X" if i == j else link for j in range(len(gpus))) for i in range(len(gpus)))
    return GpuReport(
        gpus=gpus,
        driver_version="570.86.15",
        cuda_driver_version="12.8",
        topology=topology,
        reason=None if gpus else "nvidia-ml-py: NVML Shared Library Not Found",
    )


def make_host(**overrides: object) -> HostReport:
    """A big, healthy 8-GPU host; tests override one field to make one check go wrong."""
    base = HostReport(
        hostname="test",
        platform="Linux",
        cpu=CpuInfo(
            model="Test CPU",
            physical_cores=64,
            logical_cores=128,
            usable_cpus=128,
            mhz_current=2000.0,
            mhz_max=3500.0,
            l3_bytes=256 << 20,
        ),
        memory=MemoryInfo(total_bytes=2048 * GIB, available_bytes=2000 * GIB),
        numa_nodes=(NumaNode(id=0, cpulist="0-127", cpu_count=128, memory_bytes=2048 * GIB),),
        cgroup=CgroupLimits(version=2, cpu_quota=None, memory_limit_bytes=None),
        disk=DiskInfo(
            path="/models",
            mount_point="/models",
            device="/dev/nvme0n1",
            fstype="xfs",
            total_bytes=4000 * GIB,
            free_bytes=3000 * GIB,
            read_bytes_per_s=5e9,
            read_note="256 MiB",
        ),
        load_1m=0.5,
        gpu=gpu_report(tuple(h200(i) for i in range(8))),
    )
    return replace(base, **overrides)


def by_name(checks: list[Check], name: str) -> Check:
    matches = [c for c in checks if c.name == name]
    assert len(matches) == 1, f"expected one {name!r} check in {[c.name for c in checks]}"
    return matches[0]


def plan_checks(host_report: HostReport, plan: dict | None = None) -> list[Check]:
    return run_checks(host_report, requirements_from_plan(plan or make_plan(), source="test plan"))


# --- host collection on this machine ---------------------------------------------------------------


def test_collect_host_reports_sane_values_for_this_machine(tmp_path: Path) -> None:
    report = host.collect_host(tmp_path, read_test_mib=8)
    assert report.cpu.model
    assert report.cpu.logical_cores >= report.cpu.physical_cores > 0
    assert 0 < report.cpu.usable_cpus <= report.cpu.logical_cores
    assert report.memory.total_bytes >= report.memory.available_bytes > 0
    assert report.disk.total_bytes >= report.disk.free_bytes > 0
    assert Path(report.disk.mount_point) in (tmp_path.resolve(), *tmp_path.resolve().parents)
    assert report.disk.read_bytes_per_s and report.disk.read_bytes_per_s > 0
    if Path("/sys/devices/system/node/node0").is_dir():
        assert sum(n.cpu_count for n in report.numa_nodes) >= report.cpu.usable_cpus
    # Whatever GPUs there are, the report says either which or why none.
    assert report.gpu.gpus or report.gpu.reason


def test_read_test_measures_and_cleans_up(tmp_path: Path) -> None:
    speed, note = host.measure_sequential_read(tmp_path, 8)
    assert speed is not None and speed > 0
    assert note.startswith("8 MiB")
    assert list(tmp_path.iterdir()) == []


def test_read_test_zero_skips(tmp_path: Path) -> None:
    assert host.measure_sequential_read(tmp_path, 0) == (None, "skipped (--read-test-mib 0)")


def test_read_test_reports_a_write_error_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(host, "_fill", disk_full)
    assert host.measure_sequential_read(tmp_path, 1) == (
        None,
        "not measured: [Errno 28] No space left on device",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "size"), [("32768K", 32 << 20), ("32 MiB", 32 << 20), ("1.5 GiB", 3 << 29), ("512", 512)]
)
def test_parse_size(text: str, size: int) -> None:
    assert host.parse_size(text) == size


def test_count_cpulist() -> None:
    assert host.count_cpulist("0-3,8,10-11") == 7


def test_numa_nodes_from_sysfs(tmp_path: Path) -> None:
    for node, cpus, kb in ((0, "0-3,8-11", 1024), (1, "4-7,12-15", 2048)):
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}/cpulist").write_text(cpus + "\n")
        (tmp_path / f"node{node}/meminfo").write_text(
            f"Node {node} MemTotal:  {kb} kB\nNode {node} MemFree: 1 kB\n"
        )
    nodes = host.numa_nodes(tmp_path)
    assert nodes == (NumaNode(0, "0-3,8-11", 8, 1024 * 1024), NumaNode(1, "4-7,12-15", 8, 2048 * 1024))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_takes_the_tightest_limit_on_the_path(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "cpu.max", "max 100000")
    write(root / "kube/cpu.max", "200000 100000")  # a parent's quota binds its children
    write(root / "kube/pod/memory.max", str(4 * GIB))
    write(root / "kube/pod/cpu.max", "max 100000")
    write(tmp_path / "self", "0::/kube/pod")
    assert host.cgroup_limits(root, tmp_path / "self") == CgroupLimits(2, 2.0, 4 * GIB)


def test_cgroup_v1_reads_cfs_quota_and_ignores_the_unlimited_sentinel(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    # Without a cgroup namespace the container's own cgroup is mounted at the controller's root.
    write(root / "cpu,cpuacct/cpu.cfs_quota_us", "150000")
    write(root / "cpu,cpuacct/cpu.cfs_period_us", "100000")
    write(root / "memory/memory.limit_in_bytes", "9223372036854771712")
    write(tmp_path / "self", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/")
    assert host.cgroup_limits(root, tmp_path / "self") == CgroupLimits(1, 1.5, None)


def test_no_cgroup_filesystem(tmp_path: Path) -> None:
    assert host.cgroup_limits(tmp_path, tmp_path / "absent") == CgroupLimits(None, None, None)


# --- the NVML probe --------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


def fake_pynvml(count: int = 2, nvlink: bool = True, init_error: str | None = None) -> types.ModuleType:
    """Just the pynvml surface gpu_probe uses: `count` H200s, NVLink peers or PCIe (SYS) only."""

    def init() -> None:
        if init_error:
            raise FakeNVMLError(init_error)

    def nvlink_state(handle: int, link: int) -> int:
        if not nvlink or link >= 18:
            raise FakeNVMLError("Not Supported")
        return 1

    nvml = types.ModuleType("pynvml")
    nvml.__dict__.update(
        NVMLError=FakeNVMLError,
        NVML_NVLINK_MAX_LINKS=36,
        NVML_FEATURE_ENABLED=1,
        NVML_P2P_CAPS_INDEX_NVLINK=2,
        NVML_P2P_STATUS_OK=0,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=143771 << 20, used=(2 * GIB) * h),
        nvmlDeviceGetPciInfo=lambda h: types.SimpleNamespace(busId=f"00000000:{h:02X}:00.0"),
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetNumaNodeId=lambda h: h,
        nvmlDeviceGetCurrPcieLinkGeneration=lambda h: 5,
        nvmlDeviceGetCurrPcieLinkWidth=lambda h: 16,
        nvmlDeviceGetNvLinkState=nvlink_state,
        nvmlDeviceGetP2PStatus=lambda a, b, index: 0 if nvlink else 4,
        nvmlDeviceGetTopologyCommonAncestor=lambda a, b: 50,
        nvmlSystemGetDriverVersion=lambda: "570.86.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12080,
    )
    return nvml


def test_probe_without_nvidia_ml_py_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = gpu_probe.probe_gpus()
    assert report.gpus == () and report.reason.startswith("nvidia-ml-py not installed")


def test_probe_without_driver_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="Driver Not Loaded"))
    assert gpu_probe.probe_gpus() == GpuReport((), None, None, (), "nvidia-ml-py: Driver Not Loaded")


def test_probe_reads_gpus_links_and_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(count=2))
    report = gpu_probe.probe_gpus()
    assert (
        report.reason is None
        and report.driver_version == "570.86.15"
        and report.cuda_driver_version == "12.8"
    )
    assert [(g.name, g.compute_capability, g.nvlinks_active, g.numa_node) for g in report.gpus] == [
        ("NVIDIA H200", (9, 0), 18, 0),
        ("NVIDIA H200", (9, 0), 18, 1),
    ]
    assert report.topology == (("X", "NV"), ("NV", "X"))


def test_probe_pcie_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(count=2, nvlink=False))
    report = gpu_probe.probe_gpus()
    assert [g.nvlinks_active for g in report.gpus] == [0, 0]
    assert report.topology == (("X", "SYS"), ("SYS", "X"))


# --- checks ----------------------------------------------------------------------------------------


def test_healthy_host_passes_every_plan_check() -> None:
    checks = plan_checks(make_host())
    assert [c for c in checks if c.status != PASS] == []
    names = {c.name for c in checks}
    assert {
        "GPU count",
        "GPU memory",
        "GPU model",
        "FP8",
        "NVLink",
        "RAM",
        "disk space",
        "disk read",
        "CPU cores",
    } <= names


def test_ram_below_plan_fails_and_enough_passes() -> None:
    assert by_name(plan_checks(make_host(), make_plan(ram_bytes=4096 * GIB)), "RAM").status == FAIL
    assert by_name(plan_checks(make_host(), make_plan(ram_bytes=1024 * GIB)), "RAM").status == PASS


def test_container_memory_limit_counts_as_the_ram() -> None:
    limited = make_host(cgroup=CgroupLimits(version=2, cpu_quota=None, memory_limit_bytes=256 * GIB))
    checks = plan_checks(limited)
    ram = by_name(checks, "RAM")
    assert ram.status == FAIL and "container limit" in ram.message
    assert by_name(checks, "cgroup memory").status == WARN


def test_cpu_quota_warns_container_limited() -> None:
    checks = run_checks(
        make_host(cgroup=CgroupLimits(version=2, cpu_quota=2.0, memory_limit_bytes=None)), None
    )
    assert by_name(checks, "cgroup CPU").message.startswith("container limited to 2 CPUs")


def test_no_gpu_fails_a_gpu_plan_and_says_why() -> None:
    check = by_name(plan_checks(make_host(gpu=gpu_report(()))), "GPU count")
    assert check.status == FAIL
    assert check.message.startswith("no NVIDIA GPU visible (nvidia-ml-py: NVML Shared Library Not Found)")
    assert check.advice


def test_no_gpu_without_a_plan_only_warns() -> None:
    check = by_name(run_checks(make_host(gpu=gpu_report(())), None), "GPUs")
    assert check.status == WARN and check.message.startswith("no NVIDIA GPU visible")


def test_too_few_gpus_and_too_little_memory_fail() -> None:
    small = replace(h200(0), name="NVIDIA A100-SXM4-40GB", memory_bytes=40 * GIB, compute_capability=(8, 0))
    checks = plan_checks(make_host(gpu=gpu_report((small, replace(small, index=1)))))
    assert by_name(checks, "GPU count").status == FAIL
    assert by_name(checks, "GPU memory").status == FAIL
    assert by_name(checks, "GPU model").status == WARN
    assert by_name(checks, "FP8").status == FAIL


def test_pcie_only_warns_for_tensor_parallel() -> None:
    check = by_name(
        plan_checks(make_host(gpu=gpu_report(tuple(h200(i) for i in range(8)), link="SYS"))), "NVLink"
    )
    assert check.status == WARN and "PCIe SYS" in check.message


def test_slow_disk_warns_with_load_time() -> None:
    slow = make_host(disk=replace(make_host().disk, read_bytes_per_s=500e6))
    check = by_name(plan_checks(slow), "disk read")
    assert check.status == WARN and "500 MB/s" in check.message and "~1374 s" in check.message


def test_unmeasured_disk_warns() -> None:
    unmeasured = make_host(disk=replace(make_host().disk, read_bytes_per_s=None, read_note="skipped"))
    assert by_name(plan_checks(unmeasured), "disk read").status == WARN


def test_disk_space_fails_only_when_the_disk_is_too_small() -> None:
    full = replace(make_host().disk, free_bytes=10 * GIB)
    assert by_name(plan_checks(make_host(disk=full)), "disk space").status == WARN
    tiny = replace(full, total_bytes=100 * GIB)
    assert by_name(plan_checks(make_host(disk=tiny)), "disk space").status == FAIL


def test_multi_numa_host_gets_binding_advice() -> None:
    nodes = (NumaNode(0, "0-63", 64, 1024 * GIB), NumaNode(1, "64-127", 64, 1024 * GIB))
    gpus = tuple(h200(i, numa_node=i // 4) for i in range(8))
    check = by_name(run_checks(make_host(numa_nodes=nodes, gpu=gpu_report(gpus)), None), "NUMA")
    assert "GPU 4 on node 1" in check.message and "numactl --cpunodebind" in check.advice


def test_busy_gpu_warns_about_co_located_work() -> None:
    busy = replace(h200(0), memory_used_bytes=20 * GIB)
    check = by_name(run_checks(make_host(gpu=gpu_report((busy,))), None), "co-located work")
    assert check.status == WARN and "cgroup" in check.advice


@pytest.mark.parametrize(
    ("planned", "nvml", "match"),
    [
        ("H200", "NVIDIA H200", True),
        ("h100-sxm", "NVIDIA H100 80GB HBM3", True),
        ("a100-80gb", "NVIDIA A100-SXM4-80GB", True),
        ("H200 SXM 141GB", "NVIDIA H200", True),
        ("rtx-4090", "NVIDIA GeForce RTX 4090", True),
        ("H200", "NVIDIA H100 80GB HBM3", False),
        ("H100 SXM 80GB", "NVIDIA H200", False),
        ("h20", "NVIDIA H200", False),
        ("rtx4090", "NVIDIA GeForce RTX 4090", True),
    ],
)
def test_gpu_name_matches(planned: str, nvml: str, match: bool) -> None:
    assert checks.gpu_name_matches(planned, nvml) is match


def test_missing_plan_key_names_it() -> None:
    plan = make_plan()
    del plan["host"]["ram_bytes"]
    with pytest.raises(UsageError, match="'host.ram_bytes'"):
        requirements_from_plan(plan, source="plan.json")


def test_zero_nodes_is_a_usage_error() -> None:
    plan = make_plan()
    plan["deployment"]["nodes"] = 0
    with pytest.raises(UsageError, match="deployment.nodes must be at least 1"):
        requirements_from_plan(plan, source="plan.json")


def test_wrongly_typed_plan_value_is_a_usage_error() -> None:
    plan = make_plan()
    plan["deployment"]["num_gpus"] = "eight"
    with pytest.raises(UsageError, match="'deployment.num_gpus' must be a number"):
        requirements_from_plan(plan, source="plan.json")


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch):
    """r1deploy.cli.main, whose parser also needs the planner's r1deploy/plan/cli.py.

    Until that module lands, a stand-in that registers nothing lets the real CLI run `doctor`.
    """
    if importlib.util.find_spec("r1deploy.plan.cli") is None:
        stand_in = types.ModuleType("r1deploy.plan.cli")
        stand_in.register = lambda sub: None
        monkeypatch.setitem(sys.modules, "r1deploy.plan.cli", stand_in)
        monkeypatch.setattr(sys.modules["r1deploy.plan"], "cli", stand_in, raising=False)
    from r1deploy.cli import main

    return main


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host without GPUs, whatever the machine running the tests has."""
    monkeypatch.setattr(host, "probe_gpus", lambda: gpu_report(()))


def test_json_contract(cli_main, no_gpu, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["doctor", "--json", "--read-test-mib", "4", "--path", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"host", "requirements", "checks", "summary"}
    assert out["requirements"] is None
    assert out["host"]["cpu"]["logical_cores"] > 0 and out["host"]["memory"]["total_bytes"] > 0
    assert out["host"]["disk"]["read_bytes_per_s"] > 0
    assert out["host"]["gpu"]["gpus"] == [] and out["host"]["gpu"]["reason"]
    assert all(set(c) == {"status", "name", "message", "advice"} for c in out["checks"])
    assert out["summary"] == {s: sum(c["status"] == s for c in out["checks"]) for s in (PASS, WARN, FAIL)}


def test_table_output_says_no_gpu_and_how_to_plan(
    cli_main, no_gpu, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["doctor", "--read-test-mib", "0"]) == 0
    out = capsys.readouterr().out
    assert "no NVIDIA GPU visible" in out and "--plan PLAN.json" in out


def test_plan_file_with_missing_key_exits_2_with_one_line(
    cli_main, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan = make_plan()
    del plan["deployment"]["gpu_memory_bytes"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert cli_main(["doctor", "--plan", str(tmp_path / "plan.json"), "--read-test-mib", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'deployment.gpu_memory_bytes'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--plan", "absent.json"],
        ["--plan", "p.json", "--model", "r1"],
        ["--read-test-mib", "-1"],
        ["--path", "absent-dir"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    cli_main, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert cli_main(["doctor", *argv]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_plan_file_that_fails_exits_1(
    cli_main, no_gpu, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "plan.json").write_text(json.dumps(make_plan()))
    assert cli_main(["doctor", "--plan", str(tmp_path / "plan.json"), "--json", "--read-test-mib", "0"]) == 1
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert by_name([Check(**c) for c in checks], "GPU count").status == FAIL


def test_model_flag_asks_the_planner(
    cli_main, no_gpu, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []

    def plan_deployment(**kwargs: str) -> dict:
        calls.append(kwargs)
        return make_plan(ram_bytes=1)

    planner = types.ModuleType("r1deploy.plan.planner")
    planner.plan_deployment = plan_deployment
    monkeypatch.setitem(sys.modules, "r1deploy.plan.planner", planner)
    assert (
        cli_main(["doctor", "--model", "deepseek-r1", "--gpu", "h200", "--json", "--read-test-mib", "0"]) == 1
    )
    out = json.loads(capsys.readouterr().out)
    assert calls == [{"model": "deepseek-r1", "gpu": "h200"}]
    assert out["requirements"]["gpu"] == "H200" and out["requirements"]["ram_bytes"] == 1
    assert by_name([Check(**c) for c in out["checks"]], "RAM").status == PASS


def test_real_planner_output_has_every_key_doctor_reads() -> None:
    planner = pytest.importorskip(
        "r1deploy.plan.planner", reason="the planner (r1deploy/plan/planner.py) has not landed"
    )
    requirements = requirements_from_plan(
        planner.plan_deployment(model="deepseek-r1", gpu="h200"), "the planner"
    )
    assert requirements.num_gpus > 0 and requirements.ram_bytes > 0
