"""All-reduce bus bandwidth: the measurement over real processes (gloo on the CPU) and doctor's check."""

from __future__ import annotations

import types

from r1deploy.doctor.checks import PASS, WARN, check_allreduce
from r1deploy.doctor.requirements import Requirements
from r1deploy.plan.collectives import AllReduceResult, measure_allreduce


def test_bus_bandwidth_formula() -> None:
    # nccl-tests' busbw: 2(n-1)/n of the buffer crosses each link in a ring all-reduce.
    assert AllReduceResult(4, "nccl", 1000, 1.0).bus_bytes_per_s == 1500


def test_gloo_allreduce_between_two_processes_measures_something() -> None:
    result = measure_allreduce(2, "gloo", size_bytes=1 << 20, iters=2)
    assert result.world_size == 2 and 0 < result.median_s < 10 and result.bus_bytes_per_s > 0


def _host(num_gpus: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(gpu=types.SimpleNamespace(gpus=tuple(object() for _ in range(num_gpus))))


def _req(num_gpus: int) -> Requirements:
    return Requirements(gpu="h200", num_gpus=num_gpus, nodes=1, gpu_memory_bytes=1, fp8_compute=False,
                        ram_bytes=1, disk_bytes=1, cpu_cores=1, load_time_s=1.0, disk_read_bytes_per_s=1.0,
                        internode_bytes_per_s=0.0, total_params=1, weights_bytes=1)


def test_check_compares_with_the_plans_link_assumption() -> None:
    seen = []

    def fake(world: int, backend: str) -> AllReduceResult:
        seen.append((world, backend))
        return AllReduceResult(world, backend, 10**9, 1 / 340)  # 2(n-1)/n * 340 GB/s

    # H200: 900 GB/s NVLink bidirectional -> 450 one way x 0.7 efficiency = 315 GB/s assumed.
    good = check_allreduce(_host(8), _req(2), measure=fake)
    assert good.status == PASS and seen == [(2, "nccl")] and "315 GB/s" in good.message
    slow = check_allreduce(_host(8), _req(2), measure=lambda w, b: AllReduceResult(w, b, 10**9, 1 / 20))
    assert slow.status == WARN and "below" in slow.message and slow.advice


def test_fewer_than_two_gpus_is_not_measured() -> None:
    def never(*_: object) -> AllReduceResult:
        raise AssertionError("must not measure")

    check = check_allreduce(_host(1), _req(8), measure=never)
    assert check.status == WARN and "not measured" in check.message
