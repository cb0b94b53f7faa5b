"""NVIDIA GPUs of this host through nvidia-ml-py (NVML), for `r1deploy doctor`.

NVML is queried rather than torch.cuda because it needs no CUDA context, works in a CPU-only
install and reports the driver, PCIe links, NVLinks and the peer topology. Every failure (no
library, no driver, no GPU, a query a GPU does not support) ends in data, never an exception:
`GpuReport.gpus` is empty and `reason` says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# nvidia-smi's `topo -m` labels for NVML's common-ancestor levels, so the matrix reads the same.
_TOPOLOGY_LABELS = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
NVLINK = "NV"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int
    memory_used_bytes: int
    compute_capability: tuple[int, int]
    bus_id: str
    numa_node: int | None
    pcie_gen: int | None
    pcie_width: int | None
    nvlinks_active: int


@dataclass(frozen=True)
class GpuReport:
    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    cuda_driver_version: str | None
    # topology[i][j]: "NV" when GPUs i and j talk over NVLink, else their PCIe path (PIX..SYS);
    # "X" on the diagonal.
    topology: tuple[tuple[str, ...], ...]
    # Why `gpus` is empty: the library is missing, NVML did not start, or it found no device.
    reason: str | None


def probe_gpus() -> GpuReport:
    try:
        import pynvml
    except ImportError as exc:
        return _empty(f"nvidia-ml-py not installed: {exc}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _empty(f"nvidia-ml-py: {exc}")
    try:
        return _probe(pynvml)
    except pynvml.NVMLError as exc:
        return _empty(f"nvidia-ml-py: {exc}")
    finally:
        pynvml.nvmlShutdown()


def _empty(reason: str) -> GpuReport:
    return GpuReport(gpus=(), driver_version=None, cuda_driver_version=None, topology=(), reason=reason)


def _probe(nvml: ModuleType) -> GpuReport:
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    gpus = tuple(_gpu(nvml, i, h) for i, h in enumerate(handles))
    return GpuReport(
        gpus=gpus,
        driver_version=_optional(nvml, nvml.nvmlSystemGetDriverVersion),
        cuda_driver_version=_cuda_version(_optional(nvml, nvml.nvmlSystemGetCudaDriverVersion)),
        topology=_topology(nvml, handles),
        reason=None if gpus else "nvidia-ml-py: the driver reports no GPU",
    )


def _gpu(nvml: ModuleType, index: int, handle: Any) -> GpuInfo:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    raw_bus_id = nvml.nvmlDeviceGetPciInfo(handle).busId
    bus_id = raw_bus_id if isinstance(raw_bus_id, str) else raw_bus_id.decode()  # bytes in older nvidia-ml-py
    return GpuInfo(
        index=index,
        name=nvml.nvmlDeviceGetName(handle),
        memory_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        compute_capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),
        bus_id=bus_id,
        numa_node=_numa_node(nvml, handle, bus_id),
        pcie_gen=_optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_width=_optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        nvlinks_active=_nvlinks_active(nvml, handle),
    )


def _optional(nvml: ModuleType, query: Any, *args: Any) -> Any:
    """A query some GPUs or drivers do not support (NOT_SUPPORTED, FUNCTION_NOT_FOUND): None instead."""
    try:
        return query(*args)
    except nvml.NVMLError:
        return None


def _cuda_version(raw: int | None) -> str | None:
    # NVML encodes CUDA 12.4 as 12040.
    return None if raw is None else f"{raw // 1000}.{raw % 1000 // 10}"


def _numa_node(nvml: ModuleType, handle: Any, bus_id: str) -> int | None:
    query = getattr(nvml, "nvmlDeviceGetNumaNodeId", None)
    node = _optional(nvml, query, handle) if query else None
    if node is not None and node >= 0:
        return int(node)
    # Older drivers lack nvmlDeviceGetNumaNodeId; sysfs knows it.
    # NVML's bus id has an 8-digit PCI domain, sysfs a 4-digit one.
    path = Path("/sys/bus/pci/devices") / bus_id.lower()[-12:] / "numa_node"
    try:
        value = int(path.read_text())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None


def _nvlinks_active(nvml: ModuleType, handle: Any) -> int:
    active = 0
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        state = _optional(nvml, nvml.nvmlDeviceGetNvLinkState, handle, link)
        if state is None:  # PCIe-only GPUs answer NOT_SUPPORTED, and links past the last are invalid.
            break
        active += state == nvml.NVML_FEATURE_ENABLED
    return active


def _topology(nvml: ModuleType, handles: list[Any]) -> tuple[tuple[str, ...], ...]:
    return tuple(
        tuple(_link(nvml, a, b, i == j) for j, b in enumerate(handles)) for i, a in enumerate(handles)
    )


def _link(nvml: ModuleType, a: Any, b: Any, same: bool) -> str:
    if same:
        return "X"
    # P2P over NVLink covers both direct links and NVSwitch fabrics, where a link's remote end is the switch.
    nvlink = _optional(nvml, nvml.nvmlDeviceGetP2PStatus, a, b, nvml.NVML_P2P_CAPS_INDEX_NVLINK)
    if nvlink == nvml.NVML_P2P_STATUS_OK:
        return NVLINK
    level = _optional(nvml, nvml.nvmlDeviceGetTopologyCommonAncestor, a, b)
    return _TOPOLOGY_LABELS.get(level, "?")


def gpu_pids() -> dict[int, int]:
    """{pid: GPU index} of the processes holding a CUDA context on each GPU; {} without NVML or GPUs."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        owners = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in _optional(pynvml, pynvml.nvmlDeviceGetComputeRunningProcesses, handle) or ():
                owners[int(process.pid)] = index
        return owners
    except pynvml.NVMLError:
        return {}
    finally:
        pynvml.nvmlShutdown()
