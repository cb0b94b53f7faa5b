"""EngineConfig: the engine's knobs, fixed at construction (values derived at run time are returned, not stored)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # the most requests in one step (the seed guide's "max batch size")
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # Seed guide's dynamic batching: with nothing running, wait up to this long after the oldest
    # arrival to gather more requests into one prefill. 0 = schedule at once.
    batch_wait_timeout_s: float = 0.0
    gpu_memory_utilization: float = 0.9  # fraction of the GPU the engine may use (weights + KV + activations)
    cpu_kv_cache_bytes: int = 1 << 30  # KV pool budget on the CPU
    num_gpu_blocks_override: int | None = None  # force the pool size (tests use it to force preemption)
    enforce_eager: bool = False  # CUDA: skip decode CUDA graphs (slower; for debugging)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be >= 1")
