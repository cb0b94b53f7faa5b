"""The expert store's host tier: a SlotPool in (pinned) host memory that load_weights fills, backed by the disk
tier (expert_source.py) for experts beyond the host budget, which it reads in on demand (evicting, LRU, only
experts the disk can serve again)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from r1deploy.quant.fp8_block import FP8_DTYPE
from r1deploy.weights import WeightLoadError
from r1deploy.weights.expert_source import ExpertSource
from r1deploy.weights.pinned import PinnedHostMemory
from r1deploy.weights.slot_pool import PROJECTIONS, ExpertLayout, Key, SlotPool

HostTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class HostTier(SlotPool):
    def __init__(self, layout: ExpertLayout, capacity: int, grow: bool, pin: bool, disk: ExpertSource,
                 counts: dict[str, float], before_evict: Callable[[], None]) -> None:
        """grow: no host budget, the pool grows as experts are loaded. counts: the store's counters (host_hits,
        disk_reads, bytes_from_disk, host_evictions). before_evict: waits for copies that may read a slot."""
        self.layout, self.disk, self.memory = layout, disk, PinnedHostMemory(pin)
        pools = layout.alloc(capacity, self.memory.empty)
        super().__init__(pools[0], pools[1], "lru", *pools[2:])
        self._grow, self._counts, self._before_evict = grow, counts, before_evict
        self._filled: dict[Key, set[str]] = {}  # parts written into the host slot during loading
        self._staging: HostTensors | None = None  # a disk read with no room in the tier

    # ---- loading ----------------------------------------------------------------------------

    def load_expert(self, layer: int, expert: int, projection: str, tensor: torch.Tensor,
                    scale: bool | None = None) -> None:
        """One checkpoint tensor during load_weights: into the tier while it has room; otherwise dropped if the
        disk tier can serve it, else an error (the host budget is too small). FP8: the weight and its scales
        arrive separately (scale: which one; None tells them apart by dtype and shape)."""
        key = (layer, expert)
        parts = self.layout.as_parts(projection, tensor, scale)
        slot = self.slot_of.get(key)
        if slot is None:
            if not self.free and self._grow:
                self._grow_pool()
            if not self.free:
                if projection in self.disk.sources.get(key, {}):
                    return
                raise WeightLoadError(
                    f"expert {expert} of layer {layer} fits neither the host weight budget nor a disk source "
                    "(offloading to disk needs a safetensors checkpoint directory)")
            slot = self.claim(key, set())[0]  # type: ignore[index]
        targets = self.targets(slot)
        for part, value in parts.items():
            target = targets[part]
            if target.shape != value.shape:
                what = f"{part.removesuffix('_scale')}_proj{' scales' if part.endswith('_scale') else ''}"
                raise ValueError(f"expert {expert} {what}: expected {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)
            self._filled.setdefault(key, set()).add(part)

    def _grow_pool(self) -> None:
        n = max(1, self.capacity)
        pools = [torch.cat([old, new]) for old, new in zip(self.tensors(), self.layout.alloc(n, self.memory.empty),
                                                            strict=True)]
        if self.memory.pin and self.memory.pinned:
            pools = [t.pin_memory() for t in pools]
        self.grow(pools)

    def finish_loading(self, expected: Iterable[Key] = ()) -> None:
        """Check every expected expert is complete in the tier or on disk."""
        parts = set(self.layout.parts)
        missing = []
        for key in expected:
            have = self._filled.get(key, set()) | self.disk.parts(key)
            if not parts <= have:
                missing.append(key)
        partial = [k for k, p in self._filled.items() if p != parts and not parts <= p | self.disk.parts(k)]
        if missing or partial:
            raise WeightLoadError(f"experts incomplete after loading (layer, expert): {sorted(missing + partial)[:20]}")
        # A host copy missing some part that disk has: complete it from disk now (a projection and its scales).
        for key, filled in self._filled.items():
            targets = self.targets(self.slot_of[key])
            for p in {part.removesuffix("_scale") for part in parts - filled}:
                for part, value in self.disk.read_parts(key, p).items():
                    targets[part].copy_(value)
                    filled.add(part)

    @torch.no_grad()
    def init_dummy(self, keys: Iterable[Key], device: torch.device, seed: int, std: float) -> None:
        """Every expert of `keys` gets a slot filled with Normal(0, std) values (weights.dummy's distribution), as
        if loaded. On CUDA the values are drawn on the device in chunks and copied down (tens of GB of host RAM
        filled at PCIe speed, not at one CPU core's)."""
        keys = [k for k in dict.fromkeys(keys) if k not in self.slot_of]
        free = len(self.free) if not self._grow else len(keys)
        if len(keys) > free:
            raise WeightLoadError(f"dummy experts: {len(keys)} experts, room for {free} in the host weight budget")
        where = device if device.type == "cuda" else torch.device("cpu")
        generator = torch.Generator(device=where).manual_seed(seed)
        fp8 = self.layout.fp8
        chunk = 8 if fp8 else 16  # FP8 weights are drawn through an fp32 staging buffer of the chunk
        for start in range(0, len(keys), chunk):
            group = keys[start:start + chunk]
            slots = []
            for key in group:
                if not self.free and self._grow:
                    self._grow_pool()
                slots.append(self.claim(key, set())[0])  # type: ignore[index]
                self._filled[key] = set(self.layout.parts)
            for n, pool in enumerate(self.tensors()):
                shape = (len(group), *pool.shape[1:])
                if not fp8:
                    values = torch.empty(shape, dtype=self.layout.dtype, device=where)
                    values.normal_(0.0, std, generator=generator)  # copied straight into the (pinned) slots below
                elif n < 2:  # FP8 weights: e4m3 values of N(0, 1) (|x| < 448 for any draw), as weights.dummy
                    values = torch.empty(shape, dtype=torch.float32, device=where)
                    values = values.normal_(0.0, 1.0, generator=generator).to(FP8_DTYPE)
                else:  # every block scale std: they dequantise to N(0, std) up to e4m3 rounding
                    values = torch.full(shape, std, dtype=torch.float32, device=where)
                if slots == list(range(slots[0], slots[0] + len(slots))):
                    pool[slots[0]:slots[0] + len(slots)].copy_(values)
                else:
                    for j, slot in enumerate(slots):
                        pool[slot].copy_(values[j])

    # ---- serving ----------------------------------------------------------------------------

    def _slot(self, key: Key) -> int:
        """The key's slot, reading it from disk (and evicting a disk-backed entry) if needed; -1: staged."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self._counts["host_hits"] += 1
            return self.touch(key)
        sources = self.disk.sources.get(key)
        if sources is None or set(sources) != set(PROJECTIONS):
            raise KeyError(f"expert {key[1]} of layer {key[0]} was never loaded")
        claimed = self.claim(key, set(), lambda k: k in self.disk.sources) if self.capacity else None
        tensors = {part: t for p in sources for part, t in self.disk.read_parts(key, p).items()}
        self._counts["disk_reads"] += 1
        self._counts["bytes_from_disk"] += sum(t.numel() * t.element_size() for t in tensors.values())
        if claimed is None:  # no room in the host tier: a one-off staging buffer
            scales = ((torch.cat([tensors["gate_scale"], tensors["up_scale"]]), tensors["down_scale"])
                      if self.layout.fp8 else (None, None))
            self._staging = torch.cat([tensors["gate"], tensors["up"]]), tensors["down"], *scales
            return -1
        slot, evicted = claimed
        if evicted is not None:
            self._counts["host_evictions"] += 1
            self._before_evict()  # an in-flight copy may still read the evicted slot
        targets = self.targets(slot)
        for p, t in tensors.items():
            targets[p].copy_(t)
        self.touch(key)
        return slot

    def expert(self, key: Key) -> HostTensors:
        """(gate_up, down, gate_up scales, down scales) of the key's host copy; the scales None unless FP8."""
        slot = self._slot(key)
        if slot < 0:
            return self._staging
        if not self.layout.fp8:
            return self.gate_up[slot], self.down[slot], None, None
        return self.gate_up[slot], self.down[slot], self.gate_up_scale[slot], self.down_scale[slot]

    def close(self) -> None:
        """Drop the stacks and unpin them; the tier holds nothing afterwards."""
        self.memory.release()
        pools = self.layout.alloc(0, torch.empty)
        self.gate_up, self.down = pools[0], pools[1]
        if self.layout.fp8:
            self.gate_up_scale, self.down_scale = pools[2], pools[3]
        self.slot_of.clear()
        self.free = []
        self._staging = None
        self.disk.close()
