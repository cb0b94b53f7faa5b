"""Tiered GPU / host / disk store for routed MoE experts (`--offload experts`).

Three tiers, one expert (gate_up [2I, H] + down [H, I]) per slot:

* device: a fixed pool of `num_gpu_slots` slots shared by every MoE layer, LRU or frequency-aware
  ("lfu": fewest uses first, ties by age) eviction. `get(layer, ids)` returns the pool and the slot
  of each requested expert, copying misses in. On CUDA the copies run on a side stream and the
  compute stream waits on their events; on CPU the pool is just a bounded tensor in host memory,
  so the whole logic runs in CI.
* host: a second slot pool (pinned when the device is CUDA) of `host_budget_bytes`; experts with a
  disk source are evicted from it LRU, experts without one (no checkpoint dir) stay pinned in it.
* disk: the rest, read on demand through safetensors' memory map (`safe_open`, never torch.load);
  FP8 block-scaled experts are dequantised on read, unless the store holds FP8.

FP8 (`fp8=True`, DeepSeek-V3/R1's block-scaled checkpoints): every tier holds the checkpoint's
float8_e4m3fn weights as stored plus their fp32 `weight_scale_inv` tiles (`fp8_block`, 128 x 128 for
R1): gate_up [2I, H] FP8 with scales [2 * ceil(I/bn), ceil(H/bk)] (the gate's tile rows, then the
up's), down [H, I] FP8 with scales [ceil(H/bn), ceil(I/bk)], the layout of layers/moe/experts_dense.Fp8BlockExperts'
FP8 stacks. Copies move both (1 byte a weight: half of bf16; `expert_bytes` and the byte counters
include the scales). get() hands out the FP8 pools with their scale pools (fused_moe reads FP8 and
scales each tile); the host-compute path and CPU callers dequantise with `dequantize_expert`.

`prefetch(layer, ids)` starts copies ahead of use (the MoE layer predicts the next layer's experts
by running that layer's router on its own input) and never evicts what the current layer uses.
A missed expert can instead be computed where its host copy lives (`cpu_compute`: "never",
"always", or "auto" with a cost model: bytes / PCIe bandwidth against max(FLOPs / CPU rate,
bytes / host memory bandwidth)). `stats()` returns a frozen snapshot of the counters.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from safetensors import safe_open

from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block
from r1deploy.weights import WeightLoadError
from r1deploy.weights.offload import TierStats

_EXPERT = re.compile(r"^model\.layers\.(\d+)\..*\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"^model\.layers\.(\d+)\..*\.experts\.(gate_up_proj|down_proj)$")
_SCALE_SUFFIX = "_scale_inv"
PROJECTIONS = ("gate", "up", "down")
SCALES = ("gate_scale", "up_scale", "down_scale")  # FP8 stores: each projection's block-scale part
CPU_COMPUTE_MODES = ("never", "always", "auto")
POLICIES = ("lru", "lfu")

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class CostModel:
    """Rates for choosing copy-then-compute vs compute-on-host for a missed expert."""

    pcie_bytes_per_s: float = 25e9
    cpu_flops_per_s: float = 1e12
    host_bytes_per_s: float = 100e9

    def copy_s(self, nbytes: int) -> float:
        return nbytes / self.pcie_bytes_per_s

    def cpu_s(self, nbytes: int, flops: float) -> float:
        return max(flops / self.cpu_flops_per_s, nbytes / self.host_bytes_per_s)

    @staticmethod
    def measure(device: torch.device, nbytes: int = 64 << 20, dim: int = 1024) -> CostModel:
        """Time one host->device copy of nbytes (pinned where CUDA), a host GEMM and a host copy."""
        device = torch.device(device)
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        host_dst = torch.empty_like(src)
        for _ in range(2):  # first round warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            pcie = nbytes / max(time.perf_counter() - t0, 1e-9)
            t0 = time.perf_counter()
            host_dst.copy_(src)
            host = 2 * nbytes / max(time.perf_counter() - t0, 1e-9)
            a = torch.randn(dim, dim)
            t0 = time.perf_counter()
            a @ a
            flops = 2 * dim**3 / max(time.perf_counter() - t0, 1e-9)
        return CostModel(pcie, flops, host)


@dataclass(frozen=True)
class Resident:
    """What get() returns: the device pool stacks and, per requested expert, its slot in them."""

    slots: tuple[int, ...]
    gate_up: torch.Tensor  # [S, 2I, H] (float8_e4m3fn in an FP8 store)
    down: torch.Tensor  # [S, H, I]
    gate_up_scale: torch.Tensor | None = None  # FP8: [S, 2 * ceil(I/bn), ceil(H/bk)] fp32
    down_scale: torch.Tensor | None = None  # FP8: [S, ceil(H/bn), ceil(I/bk)] fp32


@dataclass(frozen=True)
class _DiskSource:
    path: Path
    name: str
    index: int | None  # row of a stacked [E, ...] tensor, or None for a per-expert tensor
    rows: tuple[int, int] | None  # gate / up half of a stacked gate_up_proj
    scale: str | None  # FP8 block scale sibling
    scale_rows: tuple[int, int] | None = None  # gate / up tile rows of a stacked gate_up_proj_scale_inv


class _SlotPool:
    """Fixed slots holding experts; key -> slot with LRU / LFU victim choice."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, policy: str,
                 gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None) -> None:
        self.gate_up, self.down = gate_up, down
        self.gate_up_scale, self.down_scale = gate_up_scale, down_scale  # FP8 stores only
        self.policy = policy
        self.slot_of: OrderedDict[Key, int] = OrderedDict()  # oldest use first
        self.uses: dict[Key, int] = {}
        self.free = list(range(gate_up.shape[0]))[::-1]

    @classmethod
    def of(cls, pools: Sequence[torch.Tensor], policy: str) -> _SlotPool:
        """From (gate_up, down) or (gate_up, down, gate_up_scale, down_scale)."""
        return cls(pools[0], pools[1], policy, *pools[2:])

    @property
    def capacity(self) -> int:
        return self.gate_up.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gate_up, self.down, self.gate_up_scale, self.down_scale) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def touch(self, key: Key) -> int:
        self.slot_of.move_to_end(key)
        self.uses[key] = self.uses.get(key, 0) + 1
        return self.slot_of[key]

    def victim(self, exclude: set[Key], evictable: Callable[[Key], bool] = lambda k: True) -> Key | None:
        candidates = [k for k in self.slot_of if k not in exclude and evictable(k)]  # oldest first
        if not candidates:
            return None
        if self.policy == "lfu":
            return min(candidates, key=lambda k: self.uses.get(k, 0))  # min is stable: oldest wins ties
        return candidates[0]

    def claim(self, key: Key, exclude: set[Key], evictable: Callable[[Key], bool] = lambda k: True
              ) -> tuple[int, Key | None] | None:
        """A slot for key (not yet filled): a free one, else the victim's. None when nothing can go."""
        evicted = None
        if self.free:
            slot = self.free.pop()
        else:
            evicted = self.victim(exclude, evictable)
            if evicted is None:
                return None
            slot = self.slot_of.pop(evicted)
        self.slot_of[key] = slot
        return slot, evicted


class TieredExpertStore:
    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        num_gpu_slots: int | None = None,
        gpu_budget_bytes: int | None = None,
        host_budget_bytes: int | None = None,  # None: every expert fits in the host tier
        checkpoint_dir: Path | str | None = None,  # disk tier source
        policy: str = "lru",
        prefetch: bool = True,
        cpu_compute: str = "never",
        cost_model: CostModel | None = None,
        pin_memory: bool | None = None,  # default: when the device is CUDA
        fp8_block: tuple[int, int] = (128, 128),
        total_experts: int | None = None,  # caps the host pool (layers x experts)
        fp8: bool = False,  # hold FP8 weights + fp8_block scales in every tier (dtype: the compute dtype)
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if cpu_compute not in CPU_COMPUTE_MODES:
            raise ValueError(f"cpu_compute must be one of {CPU_COMPUTE_MODES}, got {cpu_compute!r}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.dtype, self.device = dtype, torch.device(device)
        self.fp8, self.fp8_block = fp8, tuple(fp8_block)
        self.weight_dtype = FP8_DTYPE if fp8 else dtype
        i, h = intermediate_size, hidden_size
        if fp8:
            bn, bk = self.fp8_block
            # gate_up: the gate's tile rows, then the up's (never a shared tile); down: its own tiles.
            self.scale_shapes: tuple[tuple[int, int], tuple[int, int]] | None = (
                (2 * -(-i // bn), -(-h // bk)), (-(-h // bn), -(-i // bk)))
        else:
            self.scale_shapes = None
        self.parts = PROJECTIONS + (SCALES if fp8 else ())
        self.expert_bytes = 3 * h * i * self.weight_dtype.itemsize + (
            4 * sum(r * c for r, c in self.scale_shapes) if self.scale_shapes else 0)
        if num_gpu_slots is None:
            if gpu_budget_bytes is None:
                raise ValueError("give num_gpu_slots or gpu_budget_bytes")
            num_gpu_slots = gpu_budget_bytes // self.expert_bytes
        if num_gpu_slots < 1:
            raise ValueError(f"the GPU weight budget holds no expert ({self.expert_bytes} bytes each)")
        self.policy, self.prefetch_enabled, self.cpu_compute = policy, prefetch, cpu_compute
        self.cost_model = cost_model or CostModel()
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self._registered: list[torch.Tensor] = []  # host tensors page-locked by cudaHostRegister
        self.gpu = _SlotPool.of(self._alloc_pool(num_gpu_slots, lambda n, *shape, dtype: torch.empty(
            n, *shape, dtype=dtype, device=self.device)), policy)
        host_slots = (host_budget_bytes // self.expert_bytes if host_budget_bytes is not None
                      else (total_experts if total_experts is not None else 0))
        if total_experts is not None:
            host_slots = min(host_slots, total_experts)
        self._host_pinned = False
        self.host = _SlotPool.of(self._alloc_pool(host_slots, self._host_alloc), "lru")
        self._grow_host = host_budget_bytes is None and total_experts is None  # unbounded: grow as loaded
        self._filled: dict[Key, set[str]] = {}  # projections written into the host slot during loading
        self.disk: dict[Key, dict[str, _DiskSource]] = {}
        self._handles: dict[Path, object] = {}
        if checkpoint_dir is not None:
            self._index_checkpoint(Path(checkpoint_dir))
        self._gates: dict[int, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {}
        self._in_use: set[Key] = set()  # keys the latest get() returned: prefetch must not evict them
        self._prefetched: set[Key] = set()
        self._events: dict[int, torch.cuda.Event] = {}  # device slot -> copy done
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._counts: dict[str, float] = dict.fromkeys(
            ("hits", "misses", "host_hits", "disk_reads", "bytes_to_device", "bytes_from_disk", "evictions",
             "host_evictions", "prefetches", "prefetch_hits", "prefetch_dropped", "cpu_computes"), 0)
        self._counts["stall_s"] = 0.0
        self.closed = False

    # ---- construction / loading -------------------------------------------------------------

    @classmethod
    def for_model(cls, config, dtype: torch.dtype, device: torch.device | str, **kwargs) -> TieredExpertStore:
        """Sizes from a DeepseekConfig; kwargs as __init__ (budgets, checkpoint_dir, policy...)."""
        moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        kwargs.setdefault("total_experts", moe_layers * config.n_routed_experts)
        if config.fp8_block_size:
            kwargs.setdefault("fp8_block", tuple(config.fp8_block_size))
        elif kwargs.get("fp8"):
            raise ValueError("an FP8 expert store needs a checkpoint with block-scaled FP8 weights")
        return cls(hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
                   dtype=dtype, device=device, **kwargs)

    def _alloc_pool(self, n: int, alloc: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """gate_up [n, 2I, H], down [n, H, I] in the weight dtype (+ their fp32 scale stacks when FP8)."""
        i, h = self.intermediate_size, self.hidden_size
        pools = [alloc(n, 2 * i, h, dtype=self.weight_dtype), alloc(n, h, i, dtype=self.weight_dtype)]
        if self.scale_shapes is not None:
            pools += [alloc(n, *shape, dtype=torch.float32) for shape in self.scale_shapes]
        return tuple(pools)

    def _host_alloc(self, n: int, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        """The host pool. Page-locked in place (cudaHostRegister) where CUDA is up: torch's pinned allocator
        rounds every request up to a power of two, 64 GiB for R1's 60 GB of gate_up in 4 layers."""
        if self.pin and n:
            t = torch.empty(n, *shape, dtype=dtype)
            if _host_register(t):
                self._registered.append(t)
                self._host_pinned = True
                return t
            try:
                t = torch.empty(n, *shape, dtype=dtype, pin_memory=True)
                self._host_pinned = True
                return t
            except RuntimeError:  # no CUDA driver: page-locking unavailable, keep pageable memory
                pass
        return torch.empty(n, *shape, dtype=dtype)

    def _index_checkpoint(self, model_dir: Path) -> None:
        """Expert tensor locations from the safetensors headers (nothing is read but the header). A directory
        with a config.json only (load_format="dummy") has no disk tier."""
        from r1deploy.weights.safetensors_reader import INDEX_FILE, safetensors_files

        if not (model_dir / INDEX_FILE).is_file() and not any(model_dir.glob("*.safetensors")):
            return
        for path in safetensors_files(model_dir):
            with safe_open(path, framework="pt") as f:
                names = set(f.keys())
            for name in names:
                scale = name + _SCALE_SUFFIX if name + _SCALE_SUFFIX in names else None
                m = _EXPERT.match(name)
                if m:
                    key = (int(m.group(1)), int(m.group(2)))
                    self.disk.setdefault(key, {})[m.group(3)] = _DiskSource(path, name, None, None, scale)
                    continue
                m = _STACKED.match(name)
                if m:
                    with safe_open(path, framework="pt") as f:
                        num_experts = f.get_slice(name).get_shape()[0]
                    layer, i = int(m.group(1)), self.intermediate_size
                    tiles = -(-i // self.fp8_block[0])  # the gate's scale rows in a stacked gate_up scale
                    for e in range(num_experts):
                        sources = self.disk.setdefault((layer, e), {})
                        if m.group(2) == "down_proj":
                            sources["down"] = _DiskSource(path, name, e, None, scale)
                        else:
                            sources["gate"] = _DiskSource(path, name, e, (0, i), scale, (0, tiles))
                            sources["up"] = _DiskSource(path, name, e, (i, 2 * i), scale, (tiles, 2 * tiles))

    def _host_targets(self, slot: int) -> dict[str, torch.Tensor]:
        """Each part of the expert in host slot `slot` (projections, and their scales when FP8)."""
        i = self.intermediate_size
        targets = {"gate": self.host.gate_up[slot, :i], "up": self.host.gate_up[slot, i:],
                   "down": self.host.down[slot]}
        if self.scale_shapes is not None:
            tiles = self.scale_shapes[0][0] // 2
            targets.update(gate_scale=self.host.gate_up_scale[slot, :tiles],
                           up_scale=self.host.gate_up_scale[slot, tiles:], down_scale=self.host.down_scale[slot])
        return targets

    def _scale_shape(self, projection: str) -> tuple[int, int]:
        assert self.scale_shapes is not None
        gate_up, down = self.scale_shapes
        return down if projection == "down" else (gate_up[0] // 2, gate_up[1])

    def _as_parts(self, projection: str, tensor: torch.Tensor, scale: bool | None) -> dict[str, torch.Tensor]:
        """The host-tier parts one checkpoint tensor fills. FP8 store: an FP8 weight as is, its
        `weight_scale_inv` (scale=None: recognised as the non-FP8 tensor of the scale tile shape) as is,
        a weight stored unquantised is quantised with the store's tiles. Otherwise the tensor itself."""
        if not self.fp8:
            if scale:
                raise ValueError(f"{projection}_proj scales given to a store that holds the model dtype")
            return {projection: tensor}
        if scale is None:
            scale = tensor.dtype != FP8_DTYPE and tuple(tensor.shape) == self._scale_shape(projection)
        if scale:
            return {projection + "_scale": tensor}
        if tensor.dtype != FP8_DTYPE:
            tensor, scale_inv = quantize_fp8_block(tensor, self.fp8_block)
            return {projection: tensor, projection + "_scale": scale_inv}
        return {projection: tensor}

    def load_expert(self, layer: int, expert: int, projection: str, tensor: torch.Tensor,
                    scale: bool | None = None) -> None:
        """One checkpoint tensor during load_weights: into the host tier while it has room; otherwise
        dropped if the disk tier can serve it, else an error (the host budget is too small). FP8 store:
        the weight and its scales arrive separately (scale: which one; None tells them apart by dtype
        and shape)."""
        key = (layer, expert)
        parts = self._as_parts(projection, tensor, scale)
        slot = self.host.slot_of.get(key)
        if slot is None:
            if not self.host.free and self._grow_host:
                self._grow_host_pool()
            if not self.host.free:
                if projection in self.disk.get(key, {}):
                    return
                raise WeightLoadError(
                    f"expert {expert} of layer {layer} fits neither the host weight budget nor a disk source "
                    "(offloading to disk needs a safetensors checkpoint directory)")
            slot = self.host.claim(key, set())[0]  # type: ignore[index]
        targets = self._host_targets(slot)
        for part, value in parts.items():
            target = targets[part]
            if target.shape != value.shape:
                what = f"{part.removesuffix('_scale')}_proj{' scales' if part.endswith('_scale') else ''}"
                raise ValueError(f"expert {expert} {what}: expected {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)
            self._filled.setdefault(key, set()).add(part)

    def load_stacked(self, layer: int, which: str, tensor: torch.Tensor, scale: bool = False) -> None:
        """A stacked `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] checkpoint tensor
        (scale: its `_scale_inv` stack, gate tile rows first, in an FP8 store)."""
        rows = self._scale_shape("gate")[0] if scale else self.intermediate_size
        for e in range(tensor.shape[0]):
            if which == "down_proj":
                self.load_expert(layer, e, "down", tensor[e], scale)
            else:
                self.load_expert(layer, e, "gate", tensor[e, :rows], scale)
                self.load_expert(layer, e, "up", tensor[e, rows:], scale)

    def _grow_host_pool(self) -> None:
        n = max(1, self.host.capacity)
        pools = [torch.cat([old, new]) for old, new in zip(self.host.tensors(), self._alloc_pool(n, self._host_alloc),
                                                            strict=True)]
        if self.pin and self._host_pinned:
            pools = [t.pin_memory() for t in pools]
        self.host.free = list(range(self.host.capacity, self.host.capacity + n))[::-1] + self.host.free
        self.host.gate_up, self.host.down = pools[0], pools[1]
        if self.fp8:
            self.host.gate_up_scale, self.host.down_scale = pools[2], pools[3]

    def _disk_parts(self, key: Key) -> set[str]:
        """The parts the disk tier can serve (an FP8 store quantises a weight stored without scales)."""
        projections = set(self.disk.get(key, {}))
        return projections | ({p + "_scale" for p in projections} if self.fp8 else set())

    def finish_loading(self, expected: Iterable[Key] = ()) -> None:
        """Check every expected expert is complete in the host tier or on disk."""
        parts = set(self.parts)
        missing = []
        for key in expected:
            have = self._filled.get(key, set()) | self._disk_parts(key)
            if not parts <= have:
                missing.append(key)
        partial = [k for k, p in self._filled.items() if p != parts and not parts <= p | self._disk_parts(k)]
        if missing or partial:
            raise WeightLoadError(f"experts incomplete after loading (layer, expert): {sorted(missing + partial)[:20]}")
        # A host copy missing some part that disk has: complete it from disk now (a projection and its scales).
        for key, filled in self._filled.items():
            targets = self._host_targets(self.host.slot_of[key])
            for p in {part.removesuffix("_scale") for part in parts - filled}:
                for part, value in self._read_disk_parts(p, self.disk[key][p]).items():
                    targets[part].copy_(value)
                    filled.add(part)

    @torch.no_grad()
    def init_dummy_weights(self, keys: Iterable[Key], seed: int = 0, std: float = 0.02) -> None:
        """load_format="dummy": every expert of `keys` gets a host slot filled with Normal(0, std) values
        (weights.dummy's distribution), as if loaded. On CUDA the values are drawn on the device in chunks
        and copied down (tens of GB of host RAM filled at PCIe speed, not at one CPU core's)."""
        self._check_open()
        keys = [k for k in dict.fromkeys(keys) if k not in self.host.slot_of]
        free = len(self.host.free) if not self._grow_host else len(keys)
        if len(keys) > free:
            raise WeightLoadError(f"dummy experts: {len(keys)} experts, room for {free} in the host weight budget")
        on_device = self.device.type == "cuda"
        generator = torch.Generator(device=self.device if on_device else "cpu").manual_seed(seed)
        chunk = 8 if self.fp8 else 16  # FP8 weights are drawn through an fp32 staging buffer of the chunk
        for start in range(0, len(keys), chunk):
            group = keys[start:start + chunk]
            slots = []
            for key in group:
                if not self.host.free and self._grow_host:
                    self._grow_host_pool()
                slots.append(self.host.claim(key, set())[0])  # type: ignore[index]
                self._filled[key] = set(self.parts)
            for n, pool in enumerate(self.host.tensors()):
                shape = (len(group), *pool.shape[1:])
                where = self.device if on_device else "cpu"
                if not self.fp8:
                    values = torch.empty(shape, dtype=self.dtype, device=where)
                    values.normal_(0.0, std, generator=generator)  # copied straight into the (pinned) slots below
                elif n < 2:  # FP8 weights: e4m3 values of N(0, 1) (|x| < 448 for any draw), as weights.dummy
                    values = torch.empty(shape, dtype=torch.float32, device=where)
                    values = values.normal_(0.0, 1.0, generator=generator).to(FP8_DTYPE)
                else:  # every block scale std: they dequantise to N(0, std) up to e4m3 rounding
                    values = torch.full(shape, std, dtype=torch.float32, device=where)
                contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
                if contiguous:
                    pool[slots[0]:slots[0] + len(slots)].copy_(values)
                else:
                    for j, slot in enumerate(slots):
                        pool[slot].copy_(values[j])

    def register_gate(self, layer: int, gate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The router of a MoE layer, so the layer before it can prefetch its likely experts."""
        self._gates[layer] = gate

    # ---- tiers ------------------------------------------------------------------------------

    def _read_tensor(self, src: _DiskSource, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        handle = self._handles.get(src.path)
        if handle is None:
            handle = self._handles[src.path] = safe_open(src.path, framework="pt")  # mmap, kept open
        if src.index is None:
            return handle.get_tensor(name)
        t = handle.get_slice(name)[src.index]
        return t if rows is None else t[rows[0]:rows[1]]

    def _read_disk(self, src: _DiskSource) -> torch.Tensor:
        """One projection in the model dtype (FP8 checkpoints dequantised)."""
        t = self._read_tensor(src, src.name, src.rows)
        if src.scale is not None:
            scale = self._read_tensor(src, src.scale, src.scale_rows)
            return dequantize_fp8_block(t, scale, self.dtype, self.fp8_block)
        return t.to(self.dtype)

    def _read_disk_parts(self, projection: str, src: _DiskSource) -> dict[str, torch.Tensor]:
        """The host-tier parts of one projection read from disk: FP8 store, the FP8 weight and its
        scales as stored (a weight stored unquantised is quantised); otherwise the model-dtype tensor."""
        if not self.fp8:
            return {projection: self._read_disk(src)}
        t = self._read_tensor(src, src.name, src.rows)
        if src.scale is None:
            if t.dtype == FP8_DTYPE:
                raise WeightLoadError(f"{src.name}: FP8 weight without its {_SCALE_SUFFIX} sibling in {src.path.name}")
            return self._as_parts(projection, t, False)
        return {projection: t, projection + "_scale": self._read_tensor(src, src.scale, src.scale_rows)}

    def _host_slot(self, key: Key) -> int:
        """The key's host slot, reading it from disk (and evicting a disk-backed host entry) if needed."""
        slot = self.host.slot_of.get(key)
        if slot is not None:
            self._counts["host_hits"] += 1
            return self.host.touch(key)
        sources = self.disk.get(key)
        if sources is None or set(sources) != set(PROJECTIONS):
            raise KeyError(f"expert {key[1]} of layer {key[0]} was never loaded")
        claimed = self.host.claim(key, set(), lambda k: k in self.disk) if self.host.capacity else None
        tensors = {part: t for p, s in sources.items() for part, t in self._read_disk_parts(p, s).items()}
        self._counts["disk_reads"] += 1
        self._counts["bytes_from_disk"] += sum(t.numel() * t.element_size() for t in tensors.values())
        if claimed is None:  # no room in the host tier: a one-off staging buffer
            scales = ((torch.cat([tensors["gate_scale"], tensors["up_scale"]]), tensors["down_scale"]) if self.fp8
                      else (None, None))
            self._staging = torch.cat([tensors["gate"], tensors["up"]]), tensors["down"], *scales
            return -1
        slot, evicted = claimed
        if evicted is not None:
            self._counts["host_evictions"] += 1
            if self._stream is not None:  # an in-flight copy may still read the evicted host slot
                self._stream.synchronize()
        for p, t in tensors.items():
            self._host_targets(slot)[p].copy_(t)
        self.host.touch(key)
        return slot

    def _host_tensors(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(gate_up, down, gate_up scales, down scales) of the key's host copy; the scales None unless FP8."""
        slot = self._host_slot(key)
        if slot < 0:
            return self._staging
        if not self.fp8:
            return self.host.gate_up[slot], self.host.down[slot], None, None
        return self.host.gate_up[slot], self.host.down[slot], self.host.gate_up_scale[slot], self.host.down_scale[slot]

    def _copy_in(self, key: Key, exclude: set[Key]) -> int | None:
        """Claim a device slot for key and start the copy; None when every slot is excluded."""
        claimed = self.gpu.claim(key, exclude)
        if claimed is None:
            return None
        slot, evicted = claimed
        if evicted is not None:
            self._counts["evictions"] += 1
            self._prefetched.discard(evicted)
        sources = [t for t in self._host_tensors(key) if t is not None]  # FP8: the scales too
        targets = self.gpu.tensors()
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # slot's last readers are done
            with torch.cuda.stream(self._stream):
                for pool, src in zip(targets, sources, strict=True):
                    pool[slot].copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._events[slot] = event
        else:
            for pool, src in zip(targets, sources, strict=True):
                pool[slot].copy_(src)
        self._counts["bytes_to_device"] += self.expert_bytes
        return slot

    # ---- the API the MoE layer uses ---------------------------------------------------------

    @property
    def num_gpu_slots(self) -> int:
        return self.gpu.capacity

    def resident_keys(self) -> list[Key]:
        """Device-resident (layer, expert) keys, least recently used first."""
        return list(self.gpu.slot_of)

    def get(self, layer: int, expert_ids: Sequence[int]) -> Resident:
        """Every requested expert resident at once (at most num_gpu_slots of them); misses copied in."""
        self._check_open()
        ids = [int(e) for e in expert_ids]
        if len(set(ids)) > self.gpu.capacity:
            raise ValueError(f"{len(set(ids))} experts requested at once, only {self.gpu.capacity} slots")
        keys = [(layer, e) for e in ids]
        wanted = set(keys)
        slots = []
        t0 = time.perf_counter()
        stalled = False
        for key in keys:
            if key in self.gpu.slot_of:
                if key in self._prefetched:
                    self._counts["prefetch_hits"] += 1
                    self._prefetched.discard(key)
                self._counts["hits"] += 1
                slot = self.gpu.touch(key)
            else:
                self._counts["misses"] += 1
                stalled = True
                slot = self._copy_in(key, wanted)
                assert slot is not None  # len(wanted) <= capacity
                self.gpu.touch(key)
            event = self._events.pop(slot, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            slots.append(slot)
        if stalled:
            self._counts["stall_s"] += time.perf_counter() - t0
        self._in_use = wanted
        return Resident(tuple(slots), self.gpu.gate_up, self.gpu.down, self.gpu.gate_up_scale, self.gpu.down_scale)

    def dequantized(self, resident: Resident, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of the index-th expert of a get() in dtype (FP8 dequantised)."""
        slot = resident.slots[index]
        if resident.gate_up_scale is None:
            return resident.gate_up[slot], resident.down[slot]
        return dequantize_expert(resident.gate_up[slot], resident.down[slot], resident.gate_up_scale[slot],
                                 resident.down_scale[slot], dtype, self.fp8_block)

    def prefetch(self, layer: int, expert_ids: Iterable[int]) -> int:
        """Start copies of the non-resident experts, evicting nothing get() just returned; how many started."""
        self._check_open()
        started = 0
        for e in dict.fromkeys(int(e) for e in expert_ids):
            key = (layer, e)
            if key in self.gpu.slot_of:
                continue
            if self._copy_in(key, self._in_use) is None:
                self._counts["prefetch_dropped"] += 1
                continue
            self._prefetched.add(key)
            self._counts["prefetches"] += 1
            started += 1
        return started

    def prefetch_next(self, layer: int, x: torch.Tensor) -> int:
        """Predict the next MoE layer's experts with its router on this layer's input and prefetch them."""
        if not self.prefetch_enabled:
            return 0
        following = [n for n in self._gates if n > layer]
        if not following:
            return 0
        nxt = min(following)
        with torch.no_grad():
            _, ids = self._gates[nxt](x)
        return self.prefetch(nxt, ids.flatten().unique().tolist())

    def compute_on_host_choice(self, layer: int, expert: int, num_tokens: int) -> bool:
        """Whether a missed expert should run where its host copy is instead of being copied in."""
        if self.cpu_compute == "never" or (layer, expert) in self.gpu.slot_of:
            return False
        if self.cpu_compute == "always":
            return True
        flops = 2.0 * num_tokens * 3 * self.hidden_size * self.intermediate_size
        cm = self.cost_model
        return cm.cpu_s(self.expert_bytes, flops) < cm.copy_s(self.expert_bytes)

    def compute_on_host(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of one expert on the host tier's copy; x [n, H] on any device -> [n, H] float32 there."""
        self._check_open()
        from r1deploy.layers.activation import silu_and_mul

        self._counts["misses"] += 1
        self._counts["cpu_computes"] += 1
        t0 = time.perf_counter()
        gate_up, down, gate_up_scale, down_scale = self._host_tensors((layer, expert))
        if gate_up_scale is not None:  # FP8: dequantised in the activations' dtype, as the CPU path does
            gate_up, down = dequantize_expert(gate_up, down, gate_up_scale, down_scale, x.dtype, self.fp8_block)
        out = F.linear(silu_and_mul(F.linear(x.to(gate_up.device), gate_up)), down)
        self._counts["stall_s"] += time.perf_counter() - t0
        return out.to(device=x.device, dtype=torch.float32)

    # ---- statistics / lifetime --------------------------------------------------------------

    def stats(self) -> TierStats:
        c = self._counts
        host_bytes = 0 if self.closed else self.host.nbytes
        return TierStats(**{k: int(v) for k, v in c.items() if k != "stall_s"}, stall_s=c["stall_s"],
                         gpu_slots=0 if self.closed else self.gpu.capacity,
                         host_slots=0 if self.closed else self.host.capacity,
                         host_bytes=host_bytes, pinned_bytes=host_bytes if self._host_pinned else 0)

    def reset_stats(self) -> None:
        for k in self._counts:
            self._counts[k] = 0

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the expert store is closed")

    def close(self) -> None:
        """Release the device pool, the (pinned) host pool and the memory maps. Idempotent."""
        if self.closed:
            return
        if self._stream is not None:
            self._stream.synchronize()
        for t in self._registered:
            _host_unregister(t)
        self._registered.clear()
        self.gpu = _SlotPool.of(self._alloc_pool(0, torch.empty), self.policy)
        self.host = _SlotPool.of(self._alloc_pool(0, torch.empty), "lru")
        self._host_pinned = False
        self._events.clear()
        self._handles.clear()
        self._staging = None
        self._gates.clear()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host_register(t: torch.Tensor) -> bool:
    """Page-lock an existing host tensor in place; False where CUDA (or the call) is unavailable."""
    try:
        if not torch.cuda.is_available():
            return False
        cudart = torch.cuda.cudart()
        torch.cuda.check_error(cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 0))
        return True
    except Exception:  # noqa: BLE001 - any failure: fall back to torch's pinned allocator
        return False


def _host_unregister(t: torch.Tensor) -> None:
    with contextlib.suppress(Exception):  # best effort at close
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))


def dequantize_expert(gate_up: torch.Tensor, down: torch.Tensor, gate_up_scale: torch.Tensor,
                      down_scale: torch.Tensor, dtype: torch.dtype, block: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One FP8 expert in dtype: gate and up dequantised separately (own tile rows), as
    layers/moe/experts_dense.Fp8BlockExperts.expert_weights does for its resident FP8 stacks."""
    size, tiles = gate_up.shape[0] // 2, gate_up_scale.shape[0] // 2
    gate = dequantize_fp8_block(gate_up[:size], gate_up_scale[:tiles], dtype, block)
    up = dequantize_fp8_block(gate_up[size:], gate_up_scale[tiles:], dtype, block)
    return torch.cat([gate, up]), dequantize_fp8_block(down, down_scale, dtype, block)


def budget_slots(budget_gb: float, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 fp8_block: tuple[int, int] | None = None) -> int:
    """How many experts a budget in GB holds (for the CLI flags); fp8_block: FP8 experts with their scales."""
    if fp8_block is None:
        each = 3 * hidden_size * intermediate_size * dtype.itemsize
    else:
        bn, bk = fp8_block
        i_rows, h_rows, i_cols, h_cols = (-(-intermediate_size // bn), -(-hidden_size // bn),
                                          -(-intermediate_size // bk), -(-hidden_size // bk))
        each = 3 * hidden_size * intermediate_size + 4 * (2 * i_rows * h_cols + h_rows * i_cols)
    return math.floor(budget_gb * 1e9) // each
