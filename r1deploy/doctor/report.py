"""`r1deploy doctor`'s output: the host facts and the checks as rich tables, or one JSON object."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from r1deploy.doctor.checks import FAIL, PASS, WARN, Check
from r1deploy.doctor.host import HostReport
from r1deploy.doctor.requirements import Requirements
from r1deploy.doctor.units import cc, gib, mbs


def report_dict(host: HostReport, req: Requirements | None, checks: list[Check]) -> dict[str, Any]:
    return {
        "host": asdict(host),
        "requirements": asdict(req) if req else None,
        "checks": [asdict(c) for c in checks],
        "summary": summarize(checks),
    }


def summarize(checks: list[Check]) -> dict[str, int]:
    return {status: sum(c.status == status for c in checks) for status in (PASS, WARN, FAIL)}


def host_facts(host: HostReport) -> list[tuple[str, str]]:
    cpu, disk = host.cpu, host.disk
    mhz = "/".join(f"{m:.0f}" for m in (cpu.mhz_current, cpu.mhz_max) if m) or "?"
    facts = [
        ("host", f"{host.hostname} ({host.platform})"),
        (
            "CPU",
            (
                f"{cpu.model}: {cpu.physical_cores} cores / {cpu.logical_cores} threads, "
                f"{cpu.usable_cpus} usable, {mhz} MHz, L3 {gib(cpu.l3_bytes) if cpu.l3_bytes else '?'}"
            ),
        ),
        ("RAM", f"{gib(host.memory.total_bytes)} total, {gib(host.memory.available_bytes)} available"),
        (
            "NUMA",
            "; ".join(
                f"node {n.id}: CPUs {n.cpulist}" + (f", {gib(n.memory_bytes)}" if n.memory_bytes else "")
                for n in host.numa_nodes
            )
            or "unknown",
        ),
        ("cgroup", _cgroup_fact(host)),
        (
            "disk",
            f"{disk.path} on {disk.mount_point} ({disk.device}, {disk.fstype}): {gib(disk.free_bytes)} free "
            f"of {gib(disk.total_bytes)}; read "
            + (
                f"{mbs(disk.read_bytes_per_s)} ({disk.read_note})"
                if disk.read_bytes_per_s
                else disk.read_note
            ),
        ),
    ]
    return facts + _gpu_facts(host)


def _cgroup_fact(host: HostReport) -> str:
    cg = host.cgroup
    if cg.version is None:
        return "none found"
    cpu = f"{cg.cpu_quota:g} CPUs" if cg.cpu_quota else "no CPU quota"
    memory = gib(cg.memory_limit_bytes) if cg.memory_limit_bytes else "no memory limit"
    return f"v{cg.version}: {cpu}, {memory}"


def _gpu_facts(host: HostReport) -> list[tuple[str, str]]:
    report = host.gpu
    if not report.gpus:
        return [("GPUs", f"none ({report.reason})")]
    facts = [("driver", f"{report.driver_version} (CUDA {report.cuda_driver_version})")]
    for g in report.gpus:
        pcie = f"PCIe gen{g.pcie_gen} x{g.pcie_width}" if g.pcie_gen else "PCIe ?"
        numa = f", NUMA node {g.numa_node}" if g.numa_node is not None else ""
        facts.append(
            (
                f"GPU {g.index}",
                (
                    f"{g.name}, {gib(g.memory_bytes)} ({gib(g.memory_used_bytes)} used), "
                    f"cc {cc(g)}, {pcie}, {g.nvlinks_active} NVLinks{numa}"
                ),
            )
        )
    if len(report.gpus) > 1:
        facts.append(
            ("topology", "\n".join(" ".join(f"{cell:>4}" for cell in row) for row in report.topology))
        )
    return facts


def print_report(host: HostReport, req: Requirements | None, checks: list[Check]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    facts = Table(title="this host", show_header=False, title_justify="left")
    for key, value in host_facts(host):
        facts.add_row(key, value)
    console.print(facts)
    title = (
        f"checks against a plan for {req.total_params / 1e9:.0f}B params on {req.num_gpus}x {req.gpu}"
        f" over {req.nodes} node(s)"
        if req
        else "checks (host only)"
    )
    table = Table("status", "check", "result", "advice", title=title, title_justify="left")
    colours = {PASS: "green", WARN: "yellow", FAIL: "bold red"}
    for c in checks:
        table.add_row(f"[{colours[c.status]}]{c.status}[/]", c.name, c.message, c.advice)
    console.print(table)
    counts = summarize(checks)
    console.print(f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail")
    if req is None:
        console.print(
            "no plan given: check against one with `r1deploy doctor --model deepseek-r1 --gpu h200` "
            "or `r1deploy doctor --plan PLAN.json` (from `r1deploy plan --json`)"
        )
