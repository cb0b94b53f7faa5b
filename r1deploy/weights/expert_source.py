"""The expert store's disk tier: where each routed expert's tensors sit in the checkpoint's safetensors files
(indexed from the headers only), read on demand through safetensors' memory map (`safe_open`, never
torch.load). Per-expert tensors (`experts.{e}.gate_proj.weight`) and transformers 5's stacks
(`experts.gate_up_proj` [E, 2I, H]) are both served; FP8 weights come with their `weight_scale_inv`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block
from r1deploy.quant.fp8_checkpoint import SCALE_SUFFIX
from r1deploy.weights import WeightLoadError
from r1deploy.weights.checkpoint_names import STACKED_EXPERTS, expert_tensor
from r1deploy.weights.slot_pool import ExpertLayout, Key


@dataclass(frozen=True)
class DiskSource:
    path: Path
    name: str
    index: int | None  # row of a stacked [E, ...] tensor, or None for a per-expert tensor
    rows: tuple[int, int] | None  # gate / up half of a stacked gate_up_proj
    scale: str | None  # FP8 block scale sibling
    scale_rows: tuple[int, int] | None = None  # gate / up tile rows of a stacked gate_up_proj_scale_inv


class ExpertSource:
    def __init__(self, layout: ExpertLayout, model_dir: Path | None) -> None:
        self.layout = layout
        self.sources: dict[Key, dict[str, DiskSource]] = {}  # (layer, expert) -> projection -> where
        self._handles: dict[Path, object] = {}
        if model_dir is not None:
            self._index(model_dir)

    def _index(self, model_dir: Path) -> None:
        """Expert tensor locations from the safetensors headers (nothing is read but the header). A directory
        with a config.json only (load_format="dummy") has no disk tier."""
        from r1deploy.weights.safetensors_reader import INDEX_FILE, safetensors_files

        if not (model_dir / INDEX_FILE).is_file() and not any(model_dir.glob("*.safetensors")):
            return
        for path in safetensors_files(model_dir):
            with safe_open(path, framework="pt") as f:
                names = set(f.keys())
            for name in names:
                scale = name + SCALE_SUFFIX if name + SCALE_SUFFIX in names else None
                expert = expert_tensor(name)
                if expert is not None:
                    if expert.kind == "weight":
                        key = (expert.layer, expert.expert)
                        self.sources.setdefault(key, {})[expert.projection] = DiskSource(path, name, None, None, scale)
                    continue
                m = STACKED_EXPERTS.match(name)
                if m:
                    with safe_open(path, framework="pt") as f:
                        num_experts = f.get_slice(name).get_shape()[0]
                    layer, i = int(m.group(1)), self.layout.intermediate_size
                    tiles = -(-i // self.layout.fp8_block[0])  # the gate's scale rows in a stacked gate_up scale
                    for e in range(num_experts):
                        sources = self.sources.setdefault((layer, e), {})
                        if m.group(2) == "down_proj":
                            sources["down"] = DiskSource(path, name, e, None, scale)
                        else:
                            sources["gate"] = DiskSource(path, name, e, (0, i), scale, (0, tiles))
                            sources["up"] = DiskSource(path, name, e, (i, 2 * i), scale, (tiles, 2 * tiles))

    def parts(self, key: Key) -> set[str]:
        """The parts the disk tier can serve (an FP8 store quantises a weight stored without scales)."""
        projections = set(self.sources.get(key, {}))
        return projections | ({p + "_scale" for p in projections} if self.layout.fp8 else set())

    def _read_tensor(self, src: DiskSource, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        handle = self._handles.get(src.path)
        if handle is None:
            handle = self._handles[src.path] = safe_open(src.path, framework="pt")  # mmap, kept open
        if src.index is None:
            return handle.get_tensor(name)
        t = handle.get_slice(name)[src.index]
        return t if rows is None else t[rows[0]:rows[1]]

    def _read_dequantized(self, src: DiskSource) -> torch.Tensor:
        """One projection in the model dtype (FP8 checkpoints dequantised)."""
        t = self._read_tensor(src, src.name, src.rows)
        if src.scale is not None:
            scale = self._read_tensor(src, src.scale, src.scale_rows)
            return dequantize_fp8_block(t, scale, self.layout.dtype, self.layout.fp8_block)
        return t.to(self.layout.dtype)

    def read_parts(self, key: Key, projection: str) -> dict[str, torch.Tensor]:
        """The store's parts of one projection read from disk: FP8 store, the FP8 weight and its scales as
        stored (a weight stored unquantised is quantised); otherwise the model-dtype tensor."""
        src = self.sources[key][projection]
        if not self.layout.fp8:
            return {projection: self._read_dequantized(src)}
        t = self._read_tensor(src, src.name, src.rows)
        if src.scale is None:
            if t.dtype == FP8_DTYPE:
                raise WeightLoadError(f"{src.name}: FP8 weight without its {SCALE_SUFFIX} sibling in {src.path.name}")
            return self.layout.as_parts(projection, t, False)
        return {projection: t, projection + "_scale": self._read_tensor(src, src.scale, src.scale_rows)}

    def close(self) -> None:
        self._handles.clear()
