"""ModelRunner: owns the model, the paged KV pool and the sampler; turns a scheduled step into tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1deploy.engine.batch import ForwardBatch, PendingTokens, to_device
from r1deploy.engine.config import EngineConfig
from r1deploy.engine.cuda_graphs import DecodeGraphRunner
from r1deploy.engine.request import Request
from r1deploy.engine.scheduler import ScheduledChunk, SchedulerOutput
from r1deploy.errors import UsageError
from r1deploy.layers.attention import is_fp8, resolve_kv_cache_dtype
from r1deploy.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from r1deploy.models.loader import LoadedModel

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup
    from r1deploy.distributed.messages import StepMessage


@dataclass(frozen=True)
class KVPoolSize:
    num_blocks: int
    bytes_per_block: int
    budget_bytes: int  # what the pool was allowed to take

    def capacity_tokens(self, block_size: int) -> int:
        return self.num_blocks * block_size


@dataclass(frozen=True)
class PreviousSamples:
    """The sampled ids of the step still in flight (async scheduling), on the device."""

    token_ids: torch.Tensor  # [B] int64
    requests: tuple[Request, ...]  # the request of each row


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_model_len: int,
                 tp: TPGroup | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config = config
        self.tp = tp  # tensor parallel: every rank runs each step; rank 0 broadcasts it first
        self.channel = None
        if tp is not None:
            from r1deploy.distributed.messages import StepChannel

            self.channel = StepChannel(tp.control_group, send_timeout_s=config.parallel.timeout_s)
        # --dp-attention: every rank runs its own sequences (its part of each step message) and holds only
        # their latent cache; rank 0's engine tells which rank a request's blocks live on (dp_rank_of).
        self.dp_attention = tp is not None and tp.dp_attention
        self.dp_rank_of: Callable[[Request], int] | None = None
        # Async scheduling under TP: rank 0 broadcasts each step's sampled ids on the device group, so every
        # rank can fill the next step's pending tokens itself (the step message carries only their index).
        self.share_samples = tp is not None and tp.size > 1 and not self.dp_attention and config.async_scheduling
        capabilities = self.model.capabilities
        if self.dp_attention and not capabilities.dp_attention:
            raise UsageError(f"--dp-attention needs a DeepSeek (MLA) model, not {type(self.model).__name__}")
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.kv_spec = self.model.kv_cache_spec
        if is_fp8(self.kv_dtype) and not self.kv_spec.fp8:
            raise UsageError(f"kv_cache_dtype={config.kv_cache_dtype!r} is not supported for "
                             f"{type(self.model).__name__} (only Llama/Qwen2 GQA and DeepSeek MLA caches)")
        self.sampler = Sampler()
        self.pool = self._size_pool()
        self.kv_caches = self._allocate_kv_caches(self.pool.num_blocks)
        self.graphs: DecodeGraphRunner | None = None
        # Only models whose forward has no host-side, data-dependent shapes can be captured. Under tensor
        # parallelism every rank captures the same buckets in the same order (the all-reduces are captured
        # too) and replays in lockstep: `graph_step` is a function of the step message alone.
        # --dp-attention runs eagerly: the per-rank token counts of the MoE exchange change every step.
        if (self.device.type == "cuda" and not config.enforce_eager and capabilities.cuda_graphs
                and not self.dp_attention):
            self.graphs = DecodeGraphRunner(self.model, self.kv_caches, config.max_num_seqs, max_model_len,
                                            config.block_size, self.device)

    def release(self) -> None:
        """Drop the KV cache and the captured graphs (and their memory pool) now, rather than whenever the
        last reference to the runner goes: a process that builds a second engine around the same model
        (a benchmark, a test) needs that memory back at once."""
        self.graphs = None
        self.kv_caches = []

    def _allocate_kv_caches(self, num_blocks: int) -> list[torch.Tensor]:
        """One paged cache per layer, in the layout the model class declares (GQA K/V or MLA latent)."""
        shape = self.kv_spec.shape(num_blocks, self.config.block_size)
        return [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.kv_spec.num_layers)]

    def _size_pool(self) -> KVPoolSize:
        per_block = self.config.block_size * self.kv_spec.bytes_per_token(self.kv_dtype)
        if self.config.num_gpu_blocks_override is not None:
            n = self.config.num_gpu_blocks_override
            return KVPoolSize(n, per_block, n * per_block)
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = self.config.cpu_kv_cache_bytes
        n = budget // per_block
        if self.tp is not None:  # every rank's pool has the same block ids: the smallest budget wins
            n = self.tp.min_int(int(n))
        if n < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB): "
                               "lower the model size or raise --gpu-memory-utilization")
        return KVPoolSize(int(n), per_block, int(budget))

    def _cuda_kv_budget(self) -> int:
        """vLLM's recipe: run the largest step once to find peak activation memory, then give the KV
        pool what is left of gpu_memory_utilization x total, after weights, peak and non-torch memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        _, total = torch.cuda.mem_get_info(self.device)
        self._profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        non_torch = max(0, (total - free_after) - torch.cuda.memory_reserved(self.device))
        torch.cuda.empty_cache()
        return int(total * self.config.gpu_memory_utilization - peak - non_torch)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        num_tokens = self.config.max_num_batched_tokens
        blocks = -(-num_tokens // self.config.block_size)
        scratch = self._allocate_kv_caches(blocks)
        batch = ForwardBatch.build([[0] * num_tokens], [0], [list(range(blocks))],
                                   self.config.block_size, self.device)
        if self.dp_attention:  # every rank profiles a full step of its own at once (the MoE exchange joins them)
            batch = dataclasses.replace(batch, dp_token_counts=(num_tokens,) * self.tp.size)
        hidden = self.model(batch, scratch)
        self.model.compute_logits(hidden[batch.logits_indices])
        del scratch

    @torch.inference_mode()
    def run(self, step: SchedulerOutput, vocab_size: int, previous: PreviousSamples | None = None
            ) -> SamplerOutput | None:
        """Launch one step; sample a token for each chunk that reaches its request's newest token. The
        result stays on the device (nothing here waits for the GPU). With async scheduling, `previous`
        is the step still in flight: a chunk whose last token it sampled takes that token on the device."""
        chunks = step.chunks
        if self.dp_attention:
            logits, rows = self._run_data_parallel(chunks)
            return None if logits is None else self._sample(logits, [chunks[i].request for i in rows], vocab_size)
        use_graph = self.graph_step([c.num_new_tokens for c in chunks])
        token_chunks, pending_index = self._token_chunks(chunks, previous)
        batch = ForwardBatch.build(
            token_chunks,
            [c.num_cached_before for c in chunks],
            [c.request.block_table for c in chunks],
            self.config.block_size,
            # graph inputs are copied into static device buffers; TP steps are broadcast from the host
            "cpu" if use_graph or self.channel is not None else self.device,
            pin_memory=use_graph,
        )
        pending = None
        if pending_index:
            on_gpu = self.device.type == "cuda"
            pending = PendingTokens(to_device(pending_index, torch.int64, self.device, on_gpu), previous.token_ids)
        rows = [i for i, c in enumerate(chunks) if c.samples]
        if self.channel is not None:
            from r1deploy.distributed.messages import StepMessage

            message = StepMessage.of_batch(batch, rows, pending_index)
            self.channel.send(message)
            batch = message.to_batch(self.device)  # the very tensors every worker runs
        logits = self.execute(batch, rows, use_graph, pending)
        if logits is None:
            return None
        sampled = self._sample(logits, [chunks[i].request for i in rows], vocab_size)
        if self.share_samples:
            self.tp.broadcast_from_driver(sampled.token_ids)  # the workers' copy, for the next step's pending ids
        return sampled

    def worker_step(self, message: StepMessage, previous_sampled: torch.Tensor | None) -> torch.Tensor | None:
        """Ranks 1..N-1: run one ordinary step message in lockstep with rank 0. previous_sampled: the ids
        the last sampling step broadcast (async scheduling); returns this step's, or None if it sampled none."""
        batch = message.to_batch(self.device)
        pending = None
        if message.pending.numel():
            if previous_sampled is None or int(message.pending[1].max()) >= previous_sampled.numel():
                raise ValueError("step message: pending tokens refer to samples this rank does not have")
            pending = PendingTokens(message.pending.to(self.device, non_blocking=True), previous_sampled)
        rows = message.sample_rows.tolist()
        self.execute(batch, rows, self.graph_step(batch.query_lens_cpu), pending)
        if not (self.share_samples and rows):
            return None
        return self.tp.broadcast_from_driver(torch.empty(len(rows), dtype=torch.int64, device=self.device))

    def _sample(self, logits: torch.Tensor, sampled: list[Request], vocab_size: int) -> SamplerOutput:
        sampling = SamplingBatch.build(
            [r.params for r in sampled],
            [r.prompt_token_ids for r in sampled],
            [r.output_token_ids for r in sampled],
            [r.generator for r in sampled],
            vocab_size,
            self.device,
            self.loaded.eos_token_ids,
            num_output_tokens=[r.num_output_tokens + r.num_placeholders for r in sampled],
        )
        return self.sampler(logits, sampling)

    def _run_data_parallel(self, chunks: tuple[ScheduledChunk, ...]) -> tuple[torch.Tensor | None, list[int]]:
        """--dp-attention on rank 0: split the step by the rank each request lives on, send every rank its
        part, run rank 0's own, and return the logits of the sampling chunks (rows: their indices into
        chunks, in step order) that every rank's part contributed."""
        from r1deploy.distributed.messages import StepMessage

        assert self.tp is not None and self.channel is not None and self.dp_rank_of is not None
        token_chunks, _ = self._token_chunks(chunks, None)
        members: list[list[int]] = [[] for _ in range(self.tp.size)]  # chunk indices of each rank, in step order
        for i, chunk in enumerate(chunks):
            members[self.dp_rank_of(chunk.request)].append(i)
        parts: list[tuple[ForwardBatch | None, list[int]]] = []
        gathered_order: list[int] = []  # the chunk index of each row the ranks return, in rank order
        for own in members:
            if not own:
                parts.append((None, []))
                continue
            batch = ForwardBatch.build([token_chunks[i] for i in own], [chunks[i].num_cached_before for i in own],
                                       [chunks[i].request.block_table for i in own], self.config.block_size, "cpu")
            rows = [j for j, i in enumerate(own) if chunks[i].samples]
            parts.append((batch, rows))
            gathered_order += [own[j] for j in rows]
        message = StepMessage.of_parts(parts, self.config.block_size)
        self.channel.send(message)
        logits = self.execute_data_parallel(message)
        rows = sorted(gathered_order)
        if logits is None:
            return None, rows
        position = {chunk: k for k, chunk in enumerate(gathered_order)}
        order = [position[i] for i in rows]
        if order != list(range(len(order))):
            logits = logits[torch.tensor(order, device=logits.device)]
        return logits, rows

    def execute_data_parallel(self, message: StepMessage) -> torch.Tensor | None:
        """--dp-attention, on every rank: run this rank's part of the step (possibly no sequences: it still
        joins every MoE exchange), then gather every rank's sampled rows' final hidden states, in rank order
        (hidden states, not logits: hidden_size values a row instead of vocab). Rank 0 returns their logits
        [R, vocab] fp32 (None when the step samples nothing); the other ranks return None."""
        assert self.tp is not None
        part = message.part(self.tp.rank)
        counts = tuple(message.dp_sizes[:, 0].tolist())
        batch = dataclasses.replace(part.to_batch(self.device), dp_token_counts=counts)
        hidden = self.model(batch, self.kv_caches)  # [T_rank, hidden]
        rows = part.sample_rows.to(self.device)
        own = hidden[batch.logits_indices[rows]]  # [R_rank, hidden]
        gathered = self.tp.all_gather_rows(own, message.dp_sizes[:, 2].tolist())  # [R, hidden], rank order
        if not self.tp.is_driver or gathered.shape[0] == 0:
            return None
        return self.model.compute_logits(gathered)

    @staticmethod
    def _token_chunks(chunks: tuple[ScheduledChunk, ...], previous: PreviousSamples | None
                      ) -> tuple[list[list[int]], list[list[int]]]:
        """Each chunk's new tokens on the host, and the [2, K] index of PendingTokens: a chunk that runs
        past its request's known tokens ends with the one token `previous` sampled for it (a placeholder)."""
        rows = {} if previous is None else {id(r): i for i, r in enumerate(previous.requests)}
        token_chunks: list[list[int]] = []
        index: list[list[int]] = [[], []]
        start = 0
        for c in chunks:
            end = c.num_cached_before + c.num_new_tokens
            if end > c.request.num_tokens:
                token_chunks.append(c.request.token_slice(c.num_cached_before, end - 1) + [0])
                index[0].append(start + c.num_new_tokens - 1)
                index[1].append(rows[id(c.request)])
            else:
                token_chunks.append(c.request.token_slice(c.num_cached_before, end))
            start += c.num_new_tokens
        return token_chunks, index if index[0] else []

    def graph_step(self, query_lens: list[int] | tuple[int, ...]) -> bool:
        """Whether a step with these per-sequence new-token counts replays a decode graph."""
        return (self.graphs is not None and len(query_lens) <= self.graphs.max_batch
                and all(n == 1 for n in query_lens))

    def execute(self, batch: ForwardBatch, rows: list[int], use_graph: bool = False,
                pending: PendingTokens | None = None) -> torch.Tensor | None:
        """Logits [len(rows), vocab] fp32 of the sequences in `rows` (None when empty); writes the step's K/V.
        Tensor-parallel workers call this for every step message, in lockstep with rank 0."""
        if use_graph:
            logits = self.graphs.run(batch, pending)  # [B, vocab]
            return self._select_rows(logits, rows, batch.num_seqs)
        if pending is not None:
            pending.fill(batch.input_ids)
        hidden = self.model(batch, self.kv_caches)
        indices = self._select_rows(batch.logits_indices, rows, batch.num_seqs)
        return None if indices is None else self.model.compute_logits(hidden[indices])

    def _select_rows(self, t: torch.Tensor, rows: list[int], num_seqs: int) -> torch.Tensor | None:
        """t[rows] along dim 0 (None when empty). Indexing a device tensor with a list would copy it
        from pageable memory and block; a decode step takes every row, so it needs no index at all."""
        if not rows:
            return None
        if len(rows) == num_seqs:
            return t
        return t[to_device(rows, torch.int64, t.device, t.device.type == "cuda")]
