"""Decode CUDA graphs: one graph per (batch-size bucket, query length), captured at start and replayed on
every step whose sequences all have that many new tokens (1 for decode; 1+k for a speculative verify step,
captured only when EngineConfig.graph_query_lens asks).

A decode step launches a few hundred small kernels; replaying a captured graph removes their launch cost.
Graphs need static tensors, so each step is copied into fixed buffers sized for the largest bucket
(GraphBuffers.fill, the one place that does it), padding the unused rows: padded tokens write their K/V
nowhere (slot -1) and their logits are ignored. Block tables have a fixed width of max_model_len /
block_size, so the attention kernels' grids do not change between replays. The attention backend builds
each graph's metadata over these buffers (capture_metadata) and refreshes what it owns before a replay
(prepare_for_replay). A graph returns the logits of every token of its step.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from r1deploy.attention.base import AttentionBackend, AttentionMetadata, MLABackend, MLAMetadata
from r1deploy.core.forward_batch import ForwardBatch, PendingTokens


def batch_size_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (vLLM's capture sizes)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch + 1, 16))
    return sorted({*sizes, max_batch})


class GraphBuffers:
    """The static device tensors every graph reads, sized for max_batch sequences of max_query_len tokens."""

    def __init__(self, max_batch: int, max_query_len: int, table_width: int, block_size: int,
                 device: torch.device) -> None:
        n = max_batch * max_query_len
        self.block_size = block_size
        self.device = device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_batch, table_width, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)

    def batch(self, size: int, query_len: int) -> ForwardBatch:
        """The static batch of `size` sequences of query_len tokens (views of the buffers, host lengths as
        placeholders: the attention backend's capture metadata reads lengths from the device only)."""
        tokens = size * query_len
        return ForwardBatch(
            input_ids=self.input_ids[:tokens], positions=self.positions[:tokens],
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables[:size],
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=self.device) * query_len,
            seq_lens=self.seq_lens[:size], logits_indices=self.logits_indices[:tokens],
            query_lens_cpu=(query_len,) * size, seq_lens_cpu=(query_len,) * size, block_size=self.block_size,
            num_sampled_cpu=(query_len,) * size,
        )

    def fill(self, batch: ForwardBatch, bucket: int, pending: PendingTokens | None = None) -> None:
        """Copy a step of uniform query length (built in pinned host memory, so nothing here blocks the host)
        into the buffers, and pad rows up to `bucket` sequences. `pending` overwrites the input ids of rows
        whose token is still on the device."""
        size, tokens = batch.num_seqs, batch.num_tokens
        query_len = tokens // size
        width = batch.block_tables.shape[1]
        self.input_ids[:tokens].copy_(batch.input_ids, non_blocking=True)
        if pending is not None:
            pending.fill(self.input_ids)
        self.positions[:tokens].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:tokens].copy_(batch.slot_mapping, non_blocking=True)
        self.slot_mapping[tokens : bucket * query_len].fill_(-1)
        self.seq_lens[:size].copy_(batch.seq_lens, non_blocking=True)
        self.seq_lens[size:bucket].fill_(query_len)
        self.block_tables[:size, :width].copy_(batch.block_tables, non_blocking=True)
        if query_len > 1:  # which tokens' logits the step wants (one graph computes them all)
            self.logits_indices[: batch.logits_indices.shape[0]].copy_(batch.logits_indices, non_blocking=True)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: ForwardBatch  # the static batch it was captured with (keeps its tensors alive)
    metadata: AttentionMetadata | MLAMetadata
    logits: torch.Tensor  # [bucket * query_len, vocab] fp32, written by every replay
    hidden: torch.Tensor  # [bucket * query_len, hidden]: the final hidden states a draft head reads


class DecodeGraphRunner:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], attn_backend: AttentionBackend | MLABackend,
                 max_batch: int, max_model_len: int, block_size: int, device: torch.device,
                 query_lens: tuple[int, ...] = (1,)) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attn_backend = attn_backend
        self.buckets = batch_size_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.query_lens = tuple(sorted(set(query_lens)))
        width = -(-max_model_len // block_size)
        self.buffers = GraphBuffers(self.max_batch, max(self.query_lens), width, block_size, device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.attn_backend.init_capture_graph(self.max_batch, self.query_lens)
        pool = torch.cuda.graph_pool_handle()
        for query_len in reversed(self.query_lens):
            for size in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
                batch = self.buffers.batch(size, query_len)
                metadata = self.attn_backend.capture_metadata(batch)
                batch = dataclasses.replace(batch, attn_metadata=metadata)
                for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                    self.model.compute_logits(self.model(batch, self.kv_caches))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model(batch, self.kv_caches)
                    logits = self.model.compute_logits(hidden)
                self.graphs[(size, query_len)] = _Graph(graph, batch, metadata, logits, hidden)
        torch.cuda.synchronize()

    def covers(self, query_lens: list[int] | tuple[int, ...]) -> bool:
        """Whether a step with these per-sequence new-token counts has a graph."""
        return (0 < len(query_lens) <= self.max_batch and query_lens[0] in self.query_lens
                and all(n == query_lens[0] for n in query_lens))

    def hidden(self, batch: ForwardBatch) -> torch.Tensor:
        """The final hidden states [T, hidden] of every token of the step `run` replayed last (valid until the
        next replay)."""
        bucket = self.buckets[bisect.bisect_left(self.buckets, batch.num_seqs)]
        return self.graphs[(bucket, batch.query_lens_cpu[0])].hidden[: batch.num_tokens]

    def run(self, batch: ForwardBatch, pending: PendingTokens | None = None) -> torch.Tensor:
        """Logits of a covered step built in pinned host memory (ForwardBatch.build with device='cpu',
        pin_memory=True): [B, vocab] for one token per sequence, else the rows batch.logits_indices names."""
        size = batch.num_seqs
        query_len = batch.query_lens_cpu[0]
        bucket = self.buckets[bisect.bisect_left(self.buckets, size)]
        self.buffers.fill(batch, bucket, pending)
        entry = self.graphs[(bucket, query_len)]
        self.attn_backend.prepare_for_replay(entry.metadata, batch)
        entry.graph.replay()
        if query_len == 1:
            return entry.logits[:size]
        return entry.logits.index_select(0, self.buffers.logits_indices[: batch.logits_indices.shape[0]])
