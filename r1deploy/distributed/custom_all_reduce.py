"""A low-latency all-reduce for small tensors on one node, from torch's symmetric memory.

A decode step all-reduces a few KiB (batch x hidden, bf16) twice per layer, and NCCL's all-reduce has a
latency floor far above the bytes it moves. With torch's one-shot kernel each rank copies its tensor into
its slot of a buffer every rank maps (CUDA P2P over NVLink), signals the others, and sums all slots itself:
one kernel, no NCCL protocol. Larger tensors (prefill) stay on NCCL, which wins there.

Created once per tensor-parallel group at start-up (every rank in lockstep, before any CUDA graph capture);
`create_custom_all_reduce` returns None wherever it cannot run, and the group then uses NCCL alone.
"""

from __future__ import annotations

import os
import socket
import sys
import zlib
from typing import Any

import torch
import torch.distributed as dist

# Measured on 2 H200s (NVLink) inside CUDA graphs: 7 KiB bf16 takes 7 us one-shot against NCCL's 12 us;
# 2..256 KiB 7-10 us one-shot; at 1 MiB both 16-20 us; at 4 MiB NCCL is as fast or faster. So up to 1 MiB.
MAX_BYTES = 1 << 20
# The model dtype of the GPU checkpoints served here; the one-shot kernel has only bf16 and fp32 (an fp32
# model's all-reduces stay on NCCL).
DTYPE = torch.bfloat16
# The kernel addresses every peer's slot directly: world sizes of one NVLink domain.
WORLD_SIZES = range(2, 9)
# The kernel picks its vector width from the byte alignment of the tensor's size and offset, and the copy
# into the buffer (offset 0) must get the same width as the input: 16 bytes on both sides.
ALIGN = 16


class SymmetricMemoryAllReduce:
    """one_shot_all_reduce_copy over a symmetric buffer: `buffer` is mapped by every rank of `group_name`."""

    def __init__(self, buffer: torch.Tensor, group_name: str, max_bytes: int = MAX_BYTES) -> None:
        self.buffer = buffer
        self.group_name = group_name
        self.max_bytes = max_bytes

    def describe(self) -> str:
        dtype = str(self.buffer.dtype).removeprefix("torch.")
        return f"symmetric-memory one-shot ({dtype} up to {self.max_bytes // 1024} KiB), NCCL above"

    def can_run(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.device == self.buffer.device and x.dtype == self.buffer.dtype and x.is_contiguous()
                and 0 < nbytes <= self.max_bytes and nbytes % ALIGN == 0
                and x.storage_offset() * x.element_size() % ALIGN == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over ranks, a new tensor (x is unchanged); only when can_run(x)."""
        out = torch.ops.symm_mem.one_shot_all_reduce_copy(self.buffer[: x.numel()], x.view(-1), "sum",
                                                          self.group_name)
        return out.view_as(x)


def create_custom_all_reduce(rank: int, size: int, device: torch.device, device_group: Any,
                             control_group: Any, enabled: bool = True) -> SymmetricMemoryAllReduce | None:
    """Every rank calls this together, right after the groups form. None (use NCCL) when disabled, off CUDA,
    across nodes, without P2P between the GPUs, or when torch's symmetric memory fails in any way; every rank
    gets the same answer, since a rank on NCCL and one on symmetric memory would wait on each other forever.
    Rank 0 prints which all-reduce the group uses."""
    if device.type != "cuda":  # gloo on the CPU: nothing to choose
        return None
    fast, why = None, "--disable-custom-all-reduce"
    if enabled and size in WORLD_SIZES:
        fast, why = _create(rank, size, device, device_group, control_group)
    elif enabled:
        why = f"{size} ranks (symmetric memory: 2 to 8)"
    if rank == 0:
        used = fast.describe() if fast is not None else f"NCCL ({why})"
        print(f"r1deploy: tensor-parallel all-reduce: {used}", file=sys.stderr, flush=True)
    return fast


def _create(rank: int, size: int, device: torch.device, device_group: Any,
            control_group: Any) -> tuple[SymmetricMemoryAllReduce | None, str]:
    # Only peer access is used, never NVLink multicast, which shared hosts must not use (and which fails
    # the rendezvous on GPUs without it). Before the first symmetric allocation, where torch reads it.
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    local = _local_problem()
    # Each rank's (host, GPU index, usable here) as int64s on the control group: no objects cross ranks.
    mine = torch.tensor([zlib.crc32(socket.gethostname().encode()), device.index, local is None], dtype=torch.int64)
    table = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(table, mine, group=control_group)
    why = local or _group_problem([tuple(int(v) for v in row.tolist()) for row in table])
    fast = None
    if why is None:  # the same on every rank: all of them rendezvous, or none
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(MAX_BYTES // DTYPE.itemsize, dtype=DTYPE, device=device)
            symm_mem.rendezvous(buffer, device_group.group_name)
            fast = SymmetricMemoryAllReduce(buffer, device_group.group_name)
        except Exception as exc:  # noqa: BLE001 - an optional fast path: any failure means NCCL
            why = f"symmetric memory failed on rank {rank}: {type(exc).__name__}: {exc}"
    # A rendezvous can fail on one rank only: then every rank drops it.
    ok = torch.tensor([fast is not None], dtype=torch.int64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=control_group)
    if not ok.item():
        return None, why or "symmetric memory failed on another rank"
    return fast, ""


def _local_problem() -> str | None:
    """Why this rank's torch cannot run the one-shot kernel, or None."""
    try:
        import torch.distributed._symmetric_memory
    except ImportError as exc:
        return f"this torch has no symmetric memory ({exc})"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
        return "this torch has no symmetric-memory one-shot all-reduce"
    return None


def _group_problem(ranks: list[tuple[int, int, int]]) -> str | None:
    """Why the group (each rank's host hash, GPU index, usable flag) cannot use symmetric memory, or None.
    Every rank checks every pair of GPUs, so all of them reach the same verdict."""
    for rank, (_, _, usable) in enumerate(ranks):
        if not usable:
            return f"rank {rank} has no symmetric-memory one-shot all-reduce"
    if len({host for host, _, _ in ranks}) > 1:
        return "the ranks span several nodes"
    gpus = [index for _, index, _ in ranks]
    for a in gpus:
        for b in gpus:
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return f"no P2P access from cuda:{a} to cuda:{b}"
    return None
