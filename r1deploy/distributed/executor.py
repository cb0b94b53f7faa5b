"""MultiprocExecutor: rank 0's side of tensor parallelism (and --dp-attention) behind the engine's Executor seam;
run_node: the side of a node other than 0, which only runs its ranks.

Rank 0 sends each step's ForwardBatch to ranks 1..N-1 as a StepMessage, runs its own shard on the very
tensors the workers run, and samples. With async scheduling under TP it broadcasts the sampled ids on
the device group, so every rank fills the next step's pending tokens itself. Faults are translated
here: a worker that exits is noticed before each step; one that dies or hangs inside a step breaks or
times out the step's collectives; either way every later step raises TensorParallelError naming it.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import sys
from typing import Any

import torch

from r1deploy.distributed.group import TensorParallelError, init_group, leave_group
from r1deploy.distributed.messages import StepChannel, StepMessage
from r1deploy.distributed.nodes import NodeLayout, bind_rank_network
from r1deploy.distributed.worker import (
    build_runner,
    dead_workers,
    failed_ranks,
    shares_samples,
    spawn_workers,
    stop_workers,
    worker_spec,
)
from r1deploy.engine_config import EngineConfig
from r1deploy.errors import UsageError
from r1deploy.layers.sampler import SamplerOutput
from r1deploy.worker.executor import pending_tokens
from r1deploy.worker.model_input import ModelInput
from r1deploy.worker.model_runner import ModelRunner


class MultiprocExecutor:
    def __init__(self, processes: list[multiprocessing.process.BaseProcess], runner: ModelRunner,
                 config: EngineConfig) -> None:
        assert runner.tp is not None
        self.processes = processes
        self.runner = runner
        self.timeout_s = config.parallel.timeout_s
        self.channel = StepChannel(runner.tp.control_group, send_timeout_s=self.timeout_s)
        self.share_samples = shares_samples(runner.tp, config)
        self.error: str | None = None
        self.closed = False
        atexit.register(self.shutdown)

    @staticmethod
    def start(model: str | None, config: EngineConfig, *, dtype: Any = None, device: str | None = None,
              load_format: str = "auto") -> MultiprocExecutor:
        parallel = config.parallel
        layout = NodeLayout.of(parallel)
        if layout.node_rank != 0:
            raise ValueError("the engine runs on node 0; other nodes run run_node")
        if layout.nnodes > 1:
            bind_rank_network(parallel.master_addr, "r1deploy serve (node 0)")
        spec = worker_spec(model, config, dtype, device, load_format)
        processes = spawn_workers(spec, layout.ranks[1:])
        try:
            tp = init_group(0, spec.world_size, spec.master_addr, spec.master_port, spec.timeout_s, spec.device_type,
                            spec.init_timeout_s, dp_attention=parallel.dp_attention,
                            moe_all_to_all=parallel.moe_all_to_all, custom_all_reduce=parallel.custom_all_reduce)
            runner = build_runner(spec, tp)
        except BaseException as exc:
            dead = dead_workers(processes, wait_s=1.0)
            stop_workers(processes)
            leave_group()
            if dead and not isinstance(exc, UsageError):
                raise TensorParallelError(f"tensor-parallel start-up failed: {dead} (its error is printed above)") \
                    from exc
            raise
        return MultiprocExecutor(processes, runner, config)

    def check_health(self) -> None:
        if self.error is not None:
            raise TensorParallelError(self.error)
        dead = dead_workers(self.processes)
        if dead:
            self._fail(f"{dead}; the engine cannot run")

    def execute(self, model_input: ModelInput, previous: torch.Tensor | None) -> SamplerOutput | None:
        self.check_health()
        try:
            return self._execute(model_input, previous)
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL errors come as several types
            dead = dead_workers(self.processes, wait_s=2.0)
            cause = dead or f"a collective failed or timed out after {self.timeout_s:g}s ({type(exc).__name__}: {exc})"
            self._fail(f"tensor-parallel step failed: {cause}", exc)

    def _execute(self, model_input: ModelInput, previous: torch.Tensor | None) -> SamplerOutput | None:
        runner = self.runner
        if model_input.batch is None:  # --dp-attention: every rank runs its own part
            message = StepMessage.of_parts(list(model_input.parts), runner.config.block_size)
            self.channel.send(message)
            logits = runner.execute_data_parallel(message)
        else:
            message = StepMessage.of_batch(model_input.batch, model_input.pending_index)
            self.channel.send(message)
            batch = message.to_batch(runner.device)  # the very tensors every worker runs
            logits = runner.execute(batch, pending_tokens(model_input, previous, runner.device))
        if logits is None:
            return None
        sampled = runner.sample(logits, model_input.sampling)
        if self.share_samples:
            runner.tp.broadcast_from_driver(sampled.token_ids)  # the workers' copy, for the next step's pending ids
        return sampled

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        self.error = message
        raise TensorParallelError(message) from cause

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.shutdown)
        self.runner.release()  # first: captured graphs hold NCCL work that would stall the group's teardown
        if self.error is None:
            try:
                self.channel.send(StepMessage.shutdown())
            except Exception as exc:  # noqa: BLE001 - a broken group: the processes are stopped below
                print(f"r1deploy: tensor-parallel shutdown message not delivered: {exc}", file=sys.stderr)
        stop_workers(self.processes, grace_s=10.0 if self.error is None else 0.0)
        leave_group()


def run_node(model: str | None, config: Any, *, dtype: Any = None, device: str | None = None,
             load_format: str = "auto") -> int:
    """Node R > 0: start this node's ranks and wait until rank 0 stops them. Returns an exit status."""
    layout = NodeLayout.of(config.parallel)
    if layout.node_rank == 0:
        raise ValueError("node 0 runs the engine (LLMEngine); run_node is for the other nodes")
    who = f"r1deploy serve (node {layout.node_rank})"
    bind_rank_network(config.parallel.master_addr, who)
    processes = spawn_workers(worker_spec(model, config, dtype, device, load_format), layout.ranks)
    # SIGTERM / Ctrl-C here stop this node's ranks (rank 0 then fails its next step, clearly)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    print(f"{who}: ranks {layout.ranks.start}-{layout.ranks.stop - 1} joining "
          f"{config.parallel.master_addr}:{config.parallel.master_port}", flush=True)
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_workers(processes)
    failed = failed_ranks(processes, layout.first_rank)
    if failed:
        print(f"{who}: error: {failed}", file=sys.stderr, flush=True)
        return 1
    print(f"{who}: rank 0 shut down; exiting", flush=True)
    return 0
