"""GPU catalog: specs as data (gpus.json), extended or overridden by a user --gpu-file and --price-file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from r1deploy.errors import UsageError

CATALOG_PATH = Path(__file__).with_name("gpus.json")
GiB = 2**30
GB = 10**9

# Architectures with FP8 tensor cores (Ada, Hopper, Blackwell; AMD CDNA3). Ampere has none.
FP8_ARCHS = frozenset({"ada", "hopper", "blackwell", "cdna3"})


@dataclass(frozen=True)
class GpuSpec:
    name: str
    display_name: str
    arch: str
    memory_gib: float
    memory_bandwidth_tb_s: float
    bf16_tflops: float
    fp8_tflops: float | None
    nvlink_gb_s: float  # bidirectional per GPU; 0 = no NVLink (PCIe only)
    pcie_gb_s: float  # bidirectional
    internode_gb_s: float  # this GPU's share of the cluster network, bidirectional
    price_usd_per_hour: float
    aliases: tuple[str, ...] = ()
    source: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    @property
    def fp8_compute(self) -> bool:
        return self.arch in FP8_ARCHS and bool(self.fp8_tflops)

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.memory_bandwidth_tb_s * 1e12

    @property
    def intranode_bytes_s(self) -> float:
        """One direction of the GPU-to-GPU link inside a node (NVLink if present, else PCIe)."""
        return (self.nvlink_gb_s or self.pcie_gb_s) * GB / 2

    @property
    def internode_bytes_s(self) -> float:
        return self.internode_gb_s * GB / 2


_REQUIRED = ("arch", "memory_gib", "memory_bandwidth_tb_s", "bf16_tflops")
_DEFAULTS: dict[str, Any] = {"fp8_tflops": None, "nvlink_gb_s": 0.0, "pcie_gb_s": 64.0, "internode_gb_s": 25.0,
                             "price_usd_per_hour": 0.0, "aliases": (), "source": ""}
_FIELDS = {f.name for f in fields(GpuSpec)} - {"name"}


def _read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None


def _make(name: str, entry: dict[str, Any], base: GpuSpec | None, origin: str) -> GpuSpec:
    unknown = set(entry) - _FIELDS
    if unknown:
        raise UsageError(f"{origin}: GPU {name!r} has unknown keys {sorted(unknown)}; valid: {sorted(_FIELDS)}")
    if base is not None:
        return replace(base, **{k: tuple(v) if k == "aliases" else v for k, v in entry.items()})
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise UsageError(f"{origin}: new GPU {name!r} is missing {', '.join(missing)}")
    values = {**_DEFAULTS, "display_name": name, **entry}
    values["aliases"] = tuple(values["aliases"])
    return GpuSpec(name=name, **values)


class Catalog:
    """Name -> GpuSpec, with aliases; the order of the built-in file is kept for listings."""

    def __init__(self, gpus: dict[str, GpuSpec]) -> None:
        self.gpus = gpus
        self._lookup = {n: n for n in gpus} | {a: n for n, g in gpus.items() for a in g.aliases}

    @classmethod
    def load(cls, gpu_file: str | Path | None = None, price_file: str | Path | None = None) -> Catalog:
        raw = _read_json(CATALOG_PATH, "GPU catalog")["gpus"]
        gpus = {name: _make(name, entry, None, str(CATALOG_PATH)) for name, entry in raw.items()}
        if gpu_file:
            user = _read_json(gpu_file, "--gpu-file")
            user = user.get("gpus", user) if isinstance(user, dict) else None
            if not isinstance(user, dict):
                raise UsageError(f"--gpu-file {gpu_file}: expected an object {{name: {{spec...}}}}")
            for name, entry in user.items():
                key = name.lower()
                gpus[key] = _make(key, entry, gpus.get(key), f"--gpu-file {gpu_file}")
        catalog = cls(gpus)
        if price_file:
            prices = _read_json(price_file, "--price-file")
            if not isinstance(prices, dict):
                raise UsageError(f"--price-file {price_file}: expected an object {{gpu: usd_per_gpu_hour}}")
            for name, price in prices.items():
                if not isinstance(price, (int, float)) or price < 0:
                    raise UsageError(f"--price-file {price_file}: price of {name!r} must be a number >= 0")
                spec = catalog.get(name)
                catalog.gpus[spec.name] = replace(spec, price_usd_per_hour=float(price))
        return catalog

    def get(self, name: str) -> GpuSpec:
        key = name.strip().lower()
        if key not in self._lookup:
            raise UsageError(f"unknown GPU {name!r}; known: {', '.join(self.gpus)}")
        return self.gpus[self._lookup[key]]

    def __iter__(self) -> Iterator[GpuSpec]:
        return iter(self.gpus.values())
