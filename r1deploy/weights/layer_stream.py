"""Whole decoder layers streamed from host memory through a ring of GPU slots (`--offload layers`).

The GPU keeps the non-layer weights (embedding, final norm, lm_head), the first `num_resident` decoder
layers, and `num_slots` (>= 2) slots each as large as the largest streamed layer. Every other layer's
parameters live in one flat byte buffer per layer: pinned host memory while `host_budget_bytes` lasts,
then a memory-mapped spill file on disk. Nothing in the model changes: a forward pre-hook on each
streamed layer makes its copy resident (a prefetched one, or a copy started now) and points the layer's
parameters (`param.data`) at views of the slot; a forward post-hook points them back at the host copy,
so `state_dict()` stays true between steps.

Copies go round the ring in the order the layers run, cyclically over steps: before layer j runs, the
copies of the next `prefetch_depth` (default num_slots - 1) streamed layers are started, so the last
layers of a step prefetch the first streamed layers of the next one behind the resident layers, the
lm_head and sampling. On CUDA the copies run on a side stream that first waits for the compute already
queued (the slot's previous layer), and the compute stream waits on each copy's event, so compute
stalls only when a copy is late; stall time is measured on the GPU from event pairs (compute reached
the layer / copy done). On CPU "host" and "GPU" are the same device but the slots are still separate
tensors, so the copies, the ring and the counters all run in CI; there every copy is synchronous and
its time counts as stall.

`stats()` returns a LayerStreamStats, a TierStats (the expert store's snapshot) with layer fields added:
the engine, /metrics and the bench report read it through the model's `offload_store` (an
weights/offload.OffloadStore, like the tiered expert store).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
from torch import nn

from r1deploy.weights.offload import TierStats
from r1deploy.weights.pinned import PinnedHostMemory

ALIGN = 256  # bytes: every parameter's view starts on this boundary (kernels want 16-byte alignment)
MIN_SLOTS = 2


@dataclass(frozen=True)
class LayerStreamStats(TierStats):
    """TierStats read the same way (hits: streamed layers found prefetched, misses: copied at use, evictions:
    slot refills, host_slots: layers in host memory), plus the layer counts."""

    layers_streamed: int = 0  # layer copies into a GPU slot
    late_copies: int = 0  # uses whose copy was not done when compute reached the layer (CUDA); misses on CPU
    resident_layers: int = 0
    streamed_layers: int = 0
    disk_layers: int = 0  # streamed layers whose host copy is the memory-mapped spill file
    slot_bytes: int = 0


def layer_nbytes(layer: nn.Module) -> int:
    """Bytes of a layer's parameters in the flat layout (each one aligned)."""
    return sum(_aligned(p.nbytes) for p in layer.parameters())


def resident_prefix(layer_bytes: Sequence[int], other_bytes: int, gpu_budget_bytes: int,
                    num_slots: int = MIN_SLOTS) -> int:
    """How many leading layers stay on the GPU: all of them if everything fits the budget, else the most k
    with other + layers[:k] + num_slots x max(layers[k:]) <= budget. ValueError when not even k = 0 fits."""
    n = len(layer_bytes)
    if other_bytes + sum(layer_bytes) <= gpu_budget_bytes:
        return n
    for k in range(n - 1, -1, -1):
        if other_bytes + sum(layer_bytes[:k]) + num_slots * max(layer_bytes[k:]) <= gpu_budget_bytes:
            return k
    need = other_bytes + num_slots * max(layer_bytes)
    raise ValueError(f"the GPU weight budget ({gpu_budget_bytes / 1e9:.3f} GB) is below the non-layer weights "
                     f"({other_bytes / 1e9:.3f} GB) plus {num_slots} layer slots: needs {need / 1e9:.3f} GB")


@dataclass
class _Copy:
    layer: int  # index into the streamed layers
    slot: int
    done: torch.cuda.Event | None  # CUDA: recorded on the copy stream after the copy


class LayerStream:
    def __init__(
        self,
        layers: Sequence[nn.Module],
        device: torch.device | str,
        *,
        num_resident: int,
        num_slots: int = MIN_SLOTS,
        prefetch_depth: int | None = None,  # default num_slots - 1 (the most the ring allows)
        host_budget_bytes: int | None = None,  # None: every streamed layer in host memory
        spill_dir: Path | str | None = None,  # where layers beyond the host budget are memory-mapped
        pin_memory: bool | None = None,  # default: when the device is CUDA
    ) -> None:
        self.device = torch.device(device)
        if num_slots < MIN_SLOTS:
            raise ValueError(f"num_slots must be >= {MIN_SLOTS}, got {num_slots}")
        if not 0 <= num_resident < len(layers):
            raise ValueError(f"num_resident must be in [0, {len(layers)}), got {num_resident}")
        depth = num_slots - 1 if prefetch_depth is None else prefetch_depth
        if not 0 <= depth < num_slots:
            raise ValueError(f"prefetch_depth must be in [0, {num_slots}), got {prefetch_depth}")
        self.num_resident, self.num_slots, self.prefetch_depth = num_resident, num_slots, depth
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        for layer in layers[:num_resident]:
            _move_module(layer, self.device)
        self.layers = list(layers[num_resident:])
        self._params = [list(layer.parameters()) for layer in self.layers]
        self._offsets = [_offsets(ps) for ps in self._params]
        self._nbytes = [layer_nbytes(layer) for layer in self.layers]
        self.slot_bytes = max(self._nbytes)
        self._memory = PinnedHostMemory(self.pin)
        self._spill: Path | None = None
        self._host: list[torch.Tensor] = []  # one flat uint8 buffer per streamed layer
        self._on_disk: list[bool] = []
        host_left = host_budget_bytes
        for i, layer in enumerate(self.layers):
            nbytes = self._nbytes[i]
            on_disk = host_left is not None and nbytes > host_left
            buf = self._spill_alloc(i, nbytes, spill_dir) if on_disk else self._memory.empty(nbytes, dtype=torch.uint8)
            if not on_disk and host_left is not None:
                host_left -= nbytes
            views = self._views(buf, i)
            with torch.no_grad():
                for p, v in zip(self._params[i], views, strict=True):
                    v.copy_(p.data)
            _rebind(self._params[i], views)  # the original storage goes
            for buf_module in layer.modules():  # buffers (none in today's layers) stay on the device
                for name, b in buf_module._buffers.items():
                    if b is not None:
                        buf_module._buffers[name] = b.to(self.device)
            self._host.append(buf)
            self._on_disk.append(on_disk)
        self._host_views = [self._views(buf, i) for i, buf in enumerate(self._host)]
        self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_slots)]
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._holder: list[int | None] = [None] * num_slots
        self._next_slot = 0
        self._pending: deque[_Copy] = deque()  # started copies, in the order their layers will run
        self._waits: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()  # (compute reached, copy done)
        self._lock = threading.Lock()  # stats() may be read from the metrics thread
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._counts: dict[str, float] = dict.fromkeys(
            ("hits", "misses", "disk_reads", "bytes_to_device", "bytes_from_disk", "evictions", "prefetches",
             "prefetch_hits", "layers_streamed", "late_copies"), 0)
        self._counts["stall_s"] = 0.0
        self._hooks = []
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_before(i)))
            self._hooks.append(layer.register_forward_hook(self._make_after(i)))
        self.closed = False

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def attach(cls, model: nn.Module, device: torch.device | str, *, gpu_budget_bytes: int, **kwargs
               ) -> LayerStream | None:
        """Place a model built on the host: the leading layers that fit the budget (with the non-layer weights
        and the ring) on `device`, the rest streamed. Sets `model.offload_store` (an OffloadStore,
        which the engine closes and /metrics and bench read); None (and nothing streamed) if all fits."""
        device = torch.device(device)
        layers = list(model.model.layers)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        other = sum(p.nbytes for p in model.parameters() if id(p) not in in_layers)
        num_slots = kwargs.get("num_slots", MIN_SLOTS)
        k = resident_prefix([layer_nbytes(layer) for layer in layers], other, gpu_budget_bytes, num_slots)
        stream = None if k == len(layers) else cls(layers, device, num_resident=k, **kwargs)
        streamed = set() if stream is None else {id(m) for layer in stream.layers for m in layer.modules()}
        for module in model.modules():
            if id(module) not in streamed:
                _move_module(module, device, recurse=False)
        if stream is not None:
            model.offload_store = stream
        return stream

    def _spill_alloc(self, i: int, nbytes: int, spill_dir: Path | str | None) -> torch.Tensor:
        if self._spill is None:
            if spill_dir is not None:
                Path(spill_dir).mkdir(parents=True, exist_ok=True)
            self._spill = Path(tempfile.mkdtemp(prefix="r1deploy-layers-", dir=spill_dir))
            weakref.finalize(self, shutil.rmtree, str(self._spill), True)
        return torch.from_file(str(self._spill / f"layer{i}.bin"), shared=True, size=max(nbytes, 1),
                               dtype=torch.uint8)[:nbytes]

    def _views(self, buf: torch.Tensor, i: int) -> list[torch.Tensor]:
        return [buf[off:off + p.nbytes].view(p.dtype).view(p.shape)
                for p, off in zip(self._params[i], self._offsets[i], strict=True)]

    # ---- the ring ---------------------------------------------------------------------------

    def _copy(self, i: int) -> _Copy:
        """Start copying streamed layer i into the next slot of the ring."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.num_slots
        if self._holder[slot] is not None:
            self._counts["evictions"] += 1
        self._holder[slot] = i
        nbytes = self._nbytes[i]
        src, dst = self._host[i], self._slots[slot][:nbytes]
        done = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last layer is done
            with torch.cuda.stream(self._stream):
                dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event(enable_timing=True)
                done.record(self._stream)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            self._counts["stall_s"] += time.perf_counter() - t0  # no overlap on the CPU
        c = self._counts
        c["layers_streamed"] += 1
        c["bytes_to_device"] += nbytes
        if self._on_disk[i]:
            c["disk_reads"] += 1
            c["bytes_from_disk"] += nbytes
        return _Copy(i, slot, done)

    def _make_before(self, i: int):
        def before(module: nn.Module, args: tuple) -> None:
            self._before(i)
        return before

    def _make_after(self, i: int):
        def after(module: nn.Module, args: tuple, output: object) -> None:
            self._bind(self._host_views[i], i)
        return after

    def _before(self, i: int) -> None:
        if self.closed:
            raise RuntimeError("the layer stream is closed")
        c = self._counts
        if self._pending and self._pending[0].layer == i:
            copy = self._pending.popleft()
            c["hits"] += 1
            c["prefetch_hits"] += 1
        else:  # first step, or the run order changed (an interrupted forward): start the ring afresh
            self._pending.clear()
            copy = self._copy(i)
            c["misses"] += 1
            if copy.done is None:
                c["late_copies"] += 1
        if copy.done is not None:
            compute = torch.cuda.current_stream(self.device)
            reached = torch.cuda.Event(enable_timing=True)
            reached.record(compute)
            compute.wait_event(copy.done)
            with self._lock:
                self._waits.append((reached, copy.done))
            self._collect_waits()
        key = (i, copy.slot)
        views = self._slot_views.get(key)
        if views is None:
            views = self._slot_views[key] = self._views(self._slots[copy.slot], i)
        self._bind(views, i)
        last = self._pending[-1].layer if self._pending else i
        while len(self._pending) < self.prefetch_depth:
            last = (last + 1) % len(self.layers)  # cyclic: the end of a step prefetches the next step's first
            self._pending.append(self._copy(last))
            c["prefetches"] += 1

    def _bind(self, views: list[torch.Tensor], i: int) -> None:
        _rebind(self._params[i], views)

    def _collect_waits(self) -> None:
        """Stall time from finished (compute reached, copy done) pairs: how long compute waited, if at all."""
        with self._lock:
            while self._waits and self._waits[0][0].query() and self._waits[0][1].query():
                reached, done = self._waits.popleft()
                stall_ms = reached.elapsed_time(done)
                if stall_ms > 0:
                    self._counts["stall_s"] += stall_ms / 1e3
                    self._counts["late_copies"] += 1

    # ---- statistics / lifetime --------------------------------------------------------------

    @property
    def num_gpu_slots(self) -> int:
        return 0 if self.closed else self.num_slots

    def stats(self) -> LayerStreamStats:
        if not self.closed:
            self._collect_waits()
        c = self._counts
        host_layers = 0 if self.closed else sum(not d for d in self._on_disk)
        host_bytes = 0 if self.closed else sum(b.nbytes for b, d in zip(self._host, self._on_disk) if not d)
        return LayerStreamStats(
            **{k: int(v) for k, v in c.items() if k != "stall_s"}, stall_s=c["stall_s"],
            gpu_slots=self.num_gpu_slots, host_slots=host_layers, host_bytes=host_bytes,
            pinned_bytes=0 if self.closed else self._memory.pinned_bytes, resident_layers=self.num_resident,
            streamed_layers=len(self.layers), disk_layers=0 if self.closed else sum(self._on_disk),
            slot_bytes=self.slot_bytes)

    def reset_stats(self) -> None:
        with self._lock:
            self._waits.clear()
            for k in self._counts:
                self._counts[k] = 0

    def close(self) -> None:
        """Release the GPU slots, the (pinned) host buffers and the spill files; the streamed layers are left
        without weights. Idempotent."""
        if self.closed:
            return
        if self._stream is not None:
            self._stream.synchronize()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pending.clear()
        self._waits.clear()
        for params in self._params:
            _rebind(params, [torch.empty(0, dtype=p.dtype, device=self.device) for p in params])
        self._host_views.clear()
        self._slot_views.clear()
        self._memory.release()
        self._host.clear()
        self._slots.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _offsets(params: Sequence[torch.Tensor]) -> list[int]:
    out, at = [], 0
    for p in params:
        if not p.is_contiguous():
            raise ValueError("layer streaming needs contiguous parameters")
        out.append(at)
        at += _aligned(p.nbytes)
    return out


def _move_module(module: nn.Module, device: torch.device, recurse: bool = True) -> None:
    """Parameters (in place, keeping the Parameter objects) and buffers onto device."""
    for m in module.modules() if recurse else (module,):
        with torch.no_grad():
            for p in m._parameters.values():
                if p is not None and p.device != device:
                    _rebind([p], [p.data.to(device)])
        for name, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[name] = b.to(device)


def _rebind(params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor]) -> None:
    """Point each parameter at a tensor of the same shape: the one place the stream swaps `param.data`. The
    streamed layer's own code is untouched and keeps reading its Parameters, whose storage is, in turn, the
    host copy (between uses), a ring slot on the device (while it runs) or nothing (closed)."""
    for p, t in zip(params, tensors, strict=True):
        p.data = t
