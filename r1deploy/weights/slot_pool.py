"""The expert store's slots: `ExpertLayout` (one expert's tensors and bytes, FP8 scales included) and
`SlotPool` (a fixed number of slots holding experts, key -> slot, LRU / LFU victims). The device tier and the
host tier are each one SlotPool."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from r1deploy.quant.fp8_block import FP8_DTYPE, quantize_fp8_block

Key = tuple[int, int]  # (layer, expert)
PROJECTIONS = ("gate", "up", "down")
SCALES = ("gate_scale", "up_scale", "down_scale")  # FP8 stores: each projection's block-scale part


@dataclass(frozen=True)
class ExpertLayout:
    """gate_up [2I, H] + down [H, I] in the weight dtype; FP8 (DeepSeek-V3/R1's block-scaled checkpoints):
    float8_e4m3fn weights plus fp32 `weight_scale_inv` tiles, gate_up's [2 * ceil(I/bn), ceil(H/bk)] (the
    gate's tile rows, then the up's: never a shared tile), down's [ceil(H/bn), ceil(I/bk)]."""

    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype  # the compute dtype (the weights' too, unless fp8)
    fp8: bool
    fp8_block: tuple[int, int]

    @property
    def weight_dtype(self) -> torch.dtype:
        return FP8_DTYPE if self.fp8 else self.dtype

    @property
    def scale_shapes(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        if not self.fp8:
            return None
        (bn, bk), i, h = self.fp8_block, self.intermediate_size, self.hidden_size
        return (2 * -(-i // bn), -(-h // bk)), (-(-h // bn), -(-i // bk))

    @property
    def parts(self) -> tuple[str, ...]:
        return PROJECTIONS + (SCALES if self.fp8 else ())

    @property
    def expert_bytes(self) -> int:
        scales = 4 * sum(r * c for r, c in self.scale_shapes) if self.fp8 else 0
        return 3 * self.hidden_size * self.intermediate_size * self.weight_dtype.itemsize + scales

    def scale_shape(self, projection: str) -> tuple[int, int]:
        gate_up, down = self.scale_shapes
        return down if projection == "down" else (gate_up[0] // 2, gate_up[1])

    def alloc(self, n: int, alloc: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """gate_up [n, 2I, H], down [n, H, I] in the weight dtype (+ their fp32 scale stacks when FP8)."""
        i, h = self.intermediate_size, self.hidden_size
        pools = [alloc(n, 2 * i, h, dtype=self.weight_dtype), alloc(n, h, i, dtype=self.weight_dtype)]
        if self.fp8:
            pools += [alloc(n, *shape, dtype=torch.float32) for shape in self.scale_shapes]
        return tuple(pools)

    def as_parts(self, projection: str, tensor: torch.Tensor, scale: bool | None) -> dict[str, torch.Tensor]:
        """The parts one checkpoint tensor fills. FP8: an FP8 weight as is, its `weight_scale_inv` (scale=None:
        recognised as the non-FP8 tensor of the scale tile shape) as is, a weight stored unquantised is
        quantised with the store's tiles. Otherwise the tensor itself."""
        if not self.fp8:
            if scale:
                raise ValueError(f"{projection}_proj scales given to a store that holds the model dtype")
            return {projection: tensor}
        if scale is None:
            scale = tensor.dtype != FP8_DTYPE and tuple(tensor.shape) == self.scale_shape(projection)
        if scale:
            return {projection + "_scale": tensor}
        if tensor.dtype != FP8_DTYPE:
            tensor, scale_inv = quantize_fp8_block(tensor, self.fp8_block)
            return {projection: tensor, projection + "_scale": scale_inv}
        return {projection: tensor}


class SlotPool:
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
    def of(cls, pools: Sequence[torch.Tensor], policy: str) -> SlotPool:
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

    def targets(self, slot: int) -> dict[str, torch.Tensor]:
        """Each part of the expert in `slot` (projections, and their scales when FP8)."""
        i = self.gate_up.shape[1] // 2
        targets = {"gate": self.gate_up[slot, :i], "up": self.gate_up[slot, i:], "down": self.down[slot]}
        if self.gate_up_scale is not None:
            tiles = self.gate_up_scale.shape[1] // 2
            targets.update(gate_scale=self.gate_up_scale[slot, :tiles], up_scale=self.gate_up_scale[slot, tiles:],
                           down_scale=self.down_scale[slot])
        return targets

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

    def grow(self, pools: Sequence[torch.Tensor]) -> None:
        """Replace the stacks by larger ones holding the same slots first (new slots free, used first)."""
        old = self.capacity
        self.gate_up, self.down = pools[0], pools[1]
        if len(pools) > 2:
            self.gate_up_scale, self.down_scale = pools[2], pools[3]
        self.free = list(range(old, self.capacity))[::-1] + self.free


def budget_slots(budget_gb: float, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 fp8_block: tuple[int, int] | None = None) -> int:
    """How many experts a budget in GB holds (for the CLI flags); fp8_block: FP8 experts with their scales."""
    layout = ExpertLayout(hidden_size, intermediate_size, dtype, fp8_block is not None, fp8_block or (128, 128))
    return math.floor(budget_gb * 1e9) // layout.expert_bytes
