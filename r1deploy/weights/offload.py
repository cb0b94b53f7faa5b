"""What the engine, /metrics and bench see of a model's offload store: `OffloadStore`, implemented by the
tiered expert store (`--offload experts`, weights/tiered_store.TieredExpertStore) and the layer stream
(`--offload layers`, weights/layer_stream.LayerStream), held as the model's `offload_store`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TierStats:
    """A snapshot; counters since construction (or `reset_stats`)."""

    hits: int = 0  # get() requests served by a resident device slot (prefetched ones included)
    misses: int = 0  # get() requests that had to copy (or compute on the host)
    host_hits: int = 0  # misses served from the host tier
    disk_reads: int = 0  # experts read from the safetensors memory map
    bytes_to_device: int = 0  # bytes copied into device slots (get misses and prefetches); FP8 + scales in FP8
    bytes_from_disk: int = 0  # bytes read from the checkpoint (as stored: FP8 + scales for FP8 checkpoints)
    evictions: int = 0  # device slots overwritten
    host_evictions: int = 0
    prefetches: int = 0  # copies started by prefetch()
    prefetch_hits: int = 0  # get() hits on a slot that prefetch filled and nobody used yet
    prefetch_dropped: int = 0  # prefetch requests with no evictable slot
    cpu_computes: int = 0  # missed experts computed on the host instead of copied
    stall_s: float = 0.0  # host wall time get() spent fetching misses / waiting on copies
    gpu_slots: int = 0
    host_slots: int = 0
    host_bytes: int = 0  # bytes allocated for the host tier now (0 after close())
    pinned_bytes: int = 0  # of which page-locked

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class OffloadStore(Protocol):
    @property
    def num_gpu_slots(self) -> int: ...

    def stats(self) -> TierStats:
        """A frozen snapshot of the counters (LayerStream: a LayerStreamStats, TierStats plus layer fields)."""
        ...

    def reset_stats(self) -> None: ...

    def close(self) -> None:
        """Release the device slots, the (pinned) host memory and any files. Idempotent."""
        ...
