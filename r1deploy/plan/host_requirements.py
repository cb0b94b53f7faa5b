"""What each host (node) needs besides GPUs: RAM, disk, CPU cores, load time, inter-node network.

All values are per node; `r1deploy doctor` compares them with the machine it runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1deploy.plan.catalog import GB, GiB
from r1deploy.plan.memory import weights_bytes_total
from r1deploy.plan.model_spec import ModelSpec
from r1deploy.plan.parallel import Layout
from r1deploy.plan.precision import Precision
from r1deploy.plan.roofline import ACT_BYTES
from r1deploy.plan.serving import Performance, Workload

# Safetensors are mmapped: the page cache holds the shards a node loads while they are copied to the
# GPUs, plus pinned staging buffers; 1.25x the node's share keeps a restart from re-reading disk.
RAM_STAGING_FACTOR = 1.25
RAM_PER_GPU_BYTES = 6 * GiB  # one worker process: Python, CUDA host allocations, tokenizer (~4-6 GiB in vLLM)
RAM_OS_BYTES = 16 * GiB  # OS, API server, monitoring
RAM_SIZES_GIB = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)  # what servers ship with
# A single PCIe 4 NVMe reads 3-7 GB/s raw; safetensors loading through the page cache sustains ~2 GB/s.
DISK_READ_BYTES_PER_S = 2.0e9
DISK_HEADROOM = 1.2  # HF cache metadata, logs, a container image
DISK_SYSTEM_BYTES = 50 * GB  # OS + Python environment with torch/CUDA wheels
# One busy-polling worker per GPU plus tokenizer/detokenizer threads; vLLM recommends >= 2, we plan 4.
CPU_CORES_PER_GPU = 4
CPU_CORES_SYSTEM = 4  # API server and OS


@dataclass(frozen=True)
class HostPlan:
    checkpoint_bytes: int
    node_weight_bytes: int
    ram_bytes: int
    disk_bytes: int
    cpu_cores: int
    load_time_s: float
    disk_read_bytes_per_s: float
    internode_bytes_per_s: float


def _round_ram(nbytes: float) -> int:
    gib = nbytes / GiB
    return next((s for s in RAM_SIZES_GIB if s >= gib), math.ceil(gib / 512) * 512) * GiB


def host_requirements(model: ModelSpec, precision: Precision, layout: Layout, perf: Performance,
                      work: Workload) -> HostPlan:
    # The HF checkpoint ships the MTP module (R1/V3): it is downloaded and stored even if not served.
    checkpoint = weights_bytes_total(model, precision, include_mtp=True)
    gpus_on_node = min(layout.num_gpus, layout.gpus_per_node)
    # A node loads the shards of the instances on it; an instance spanning nodes splits the load.
    node_share = min(1.0, gpus_on_node / layout.instance_gpus)
    node_weights = int(checkpoint * node_share)
    ram = _round_ram(node_weights * RAM_STAGING_FACTOR + gpus_on_node * RAM_PER_GPU_BYTES + RAM_OS_BYTES)
    disk = checkpoint * DISK_HEADROOM + DISK_SYSTEM_BYTES
    if precision.weights != model.checkpoint_weights:
        # Converting (FP8 -> BF16, or quantising) needs the original checkpoint on disk as well.
        original = Precision(model.checkpoint_weights, precision.kv_cache, model.checkpoint_group_size or 128)
        disk += weights_bytes_total(model, original, include_mtp=True)
    return HostPlan(
        checkpoint_bytes=checkpoint, node_weight_bytes=node_weights, ram_bytes=ram, disk_bytes=int(disk),
        cpu_cores=gpus_on_node * CPU_CORES_PER_GPU + CPU_CORES_SYSTEM,
        load_time_s=node_weights / DISK_READ_BYTES_PER_S, disk_read_bytes_per_s=DISK_READ_BYTES_PER_S,
        internode_bytes_per_s=_internode_rate(model, layout, perf, work),
    )


def _internode_rate(model: ModelSpec, layout: Layout, perf: Performance, work: Workload) -> float:
    """Bytes/s one node sends to others at the predicted load: TP/EP collectives that span nodes,
    plus pipeline hand-offs (each TP rank forwards the hidden states of its micro-batch) between
    stages on different nodes; the busier of prefill and decode."""
    if layout.nodes == 1:
        return 0.0
    gpus = min(layout.num_gpus, layout.gpus_per_node)
    decode_batch = max(perf.concurrency / layout.replicas / layout.pp, 1.0)
    rates = []
    for step, tokens in ((perf.prefill, work.input_len), (perf.decode, decode_batch)):
        sent = step.internode_comm_bytes * gpus
        if layout.pp_crosses_nodes:
            sent += layout.tp * tokens * model.hidden_size * ACT_BYTES
        rates.append(sent / step.total_s)
    return max(rates)
