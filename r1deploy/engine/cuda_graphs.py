"""Decode CUDA graphs: one graph per batch-size bucket, captured at start and replayed every decode step.

A decode step launches a few hundred small kernels; replaying a captured graph removes their
launch cost. Graphs need static tensors, so each step copies its inputs into fixed buffers sized
for the largest bucket, padding the unused rows: padded tokens write their K/V nowhere (slot -1)
and read one cached token, and their logits are ignored. Block tables have a fixed width of
max_model_len / block_size, so the attention kernels' grids do not change between replays.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import nn

from r1deploy.engine.batch import ForwardBatch, PendingTokens


def batch_size_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (vLLM's capture sizes)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch + 1, 16))
    return sorted({*sizes, max_batch})


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab] fp32, written by every replay


class DecodeGraphRunner:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], max_batch: int, max_model_len: int,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = batch_size_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        width = -(-max_model_len // block_size)
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, _Graph] = {}
        self._capture_all()

    def _static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            logits_indices=self.logits_indices[:size], query_lens_cpu=(1,) * size,
            seq_lens_cpu=(1,) * size, block_size=self.block_size,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            batch = self._static_batch(size)
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self.model.compute_logits(self.model(batch, self.kv_caches))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model(batch, self.kv_caches))
            self.graphs[size] = _Graph(graph, logits)
        torch.cuda.synchronize()

    def run(self, batch: ForwardBatch, pending: PendingTokens | None = None) -> torch.Tensor:
        """Logits [B, vocab] of a decode batch built in pinned host memory (ForwardBatch.build with
        device='cpu', pin_memory=True), so the copies into the static buffers do not block the host.
        `pending` overwrites the input ids of rows whose token is still on the device."""
        size = batch.num_seqs
        bucket = self.buckets[bisect.bisect_left(self.buckets, size)]
        width = batch.block_tables.shape[1]
        self.input_ids[:size].copy_(batch.input_ids, non_blocking=True)
        if pending is not None:
            pending.fill(self.input_ids)
        self.positions[:size].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:size].copy_(batch.slot_mapping, non_blocking=True)
        self.slot_mapping[size:bucket].fill_(-1)
        self.seq_lens[:size].copy_(batch.seq_lens, non_blocking=True)
        self.seq_lens[size:bucket].fill_(1)
        self.block_tables[:size, :width].copy_(batch.block_tables, non_blocking=True)
        entry = self.graphs[bucket]
        entry.graph.replay()
        return entry.logits[:size]
