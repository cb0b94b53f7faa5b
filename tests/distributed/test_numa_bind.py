"""--numa-bind on a fake two-node topology: the CPU set and memory node chosen per rank, when binding applies,
and what is applied to every thread; plus the real system calls on this host, read back as doctor reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1deploy.distributed import numa
from r1deploy.distributed.numa import NumaBinding, NumaTopology, apply_binding, choose_binding, should_bind
from r1deploy.errors import UsageError

NODE0, NODE1 = frozenset(range(0, 8)), frozenset(range(8, 16))
# Two sockets of 8 CPUs; GPUs 0-3 on node 0, 4-7 on node 1 (a typical 8-GPU server).
TWO_NODES = NumaTopology({0: NODE0, 1: NODE1}, (0, 0, 0, 0, 1, 1, 1, 1))
ALL = NODE0 | NODE1


@pytest.mark.parametrize("rank", range(8))
def test_each_rank_gets_its_gpus_node(rank: int) -> None:
    binding = choose_binding(TWO_NODES, rank, None, ALL)
    node = 0 if rank < 4 else 1
    assert binding == NumaBinding(gpu=rank, node=node, cpus=NODE0 if node == 0 else NODE1)


def test_cuda_visible_devices_maps_local_ranks_to_physical_gpus() -> None:
    assert choose_binding(TWO_NODES, 0, "6,1", ALL).node == 1
    assert choose_binding(TWO_NODES, 1, "6,1", ALL).node == 0
    assert choose_binding(TWO_NODES, 0, "GPU-8f3c0a", ALL) is None  # UUIDs: the GPU cannot be placed
    assert choose_binding(TWO_NODES, 2, "6,1", ALL) is None


def test_a_cpuset_narrows_the_cpus_and_an_unknown_node_binds_nothing() -> None:
    assert choose_binding(TWO_NODES, 5, None, frozenset({1, 9, 10})).cpus == {9, 10}
    assert choose_binding(NumaTopology({0: NODE0, 1: NODE1}, (None,)), 0, None, ALL) is None


def test_when_binding_applies() -> None:
    one_node = NumaTopology({0: ALL}, (0, 0))
    assert should_bind("auto", TWO_NODES, "cuda")
    assert not should_bind("auto", one_node, "cuda")
    assert not should_bind("auto", TWO_NODES, "cpu")
    assert should_bind("on", one_node, "cuda")
    assert not should_bind("off", TWO_NODES, "cuda")
    with pytest.raises(UsageError, match="no GPU"):
        should_bind("on", TWO_NODES, "cpu")
    with pytest.raises(UsageError, match="no NUMA node"):
        should_bind("on", NumaTopology({0: ALL}, (None,)), "cuda")


def test_every_thread_is_bound_and_memory_preferred_on_the_node() -> None:
    calls: list[tuple] = []
    text = apply_binding(NumaBinding(5, 1, NODE1), set_affinity=lambda tid, cpus: calls.append(("cpu", tid, cpus)),
                         set_memory_node=lambda node: calls.append(("mem", node)), threads=lambda: [100, 101])
    assert calls == [("cpu", 100, NODE1), ("cpu", 101, NODE1), ("mem", 1)]
    assert text == "GPU 5: 8 CPUs of node 1, memory preferred on node 1"


def test_a_failed_memory_policy_is_reported_not_raised() -> None:
    def refuse(node: int) -> None:
        raise OSError(1, "set_mempolicy: Operation not permitted")

    text = apply_binding(NumaBinding(0, 0, frozenset()), set_affinity=lambda *a: pytest.fail("no CPUs to bind"),
                         set_memory_node=refuse, threads=lambda: [1])
    assert "CPUs left as they are" in text and "memory policy not set" in text


def test_bind_rank_on_the_fake_topology(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    applied: list[NumaBinding] = []
    monkeypatch.setattr(numa, "apply_binding", lambda b: applied.append(b) or "done")
    monkeypatch.setattr(numa.os, "sched_getaffinity", lambda pid: ALL)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    binding = numa.bind_rank("auto", 1, "cuda", "rank 1", topology=lambda: TWO_NODES)
    assert binding == applied[0] == NumaBinding(5, 1, NODE1)
    assert "rank 1: --numa-bind: done" in capsys.readouterr().out
    assert numa.bind_rank("auto", 1, "cpu", "rank 1", topology=lambda: TWO_NODES) is None


_REAL = """
import os, sys
from r1deploy.distributed.numa import apply_binding, NumaBinding
from r1deploy.doctor.serving import proc_binding
cpu = min(os.sched_getaffinity(0))
print(apply_binding(NumaBinding(0, 0, frozenset({cpu}))))
bytearray(64 << 20)  # touch memory under the new policy
print(sorted(proc_binding(os.getpid())[0]), proc_binding(os.getpid())[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/sys/devices/system/node/node0"),
                    reason="needs Linux with NUMA node 0 in sysfs")
def test_real_system_calls_read_back_as_doctor_reads_them() -> None:
    out = subprocess.run([sys.executable, "-c", _REAL], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).parents[2]).stdout.splitlines()
    cpu = min(os.sched_getaffinity(0))
    assert out[0] == "GPU 0: 1 CPUs of node 0, memory preferred on node 0"
    assert out[1] == f"[{cpu}] prefer:0"
