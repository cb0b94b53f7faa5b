"""Executors: run a ModelInput on the model's ranks and return its samples. The engine sees only this seam.

LocalExecutor runs one process's ModelRunner; distributed/executor.MultiprocExecutor drives tensor-parallel
(and --dp-attention) worker processes with the same interface.
"""

from __future__ import annotations

from typing import Protocol

import torch

from r1deploy.core.forward_batch import PendingTokens, to_device
from r1deploy.layers.sampler import SamplerOutput
from r1deploy.worker.model_input import ModelInput
from r1deploy.worker.model_runner import ModelRunner


class Executor(Protocol):
    runner: ModelRunner  # rank 0's: the engine reads its pool size, device and loaded model

    def execute(self, model_input: ModelInput, previous: torch.Tensor | None) -> SamplerOutput | None:
        """Launch the step and sample; waits for nothing. previous: the in-flight step's sampled ids on the
        device ([B_prev] int64), which model_input.pending_index refers to (async scheduling)."""
        ...

    def check_health(self) -> None:
        """Raise if the ranks can no longer run a step (called while idle, so a dead rank shows without a request)."""
        ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, model_input: ModelInput, previous: torch.Tensor | None) -> SamplerOutput | None:
        assert model_input.batch is not None, "--dp-attention runs under MultiprocExecutor"
        logits = self.runner.execute(model_input.batch, pending_tokens(model_input, previous, self.runner.device))
        if logits is None:
            return None
        return self.runner.sample(logits, model_input.sampling)

    def check_health(self) -> None:
        pass  # one process: if it runs, its only rank does

    def shutdown(self) -> None:
        self.runner.release()


def pending_tokens(model_input: ModelInput, previous: torch.Tensor | None,
                   device: torch.device) -> PendingTokens | None:
    if not model_input.pending_index:
        return None
    assert previous is not None, "pending tokens need the in-flight step's samples"
    index = to_device(model_input.pending_index, torch.int64, device, device.type == "cuda")
    return PendingTokens(index, previous)
