"""ModelRunner: owns the model, the paged KV pool, the decode graphs and the sampler of one rank; executes a
step's ForwardBatch and samples its logits. Which steps run, and on which ranks, is the executor's business."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1deploy.attention.selector import default_attention_backend, make_attention_backend
from r1deploy.core.forward_batch import ForwardBatch, PendingTokens, to_device
from r1deploy.engine_config import EngineConfig
from r1deploy.errors import UsageError
from r1deploy.kernels.kv_quant import is_fp8
from r1deploy.layers.attention import resolve_kv_cache_dtype
from r1deploy.layers.sampler import Sampler, SamplerOutput
from r1deploy.models.loader import LoadedModel
from r1deploy.startup import phase
from r1deploy.worker.cuda_graphs import DecodeGraphRunner
from r1deploy.worker.draft_runner import DraftRunner

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup
    from r1deploy.distributed.messages import StepMessage
    from r1deploy.worker.model_input import SamplingRows


@dataclass(frozen=True)
class KVPoolSize:
    num_blocks: int
    bytes_per_block: int
    budget_bytes: int  # what the pool was allowed to take

    def capacity_tokens(self, block_size: int) -> int:
        return self.num_blocks * block_size


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_model_len: int,
                 tp: TPGroup | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config = config
        self.tp = tp  # tensor parallel: every rank runs each step in lockstep (distributed/executor.py)
        # --dp-attention: every rank runs its own sequences (its part of each step message) and holds only
        # their latent cache
        self.dp_attention = tp is not None and tp.dp_attention
        capabilities = self.model.capabilities
        if self.dp_attention and not capabilities.dp_attention:
            raise UsageError(f"--dp-attention needs a DeepSeek (MLA) model, not {type(self.model).__name__}")
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.kv_spec = self.model.kv_cache_spec
        if is_fp8(self.kv_dtype) and not self.kv_spec.fp8:
            raise UsageError(f"--kv-cache-dtype {config.kv_cache_dtype} (kv_cache_dtype) is not supported for "
                             f"{type(self.model).__name__} (only Llama/Qwen2 GQA and DeepSeek MLA caches)")
        backend = config.attention_backend or default_attention_backend(self.device)
        if backend == "triton" and self.device.type != "cuda":
            raise UsageError("--attention-backend triton needs a CUDA device (use torch on the CPU)")
        # Builds each step's attention metadata on the host, before the forward (r1deploy/attention).
        self.attn_backend = make_attention_backend(backend, self.model.attention_kind)
        self.sampler = Sampler()
        with phase("KV cache sizing and allocation"):
            self.pool = self._size_pool()
            self.kv_caches = self._allocate_kv_caches(self.pool.num_blocks)
        # A draft head of the model's own (speculative "mtp"): its cache and forward, and the main model's final
        # hidden states of the last step, which it reads (kept only then: the plain path stores nothing).
        self.draft: DraftRunner | None = None
        self.hidden: torch.Tensor | None = None
        if self.model.draft is not None:
            self.draft = DraftRunner(self.model.draft, self.attn_backend, self.pool.num_blocks, config.block_size,
                                     config.max_num_seqs, self.kv_dtype, self.device)
        self.graphs: DecodeGraphRunner | None = None
        # Only models whose forward has no host-side, data-dependent shapes can be captured. Under tensor
        # parallelism every rank captures the same buckets in the same order (the all-reduces are captured
        # too) and replays in lockstep: whether a step replays a graph is a function of the step message alone.
        # --dp-attention runs eagerly: the per-rank token counts of the MoE exchange change every step.
        if (self.device.type == "cuda" and not config.enforce_eager and capabilities.cuda_graphs
                and not self.dp_attention and self.attn_backend.supports_cuda_graphs):
            with phase("CUDA graph capture"):
                self.graphs = DecodeGraphRunner(self.model, self.kv_caches, self.attn_backend, config.max_num_seqs,
                                                max_model_len, config.block_size, self.device, config.graph_query_lens)

    def release(self) -> None:
        """Drop the KV cache and the captured graphs (and their memory pool) now, rather than whenever the
        last reference to the runner goes: a process that builds a second engine around the same model
        (a benchmark, a test) needs that memory back at once."""
        self.graphs = None
        self.kv_caches = []
        self.draft = self.hidden = None

    def _allocate_kv_caches(self, num_blocks: int) -> list[torch.Tensor]:
        """One paged cache per layer, in the layout the model class declares (GQA K/V or MLA latent)."""
        shape = self.kv_spec.shape(num_blocks, self.config.block_size)
        return [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.kv_spec.num_layers)]

    def _size_pool(self) -> KVPoolSize:
        per_block = self.config.block_size * self.kv_spec.bytes_per_token(self.kv_dtype)
        if self.model.draft is not None:  # its latent layer shares the pool's block ids
            per_block += self.config.block_size * self.model.draft.cache_spec.bytes_per_token(self.kv_dtype)
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
        batch = self._with_attn_metadata(ForwardBatch.build([[0] * num_tokens], [0], [list(range(blocks))],
                                                            self.config.block_size).to(self.device))
        if self.dp_attention:  # every rank profiles a full step of its own at once (the MoE exchange joins them)
            batch = dataclasses.replace(batch, dp_token_counts=(num_tokens,) * self.tp.size)
        hidden = self.model(batch, scratch)
        self.model.compute_logits(hidden[batch.logits_indices])
        del scratch

    def sample(self, logits: torch.Tensor, rows: SamplingRows) -> SamplerOutput:
        """One token per logits row [R, vocab]; the result stays on the device."""
        return self.sampler(logits, rows.to_batch(self.loaded.config.vocab_size, self.device,
                                                  self.loaded.eos_token_ids))

    def execute_data_parallel(self, message: StepMessage) -> torch.Tensor | None:
        """--dp-attention, on every rank: run this rank's part of the step (possibly no sequences: it still
        joins every MoE exchange), then gather every rank's sampled positions' final hidden states, in rank
        order (hidden states, not logits: hidden_size values a row instead of vocab). Rank 0 returns their
        logits [R, vocab] fp32 (None when the step samples nothing); the other ranks return None."""
        assert self.tp is not None
        counts = tuple(message.dp_sizes[:, 0].tolist())
        batch = dataclasses.replace(message.part(self.tp.rank).to_batch(self.device), dp_token_counts=counts)
        batch = self._with_attn_metadata(batch)
        hidden = self.model(batch, self.kv_caches)  # [T_rank, hidden]
        own = hidden[batch.logits_indices]  # [R_rank, hidden]
        gathered = self.tp.all_gather_rows(own, message.dp_sizes[:, 2].tolist())  # [R, hidden], rank order
        if not self.tp.is_driver or gathered.shape[0] == 0:
            return None
        return self.model.compute_logits(gathered)

    def _with_attn_metadata(self, batch: ForwardBatch) -> ForwardBatch:
        """The batch with its attention metadata, built on the host before the forward."""
        return dataclasses.replace(batch, attn_metadata=self.attn_backend.build_metadata(batch))

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch, pending: PendingTokens | None = None) -> torch.Tensor | None:
        """Logits [R, vocab] fp32 of the batch's sampled positions (None when it samples none); writes the
        step's K/V. A step whose sequences all have one captured query length (decode, or a uniform verify
        step) replays a graph from a batch in pinned host memory; any other step runs eagerly on the batch
        moved to the device. Tensor-parallel ranks call this in lockstep."""
        if self.graphs is not None and self.graphs.covers(batch.query_lens_cpu):
            logits = self.graphs.run(batch, pending)  # decode: [B, vocab]; verify: the sampled rows [R, vocab]
            if self.draft is not None:
                self.hidden = self.graphs.hidden(batch)
            if batch.query_lens_cpu[0] > 1:
                return logits if batch.num_logits else None
            rows = [i for i, n in enumerate(batch.num_sampled_cpu) if n]
            return self._select_rows(logits, rows, batch.num_seqs)
        batch = batch.to(self.device)
        if pending is not None:
            pending.fill(batch.input_ids)
        batch = self._with_attn_metadata(batch)
        hidden = self.model(batch, self.kv_caches)
        if self.draft is not None:
            self.hidden = hidden
        return self.model.compute_logits(hidden[batch.logits_indices]) if batch.num_logits else None

    def _select_rows(self, t: torch.Tensor, rows: list[int], num_seqs: int) -> torch.Tensor | None:
        """t[rows] along dim 0 (None when empty). Indexing a device tensor with a list would copy it
        from pageable memory and block; a decode step takes every row, so it needs no index at all."""
        if not rows:
            return None
        if len(rows) == num_seqs:
            return t
        return t[to_device(rows, torch.int64, t.device, t.device.type == "cuda")]
