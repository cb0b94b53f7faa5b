"""A plan for the host `r1deploy up` runs on: its GPUs as the planner's catalog knows them, or, without a GPU,
its CPU as a one-device "catalog GPU" whose bandwidth and matmul speed are measured here.

Refuses clearly (UsageError) when the model cannot run here: an unknown GPU, a plan that needs more GPUs than
this host has, a failed doctor check, a model with no weights on disk.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1deploy.doctor.checks import FAIL, gpu_name_matches, run_checks, usable_ram
from r1deploy.doctor.host import HostReport
from r1deploy.doctor.requirements import requirements_from_plan
from r1deploy.errors import UsageError
from r1deploy.plan.catalog import Catalog, GpuSpec

CPU_DEVICE = "cpu"
# The CPU runs the weights in float32 (models/loader.py default_dtype); the planner counts the checkpoint's
# bf16 bytes, so the device's effective bandwidth for the planner is half the measured one.
_CPU_WEIGHT_BYTES_RATIO = 2


@dataclass(frozen=True)
class LocalPlan:
    plan: dict[str, Any]  # the `r1deploy plan --json` object
    model_dir: str  # what serve loads
    device: str  # "cuda" or "cpu"
    device_note: str  # how the device was described to the planner


def catalog_gpu(nvml_name: str, catalog: Catalog) -> GpuSpec:
    """The catalog entry for an NVML name; among several matches ('H100' matches SXM and PCIe) the one
    sharing the most name tokens with it."""
    words = set(re.split(r"[^a-z0-9]+", nvml_name.lower()))
    matches = [g for g in catalog if gpu_name_matches(g.name, nvml_name) or gpu_name_matches(g.display_name, nvml_name)]
    if not matches:
        raise UsageError(f"the planner's catalog has no entry for this host's {nvml_name}; add it with "
                         "`r1deploy plan --gpu-file` (docs: plan) and plan by hand")
    return max(matches, key=lambda g: len(words & set(re.split(r"[^a-z0-9]+", g.display_name.lower()))))


def measure_cpu(size_bytes: int = 256 << 20, matmul_n: int = 1024) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, float32 matmul FLOP/s) of this process's CPUs: best of 3."""
    import torch

    src = torch.ones(size_bytes // 4)
    dst = torch.empty_like(src)
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    copy_s = matmul_s = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - start)
        start = time.perf_counter()
        torch.mm(a, b)
        matmul_s = min(matmul_s, time.perf_counter() - start)
    return 2 * size_bytes / copy_s, 2 * matmul_n ** 3 / matmul_s


def cpu_device_spec(host: HostReport, bandwidth: float, flops: float) -> dict[str, Any]:
    """This host's CPU as a --gpu-file entry: usable RAM, measured bandwidth (float32 adjusted) and FLOP/s."""
    return {"display_name": f"CPU ({host.cpu.model})", "arch": "cpu", "memory_gib": usable_ram(host) / (1 << 30),
            "memory_bandwidth_tb_s": bandwidth / _CPU_WEIGHT_BYTES_RATIO / 1e12, "bf16_tflops": flops / 1e12,
            "nvlink_gb_s": 0.0, "source": "measured by r1deploy up"}


def _model_dir(model: str | None) -> str:
    if model is None:
        from r1deploy.models.loader import embedded_model_dir

        return str(embedded_model_dir())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise UsageError(f"{model}: `up` serves a local checkpoint directory (config.json + weights) or, with no "
                         "MODEL, the embedded SmolLM2; presets carry no weights")
    return str(path)


def plan_here(model: str | None, host: HostReport, **workload: Any) -> LocalPlan:
    """The plan for `model` (None: the embedded model) on this host, at `workload` (planner options)."""
    from r1deploy.plan.planner import plan_deployment

    model_dir = _model_dir(model)
    gpus = host.gpu.gpus
    if not gpus:
        bandwidth, flops = measure_cpu()
        spec = cpu_device_spec(host, bandwidth, flops)
        with tempfile.TemporaryDirectory() as tmp:
            gpu_file = Path(tmp) / "cpu.json"
            gpu_file.write_text(json.dumps({CPU_DEVICE: spec}))
            plan = plan_deployment(model_dir, CPU_DEVICE, num_gpus=1, gpu_file=str(gpu_file), **workload)
        note = (f"no GPU ({host.gpu.reason}): the CPU as one device, {bandwidth / 1e9:.1f} GB/s copy bandwidth "
                f"(halved: float32 weights) and {flops / 1e9:.0f} GFLOP/s float32 matmul, measured now")
        return LocalPlan(plan, model_dir, "cpu", note)
    gpu = catalog_gpu(gpus[0].name, Catalog.load())
    plan = plan_deployment(model_dir, gpu.name, gpus_per_node=len(gpus), **workload)
    dep = plan["deployment"]
    if dep["nodes"] > 1 or dep["num_gpus"] > len(gpus):
        raise UsageError(f"{Path(model_dir).name} needs {dep['num_gpus']}x {gpu.name} ({dep['layout']}); this host "
                         f"has {len(gpus)}: deploy it with `r1deploy plan --emit k8s|slurm` (docs/deploy.md)")
    failed = [c for c in run_checks(host, requirements_from_plan(plan, "the plan")) if c.status == FAIL]
    if failed:
        raise UsageError("this host fails the plan's checks: " + "; ".join(f"{c.name}: {c.message}" for c in failed))
    return LocalPlan(plan, model_dir, "cuda", f"{len(gpus)}x {gpus[0].name} as the catalog's {gpu.display_name}")
