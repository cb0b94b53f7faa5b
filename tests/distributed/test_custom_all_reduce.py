"""The symmetric-memory all-reduce (r1deploy.distributed.custom_all_reduce): which tensors it takes, that
TPGroup.all_reduce uses it in place and NCCL otherwise, that it is never created off CUDA; on two GPUs
(gpu mark) that it sums exactly as NCCL does, eagerly and inside a CUDA graph."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from r1deploy.distributed.custom_all_reduce import MAX_BYTES, SymmetricMemoryAllReduce
from r1deploy.distributed.group import TPGroup, free_port, init_group, leave_group


def cpu_fake(max_bytes: int = MAX_BYTES) -> SymmetricMemoryAllReduce:
    """The selection logic over a plain CPU buffer (no rendezvous): can_run only looks at tensors."""
    return SymmetricMemoryAllReduce(torch.empty(max_bytes // 2, dtype=torch.bfloat16), "unused", max_bytes)


def test_can_run_takes_small_aligned_contiguous_tensors_of_its_dtype() -> None:
    fast = cpu_fake()
    assert fast.can_run(torch.zeros(4, 896, dtype=torch.bfloat16))  # a decode step's hidden states
    assert fast.can_run(torch.zeros(MAX_BYTES // 2, dtype=torch.bfloat16))  # exactly the limit
    assert not fast.can_run(torch.zeros(MAX_BYTES // 2 + 8, dtype=torch.bfloat16))  # prefill-sized: NCCL
    assert not fast.can_run(torch.zeros(4, 896, dtype=torch.float32))  # another dtype
    assert not fast.can_run(torch.zeros(896, 4, dtype=torch.bfloat16).t())  # not contiguous
    assert not fast.can_run(torch.zeros(0, 896, dtype=torch.bfloat16))  # empty
    assert not fast.can_run(torch.zeros(3, dtype=torch.bfloat16))  # 6 bytes: below the kernel's alignment
    assert not fast.can_run(torch.zeros(16, dtype=torch.bfloat16)[4:12])  # starts 8 bytes into its storage
    if torch.cuda.is_available():
        assert not fast.can_run(torch.zeros(4, 896, dtype=torch.bfloat16, device="cuda"))  # another device


class _Recorder(SymmetricMemoryAllReduce):
    """A fake whose 'sum' doubles x, recording the calls."""

    def __init__(self) -> None:
        super().__init__(torch.empty(64, dtype=torch.bfloat16), "unused", 128)
        self.calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


def test_tp_group_uses_it_in_place() -> None:
    fake = _Recorder()
    tp = TPGroup(0, 2, torch.device("cpu"), symm_all_reduce=fake)
    x = torch.arange(16, dtype=torch.bfloat16).view(2, 8)
    out = tp.all_reduce(x)
    assert out is x and fake.calls == 1
    assert torch.equal(x, 2 * torch.arange(16, dtype=torch.bfloat16).view(2, 8))
    assert "symmetric-memory" in tp.all_reduce_backend


def _gloo_rank(rank: int, port: int) -> None:
    tp = init_group(rank, 2, "127.0.0.1", port, 60.0, "cpu", custom_all_reduce=True)
    try:
        assert tp.symm_all_reduce is None and tp.all_reduce_backend == "gloo"
        x = torch.full((3, 8), float(rank + 1))
        assert tp.all_reduce(x) is x and torch.equal(x, torch.full((3, 8), 3.0))
    finally:
        leave_group()


def test_never_created_on_gloo() -> None:
    mp.spawn(_gloo_rank, args=(free_port("127.0.0.1"),), nprocs=2)


def _cuda_rank(rank: int, port: int) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # shared hosts: no NVLink multicast (read at NCCL init)
    tp = init_group(rank, 2, "127.0.0.1", port, 60.0, "cuda")
    try:
        assert tp.symm_all_reduce is not None, "symmetric memory unavailable on this host"
        for numel in (8, 896, 3584 * 7, 3584 * 64, MAX_BYTES // 2):  # 16 B .. the 1 MiB limit
            x = torch.randn(numel, dtype=torch.bfloat16, device=tp.device) * (rank + 1)
            assert tp.symm_all_reduce.can_run(x)
            want = x.clone()
            torch.distributed.all_reduce(want, group=tp.device_group)
            got = x.clone()
            assert tp.all_reduce(got) is got
            assert torch.equal(got, want), numel
        # Inside a CUDA graph (as decode replays it): warm up, capture, then replay on new values.
        static = torch.zeros(4, 3584, dtype=torch.bfloat16, device=tp.device)
        tp.all_reduce(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tp.all_reduce(static)
        for step in range(3):
            values = torch.randn(4, 3584, dtype=torch.bfloat16, device=tp.device) * (rank + 1 + step)
            want = values.clone()
            torch.distributed.all_reduce(want, group=tp.device_group)
            static.copy_(values)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static, want), step
    finally:
        leave_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_matches_nccl_on_two_gpus() -> None:
    mp.spawn(_cuda_rank, args=(free_port("127.0.0.1"),), nprocs=2)


def test_group_verdict_from_the_gathered_integers() -> None:
    """Each rank's (host hash, GPU index, usable) goes round as int64s; one unusable rank or two hosts means NCCL."""
    from r1deploy.distributed.custom_all_reduce import _group_problem

    assert "rank 1" in _group_problem([(7, 0, 1), (7, 1, 0)])
    assert "several nodes" in _group_problem([(7, 0, 1), (8, 0, 1)])
