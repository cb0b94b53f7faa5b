"""The tensor-parallel group a model shard runs in: this rank's place, and the collectives the layers use.

Two process groups: `device_group` carries the model's all-reduces and all-gathers (NCCL on CUDA, gloo on
the CPU) under the configured timeout, so a hung or dead peer raises instead of blocking forever;
`control_group` (always gloo, CPU tensors) carries step messages and start-up agreements, with a long
timeout because workers wait on it while the server is idle.
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from r1deploy.distributed.custom_all_reduce import SymmetricMemoryAllReduce, create_custom_all_reduce
from r1deploy.errors import UsageError

# Workers block on the control group between steps, however long the server stays idle.
CONTROL_TIMEOUT = timedelta(days=365)


class TensorParallelError(RuntimeError):
    """A rank died, hung past the timeout or could not join: the engine cannot run another step."""


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device: torch.device
    device_group: Any = None  # torch.distributed ProcessGroup; None only in single-rank unit tests
    control_group: Any = None
    # --dp-attention (DeepSeek MLA only): every rank runs attention, dense MLPs and shared experts whole on its
    # own sequences; only the routed experts are split (expert parallel) and see every rank's tokens.
    dp_attention: bool = False
    # --moe-a2a (with dp_attention): the MoE sends each token only to the ranks holding its experts
    # (all_to_all_rows) instead of all-gathering every token to every rank.
    moe_all_to_all: bool = False
    # Small all-reduces (decode) over torch's symmetric memory instead of NCCL; None: NCCL (or gloo) only
    # (off CUDA, --disable-custom-all-reduce, or symmetric memory unavailable: create_custom_all_reduce).
    symm_all_reduce: SymmetricMemoryAllReduce | None = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def all_reduce_backend(self) -> str:
        """Which all-reduce the model's layers get (benchmarks record it)."""
        if self.symm_all_reduce is not None:
            return self.symm_all_reduce.describe()
        return "gloo" if self.device.type == "cpu" else "NCCL"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over ranks, in place. Every rank takes the same branch: can_run depends only on x's shape,
        dtype and layout, the same on every rank at a given call."""
        if self.symm_all_reduce is not None and self.symm_all_reduce.can_run(x):
            return x.copy_(self.symm_all_reduce.all_reduce(x))
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along dim, in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.device_group)
        return torch.cat(parts, dim=dim)

    def all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's x [counts[rank], ...] concatenated in rank order ([sum(counts), ...]): rows padded
        to max(counts) for one all-gather, then cut back. Every rank passes the same counts; all zero: no
        collective at all (every rank skips it alike)."""
        most = max(counts)
        if most == 0:
            return x.new_empty((0, *x.shape[1:]))
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.device_group)
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    def reduce_scatter_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [sum(counts), ...] holds every rank's rows in rank order (as all_gather_rows returns them);
        sum x over ranks and give this rank its own counts[rank] rows. One reduce-scatter over segments
        padded to max(counts)."""
        most = max(counts)
        if most == 0:
            return x.new_empty((0, *x.shape[1:]))
        padded = x.new_zeros((self.size, most, *x.shape[1:]))
        start = 0
        for rank, n in enumerate(counts):
            padded[rank, :n] = x[start : start + n]
            start += n
        out = x.new_empty((most, *x.shape[1:]))
        dist.reduce_scatter(out, list(padded.unbind(0)), group=self.device_group)
        return out[: counts[self.rank]]

    def all_to_all_rows(self, x: torch.Tensor, send_counts: torch.Tensor,
                        recv_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [P, ...]: the rows for rank 0, then rank 1, ...; send_counts [size, G] int64 on self.device:
        how many rows go to each rank, in G consecutive groups (the MoE: one per local expert; G = 1 for a
        plain split). Returns (received [sum(recv_counts), ...]: rank 0's rows for this rank, then rank 1's,
        ...; recv_counts [size, G]: what each rank sent here, by group). The counts travel first (one small
        all-to-all) unless recv_counts is given: a reply along the same routes reversed knows them."""
        if recv_counts is None:
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.device_group)
        sends, recvs = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one host sync
        out = x.new_empty((sum(recvs), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recvs, sends, group=self.device_group)
        return out, recv_counts

    def broadcast_from_driver(self, x: torch.Tensor) -> torch.Tensor:
        """x in place, rank 0's values on every rank (device group: stream-ordered on CUDA, no host wait)."""
        dist.broadcast(x, src=0, group=self.device_group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest value over ranks (KV pool sizing); also a barrier on the control group."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())


def shard(total: int, rank: int, size: int) -> tuple[int, int]:
    """(start, length) of rank's equal slice of `total` rows (total must divide)."""
    per = total // size
    return rank * per, per


def kv_head_shard(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, KV heads) this rank keeps: an equal split, or one replicated head when size > heads."""
    if num_kv_heads >= size:
        return shard(num_kv_heads, rank, size)
    return rank // (size // num_kv_heads), 1


def check_tensor_parallel(num_attention_heads: int, num_key_value_heads: int, intermediate_size: int,
                          tp: int, arch: str = "this model") -> None:
    """Raise UsageError (one line) when tp cannot split the model's heads and MLP evenly."""
    if tp < 1:
        raise UsageError(f"--tp must be >= 1, got {tp}")
    if tp == 1:
        return
    if num_attention_heads % tp:
        raise UsageError(f"--tp {tp} does not divide {arch}'s {num_attention_heads} attention heads")
    if num_key_value_heads % tp and tp % num_key_value_heads:
        raise UsageError(f"--tp {tp} and {arch}'s {num_key_value_heads} KV heads: one must divide the other")
    if intermediate_size % tp:
        raise UsageError(f"--tp {tp} does not divide {arch}'s MLP width {intermediate_size}")


def free_port(host: str) -> int:
    """A port free on `host` now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_group(rank: int, size: int, addr: str, port: int, timeout_s: float, device_type: str,
               init_timeout_s: float = 300.0, local_rank: int | None = None,
               dp_attention: bool = False, moe_all_to_all: bool = False,
               custom_all_reduce: bool = True) -> TPGroup:
    """Join the rendezvous at tcp://addr:port as `rank` (within init_timeout_s) and build both groups.
    local_rank: this rank's GPU on its node (default: rank, one node). custom_all_reduce: small
    all-reduces over symmetric memory where it works (r1deploy.distributed.custom_all_reduce)."""
    if dist.is_initialized():
        raise TensorParallelError("a torch.distributed group already exists in this process: "
                                  "run one tensor-parallel engine per process")
    if device_type == "cuda":
        device, backend = torch.device("cuda", rank if local_rank is None else local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    host = f"[{addr}]" if ":" in addr else addr
    try:
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=size,
                                timeout=timedelta(seconds=init_timeout_s))
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        collectives = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        leave_group()
        raise TensorParallelError(f"the tensor-parallel group ({size} ranks at {host}:{port}) did not form "
                                  f"within {init_timeout_s:g}s: {exc}") from exc
    symm = create_custom_all_reduce(rank, size, device, collectives, control, enabled=custom_all_reduce)
    return TPGroup(rank, size, device, collectives, control, dp_attention, moe_all_to_all, symm)


def leave_group(timeout_s: float = 10.0) -> None:
    """destroy_process_group, bounded: tearing down NCCL communicators can block (a peer already gone, or
    CUDA graphs still holding captured collectives), and a server that is shutting down must not hang on
    it; the process exit releases whatever is left."""
    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="r1deploy-leave-group", daemon=True).start()
    if not done.wait(timeout_s):
        print(f"r1deploy: process-group teardown did not finish within {timeout_s:g}s; exiting without it",
              file=sys.stderr, flush=True)
