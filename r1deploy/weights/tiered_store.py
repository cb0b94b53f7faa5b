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

Parts: slot_pool.py (ExpertLayout, SlotPool), expert_source.py (the disk tier), pinned.py (page-locked host
memory), host_compute.py (the cost model and the host SwiGLU); this file ties them into the tiers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

from r1deploy.quant.fp8_block import dequantize_expert
from r1deploy.weights.expert_source import ExpertSource
from r1deploy.weights.host_compute import CPU_COMPUTE_MODES, CostModel, host_swiglu
from r1deploy.weights.host_tier import HostTier
from r1deploy.weights.offload import TierStats
from r1deploy.weights.slot_pool import ExpertLayout, Key, SlotPool, budget_slots

POLICIES = ("lru", "lfu")
__all__ = ["CostModel", "Resident", "TierStats", "TieredExpertStore", "budget_slots"]


@dataclass(frozen=True)
class Resident:
    """What get() returns: the device pool stacks and, per requested expert, its slot in them."""

    slots: tuple[int, ...]
    gate_up: torch.Tensor  # [S, 2I, H] (float8_e4m3fn in an FP8 store)
    down: torch.Tensor  # [S, H, I]
    gate_up_scale: torch.Tensor | None = None  # FP8: [S, 2 * ceil(I/bn), ceil(H/bk)] fp32
    down_scale: torch.Tensor | None = None  # FP8: [S, ceil(H/bn), ceil(I/bk)] fp32


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
        self.layout = layout = ExpertLayout(hidden_size, intermediate_size, dtype, fp8, tuple(fp8_block))
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.dtype, self.device = dtype, torch.device(device)
        self.fp8, self.fp8_block = fp8, layout.fp8_block
        self.weight_dtype, self.scale_shapes = layout.weight_dtype, layout.scale_shapes
        self.parts, self.expert_bytes = layout.parts, layout.expert_bytes
        if num_gpu_slots is None:
            if gpu_budget_bytes is None:
                raise ValueError("give num_gpu_slots or gpu_budget_bytes")
            num_gpu_slots = gpu_budget_bytes // self.expert_bytes
        if num_gpu_slots < 1:
            raise ValueError(f"the GPU weight budget holds no expert ({self.expert_bytes} bytes each)")
        self.policy, self.prefetch_enabled, self.cpu_compute = policy, prefetch, cpu_compute
        self.cost_model = cost_model or CostModel()
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.gpu = SlotPool.of(layout.alloc(num_gpu_slots, lambda n, *shape, dtype: torch.empty(
            n, *shape, dtype=dtype, device=self.device)), policy)
        host_slots = (host_budget_bytes // self.expert_bytes if host_budget_bytes is not None
                      else (total_experts if total_experts is not None else 0))
        if total_experts is not None:
            host_slots = min(host_slots, total_experts)
        self._counts: dict[str, float] = dict.fromkeys(
            ("hits", "misses", "host_hits", "disk_reads", "bytes_to_device", "bytes_from_disk", "evictions",
             "host_evictions", "prefetches", "prefetch_hits", "prefetch_dropped", "cpu_computes"), 0)
        self._counts["stall_s"] = 0.0
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.disk = ExpertSource(layout, None if checkpoint_dir is None else Path(checkpoint_dir))
        # No host budget and no expert count: the host tier grows as experts are loaded.
        self.host = HostTier(layout, host_slots, host_budget_bytes is None and total_experts is None, self.pin,
                             self.disk, self._counts, self._wait_for_copies)
        self._gates: dict[int, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {}
        self._in_use: set[Key] = set()  # keys the latest get() returned: prefetch must not evict them
        self._prefetched: set[Key] = set()
        self._events: dict[int, torch.cuda.Event] = {}  # device slot -> copy done
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

    def load_expert(self, layer: int, expert: int, projection: str, tensor: torch.Tensor,
                    scale: bool | None = None) -> None:
        """One checkpoint tensor during load_weights, into the host tier (host_tier.HostTier.load_expert)."""
        self.host.load_expert(layer, expert, projection, tensor, scale)

    def load_stacked(self, layer: int, which: str, tensor: torch.Tensor, scale: bool = False) -> None:
        """A stacked `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] checkpoint tensor
        (scale: its `_scale_inv` stack, gate tile rows first, in an FP8 store)."""
        rows = self.layout.scale_shape("gate")[0] if scale else self.intermediate_size
        for e in range(tensor.shape[0]):
            if which == "down_proj":
                self.load_expert(layer, e, "down", tensor[e], scale)
            else:
                self.load_expert(layer, e, "gate", tensor[e, :rows], scale)
                self.load_expert(layer, e, "up", tensor[e, rows:], scale)

    def finish_loading(self, expected: Iterable[Key] = ()) -> None:
        """Check every expected expert is complete in the host tier or on disk."""
        self.host.finish_loading(expected)

    def init_dummy_weights(self, keys: Iterable[Key], seed: int = 0, std: float = 0.02) -> None:
        """load_format="dummy": every expert of `keys` gets a host slot filled with Normal(0, std) values, as
        if loaded (host_tier.HostTier.init_dummy)."""
        self._check_open()
        self.host.init_dummy(keys, self.device, seed, std)

    def register_gate(self, layer: int, gate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The router of a MoE layer, so the layer before it can prefetch its likely experts."""
        self._gates[layer] = gate

    # ---- tiers ------------------------------------------------------------------------------

    def _wait_for_copies(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _copy_in(self, key: Key, exclude: set[Key]) -> int | None:
        """Claim a device slot for key and start the copy; None when every slot is excluded."""
        claimed = self.gpu.claim(key, exclude)
        if claimed is None:
            return None
        slot, evicted = claimed
        if evicted is not None:
            self._counts["evictions"] += 1
            self._prefetched.discard(evicted)
        sources = [t for t in self.host.expert(key) if t is not None]  # FP8: the scales too
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
        return self.cost_model.host_is_faster(self.expert_bytes, num_tokens, self.hidden_size, self.intermediate_size)

    def compute_on_host(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of one expert on the host tier's copy; x [n, H] on any device -> [n, H] float32 there."""
        self._check_open()
        self._counts["misses"] += 1
        self._counts["cpu_computes"] += 1
        t0 = time.perf_counter()
        out = host_swiglu(x, *self.host.expert((layer, expert)), self.fp8_block)
        self._counts["stall_s"] += time.perf_counter() - t0
        return out

    # ---- statistics / lifetime --------------------------------------------------------------

    def stats(self) -> TierStats:
        c = self._counts
        host_bytes = 0 if self.closed else self.host.nbytes
        return TierStats(**{k: int(v) for k, v in c.items() if k != "stall_s"}, stall_s=c["stall_s"],
                         gpu_slots=0 if self.closed else self.gpu.capacity,
                         host_slots=0 if self.closed else self.host.capacity,
                         host_bytes=host_bytes, pinned_bytes=host_bytes if self.host.memory.pinned else 0)

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
        self.host.close()
        self.gpu = SlotPool.of(self.layout.alloc(0, torch.empty), self.policy)
        self._events.clear()
        self._gates.clear()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
