"""Tensor-parallel worker processes: rank 0 (the engine's process) schedules and samples; ranks 1..N-1
run a loop that receives each step's tensors and runs their model shard in lockstep.

Start-up: each node checks the model splits over N ranks and that its share of the devices exists,
spawns its workers (node 0: ranks 1..nproc-1 beside rank 0; other nodes: see nodes.py), and every rank
joins the rendezvous at tcp://master_addr:port, loads the full checkpoint keeping its shard, and agrees
on the KV pool size (the minimum over ranks). Faults: a worker that exits is
noticed before each step; one that dies or hangs inside a step breaks or times out the step's
collectives; either way the engine raises TensorParallelError naming the rank, and every later
step raises it again (the server's watchdog then turns health to 503).
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1deploy.config import read_hf_config
from r1deploy.core.forward_batch import PendingTokens
from r1deploy.distributed.group import TPGroup, free_port, init_group, leave_group
from r1deploy.distributed.messages import Op, StepChannel, StepMessage
from r1deploy.distributed.nodes import NodeLayout
from r1deploy.engine_config import EngineConfig
from r1deploy.errors import UsageError
from r1deploy.models.loader import LoadedModel, load_model
from r1deploy.models.registry import model_class_for_config
from r1deploy.worker.model_runner import ModelRunner


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs to build its shard: plain local values from the operator, never client data."""

    model: str | None
    dtype: Any  # torch.dtype, a dtype name or None
    device_type: str  # "cpu" or "cuda"
    load_format: str
    engine_config: EngineConfig
    world_size: int
    nproc_per_node: int  # a rank's GPU on its node is rank % nproc_per_node
    master_addr: str
    master_port: int
    timeout_s: float
    init_timeout_s: float


def precheck(model: str | None, tp: int, dp_attention: bool = False) -> None:
    """Validate tp (and --dp-attention) against the model's config before any process starts (HF directories
    and presets; GGUF files are checked when each rank builds its shard)."""
    from r1deploy.presets import resolve_config_path

    if tp < 1:
        raise UsageError(f"--tp must be >= 1, got {tp}")
    if dp_attention and tp < 2:
        raise UsageError("--dp-attention needs --tp > 1 (attention runs data-parallel over the tensor-parallel ranks)")
    if dp_attention and model is None:
        raise UsageError("--dp-attention needs a DeepSeek (MLA) model, not the embedded Llama model")
    if model is None or tp == 1:
        return
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    raw = read_hf_config(path if path.is_dir() else resolve_config_path(model))
    cls = model_class_for_config(raw)
    cls.check_parallel(cls.config_class.from_hf(raw), tp, dp_attention)


def build_runner(spec: WorkerSpec, tp: TPGroup) -> ModelRunner:
    """Load this rank's shard and size its KV pool (collectives: every rank calls this together)."""
    loaded: LoadedModel = load_model(spec.model, dtype=spec.dtype, device=tp.device, load_format=spec.load_format,
                                     tp=tp)
    tp.min_int(0)  # barrier on the long-timeout group: loading 70B can outlast the collective timeout
    max_model_len = spec.engine_config.max_model_len or loaded.config.max_position_embeddings
    return ModelRunner(loaded, spec.engine_config, max_model_len, tp=tp)


def shares_samples(tp: TPGroup, config: EngineConfig) -> bool:
    """Async scheduling under TP: rank 0 broadcasts each step's sampled ids on the device group, so every rank
    fills the next step's pending tokens itself (the step message carries only their index)."""
    return tp.size > 1 and not tp.dp_attention and config.async_scheduling


def worker_step(runner: ModelRunner, message: StepMessage, previous_sampled: torch.Tensor | None,
                share_samples: bool) -> torch.Tensor | None:
    """Ranks 1..N-1: run one ordinary step message in lockstep with rank 0. previous_sampled: the ids the
    last sampling step broadcast (async scheduling); returns this step's, or None if it sampled none."""
    batch = message.to_batch(runner.device)
    pending = None
    if message.pending.numel():
        if previous_sampled is None or int(message.pending[1].max()) >= previous_sampled.numel():
            raise ValueError("step message: pending tokens refer to samples this rank does not have")
        pending = PendingTokens(message.pending.to(runner.device, non_blocking=True), previous_sampled)
    runner.execute(batch, pending)
    num_sampled = batch.num_logits
    if not (share_samples and num_sampled):
        return None
    return runner.tp.broadcast_from_driver(torch.empty(num_sampled, dtype=torch.int64, device=runner.device))


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Entry point of ranks 1..N-1 (spawned)."""
    # A Ctrl-C or SIGTERM to the process group is rank 0's to handle (it drains, then stops us); a worker
    # also exits when rank 0's connection closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from r1deploy.distributed.numa import bind_rank

    bind_rank(getattr(spec.engine_config.parallel, "numa_bind", "off"), rank % spec.nproc_per_node, spec.device_type,
              f"r1deploy rank {rank}")
    runner = None
    try:
        tp = init_group(rank, spec.world_size, spec.master_addr, spec.master_port, spec.timeout_s, spec.device_type,
                        spec.init_timeout_s, local_rank=rank % spec.nproc_per_node,
                        dp_attention=spec.engine_config.parallel.dp_attention,
                        moe_all_to_all=spec.engine_config.parallel.moe_all_to_all,
                        custom_all_reduce=spec.engine_config.parallel.custom_all_reduce)
        runner = build_runner(spec, tp)
        channel = StepChannel(tp.control_group)
        share_samples = shares_samples(tp, spec.engine_config)
        previous_sampled = None  # the last sampling step's ids, broadcast by rank 0 (async scheduling)
        with torch.inference_mode():
            while True:
                message = channel.recv()
                if message.op is Op.SHUTDOWN:
                    break
                if message.is_data_parallel:  # --dp-attention: this rank's own sequences
                    runner.execute_data_parallel(message)
                    continue
                sampled = worker_step(runner, message, previous_sampled, share_samples)
                if sampled is not None:
                    previous_sampled = sampled
    except BaseException as exc:  # noqa: BLE001 - report on stderr, exit non-zero; rank 0 names this rank
        print(f"r1deploy tensor-parallel worker {rank}: error: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        sys.exit(1)
    finally:
        if runner is not None:
            runner.release()  # captured graphs hold NCCL work: drop them before the communicators go
        leave_group()


def worker_spec(model: str | None, config: EngineConfig, dtype: Any, device: str | None,
                load_format: str) -> WorkerSpec:
    """Check this node can run its ranks (devices, the model's split) and describe them for spawn_workers."""
    parallel = config.parallel
    layout = NodeLayout.of(parallel)
    device_type = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if device_type == "cuda":
        found = torch.cuda.device_count()
        if found < layout.nproc_per_node:
            on = "on this node" if layout.nnodes == 1 else f"on node {layout.node_rank} (--nproc-per-node)"
            raise UsageError(f"--tp {layout.world_size} needs {layout.nproc_per_node} GPUs {on}, found {found}")
    elif device_type != "cpu":
        raise UsageError(f"tensor parallelism runs on cuda (NCCL) or cpu (gloo), not {device_type}")
    precheck(model, layout.world_size, parallel.dp_attention)
    if model is None:  # convert the embedded GGUF once, here, not in every rank at the same time
        from r1deploy.models.loader import embedded_model_dir

        model = str(embedded_model_dir())
    port = parallel.master_port or free_port(parallel.master_addr)
    return WorkerSpec(model, dtype, device_type, load_format, config, layout.world_size, layout.nproc_per_node,
                      parallel.master_addr, port, parallel.timeout_s, parallel.init_timeout_s)


def spawn_workers(spec: WorkerSpec, ranks: range) -> list[multiprocessing.process.BaseProcess]:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, args=(rank, spec), name=f"r1deploy-tp{rank}", daemon=True)
                 for rank in ranks]
    for process in processes:
        process.start()
    return processes


def failed_ranks(processes: list[multiprocessing.process.BaseProcess], first_rank: int) -> str:
    """'' when every (finished) worker exited with status 0, else which ranks failed and how."""
    return "; ".join(f"tensor-parallel worker {rank} exited ({_how(p.exitcode)})"
                     for rank, p in enumerate(processes, start=first_rank) if p.exitcode)


def dead_workers(processes: list[multiprocessing.process.BaseProcess], wait_s: float = 0.0) -> str:
    """'' while every worker runs, else which ranks exited and how."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = [(rank, p.exitcode) for rank, p in enumerate(processes, start=1) if not p.is_alive()]
        if dead or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return "; ".join(f"tensor-parallel worker {rank} exited ({_how(code)})" for rank, code in dead)


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def stop_workers(processes: list[multiprocessing.process.BaseProcess], grace_s: float = 0.0) -> None:
    for process in processes:
        process.join(timeout=grace_s)
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)
