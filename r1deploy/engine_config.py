"""EngineConfig: the engine's knobs, fixed at construction (values derived at run time are returned, not stored)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from r1deploy.attention.base import DECODE_MAX_QUERY_LEN
from r1deploy.attention.selector import ATTENTION_BACKENDS
from r1deploy.layers.attention import KV_CACHE_DTYPES

OFFLOAD_TARGETS = ("experts", "layers")


@dataclass(frozen=True)
class OffloadConfig:
    """Weights beyond a GPU budget kept in host memory (and on disk beyond a host budget), by `target`:
    "experts": MoE routed experts in a GPU / host / disk store (r1deploy.weights.tiered_store);
    "layers": whole decoder layers, the leading ones that fit resident, the rest streamed through a ring of
    GPU slots (r1deploy.weights.layer_stream)."""

    gpu_weight_budget_gb: float  # experts: GPU memory for expert slots; layers: every weight the GPU holds
    host_weight_budget_gb: float | None = None  # pinned host memory for what is offloaded; None: all of it
    policy: str = "lru"  # experts: GPU slot eviction, "lru" or "lfu"
    cpu_compute: str = "never"  # experts: compute a missed expert on the host: "never", "always" or "auto"
    target: str = "experts"  # "experts" or "layers"
    num_slots: int = 2  # layers: GPU slots of the ring (>= 2); copies run num_slots - 1 layers ahead

    def __post_init__(self) -> None:
        if self.target not in OFFLOAD_TARGETS:
            raise ValueError(f"target must be one of {', '.join(OFFLOAD_TARGETS)}, got {self.target!r}")
        if self.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2, got {self.num_slots}")
        if self.gpu_weight_budget_gb <= 0:
            raise ValueError(f"gpu_weight_budget_gb must be > 0, got {self.gpu_weight_budget_gb}")
        if self.host_weight_budget_gb is not None and self.host_weight_budget_gb < 0:
            raise ValueError(f"host_weight_budget_gb must be >= 0, got {self.host_weight_budget_gb}")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over processes (one node). tensor_parallel_size = 1 runs in-process."""

    tensor_parallel_size: int = 1
    # Rendezvous of the ranks: they bind here. The rank network is trusted: keep it private (loopback by default).
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, chosen at start-up
    timeout_s: float = 300.0  # a model collective that takes longer (a hung or dead rank) fails the engine
    init_timeout_s: float = 300.0  # every rank must join the rendezvous within this
    # DeepSeek (MLA) only: attention runs data-parallel (each rank its own requests, whole heads, its own latent
    # cache: tp x the KV capacity), routed experts stay expert-parallel over the ranks (docs/distributed.md)
    dp_attention: bool = False
    # With dp_attention: each MoE layer sends every token only to the ranks holding its routed experts and back
    # (two all-to-alls) instead of all-gathering all tokens to every rank and reduce-scattering the sums.
    moe_all_to_all: bool = False
    # On CUDA, all-reduces up to 1 MiB (decode) over torch's symmetric memory (one-shot, P2P) instead of NCCL
    # where the ranks can (r1deploy.distributed.custom_all_reduce); False: NCCL only (vLLM's
    # --disable-custom-all-reduce).
    custom_all_reduce: bool = True

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.dp_attention and self.tensor_parallel_size < 2:
            raise ValueError("--dp-attention needs --tp > 1 (attention runs data-parallel over the tensor-parallel "
                             "ranks)")
        if self.moe_all_to_all and not self.dp_attention:
            raise ValueError("--moe-a2a needs --dp-attention (it exchanges the tokens that data-parallel attention "
                             "keeps on their own rank)")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port must be in [0, 65536), got {self.master_port}")
        if self.timeout_s <= 0 or self.init_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got {self.timeout_s}, {self.init_timeout_s}")


SPECULATIVE_METHODS = ("ngram", "mtp", "oracle")
MTP_MAX_TOKENS = 3  # DeepSeek trained one MTP layer; chaining it further drafts ever worse tokens


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config: k draft tokens per step, verified by one forward of 1 + k tokens."""

    # "ngram": prompt lookup (the drafts continue the latest earlier match of the context's tail); "mtp": the
    # model's own multi-token-prediction layer (DeepSeek-V3 / R1: spec/mtp.py), k = 1..3
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: the shortest tail n-gram to match
    prompt_lookup_max: int = 4  # ngram: the longest, tried first
    # "oracle" (tests and benchmarks only, NOT for production: it needs the target's own greedy output in advance):
    # r1deploy/spec/oracle.py. acceptance: the probability that draft position i is left right (one value or k);
    # references: prompt token ids -> the target's greedy output ids (JSON: a list of [prompt, output] pairs);
    # inner: a method whose proposer runs for its cost, its drafts discarded ("ngram"; "mtp" times the MTP head).
    acceptance: tuple[float, ...] = ()
    references: Mapping[tuple[int, ...], tuple[int, ...]] | None = None
    seed: int = 0
    inner: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                             f"got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.method == "mtp" and self.num_speculative_tokens > MTP_MAX_TOKENS:
            raise ValueError(f"num_speculative_tokens: the mtp method drafts 1..{MTP_MAX_TOKENS} tokens (one MTP layer, "
                             f"chained), got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.method == "oracle":
            self._normalise_oracle_options()
        elif self.acceptance or self.references is not None or self.inner is not None or self.seed:
            raise ValueError("speculative config: acceptance, references, seed and inner are options of method "
                             "'oracle'")

    def _normalise_oracle_options(self) -> None:
        """acceptance to k floats in [0, 1], references to a dict of tuples (frozen: set once, here)."""
        k = self.num_speculative_tokens
        acceptance = self.acceptance
        acceptance = (acceptance,) if isinstance(acceptance, (int, float)) else tuple(acceptance)
        if len(acceptance) == 1:
            acceptance *= k
        if len(acceptance) != k or not all(0.0 <= a <= 1.0 for a in acceptance):
            raise ValueError(f"oracle: acceptance must be one value or {k} values in [0, 1], got {self.acceptance!r}")
        references = self.references
        if references is None:
            raise ValueError("oracle: references (prompt token ids -> the target's greedy output ids) are required")
        pairs = references.items() if isinstance(references, Mapping) else references
        try:
            references = {tuple(map(int, prompt)): tuple(map(int, output)) for prompt, output in pairs}
        except (TypeError, ValueError):
            raise ValueError("oracle: references must map prompt token ids to output token ids "
                             "(JSON: [[prompt ids, output ids], ...])") from None
        if self.inner is not None and self.inner not in set(SPECULATIVE_METHODS) - {"oracle"}:
            raise ValueError(f"oracle: inner must be one of {sorted(set(SPECULATIVE_METHODS) - {'oracle'})}, "
                             f"got {self.inner!r}")
        object.__setattr__(self, "acceptance", tuple(float(a) for a in acceptance))
        object.__setattr__(self, "references", references)

    @staticmethod
    def of(options: dict | str) -> SpeculativeConfig:
        """From vLLM's speculative_config dict, or its JSON text (--speculative-config)."""
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative config is not JSON: {exc}") from None
        if not isinstance(options, dict):
            raise ValueError("speculative config must be a JSON object")
        known = {f.name for f in fields(SpeculativeConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"speculative config: unknown keys {unknown} (known: {sorted(known)})")
        if "method" not in options or "num_speculative_tokens" not in options:
            raise ValueError("speculative config needs 'method' and 'num_speculative_tokens'")
        return SpeculativeConfig(**options)


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
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "fp8" (float8_e4m3fn with per-layer scales)
    # Schedule and launch step N+1 while the GPU runs step N (vLLM's async scheduling). Steps with
    # penalties fall back to synchronous; --dp-attention and speculative decoding run synchronously.
    async_scheduling: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    offload: OffloadConfig | None = None  # --offload experts
    speculative: SpeculativeConfig | None = None
    # Sampling defaults for what a request leaves unset: engine/generation_defaults.py (vLLM's --generation-config
    # auto|vllm|<folder> and --override-generation-config)
    generation_config: str = "auto"
    override_generation_config: Mapping[str, Any] | None = None
    # Attention kernels (r1deploy/attention): "triton" (CUDA) or "torch" (plain PyTorch, the reference; runs
    # without CUDA graphs); None: triton on CUDA, torch on the CPU.
    attention_backend: str | None = None
    # CUDA graphs are captured for steps whose sequences all have one of these numbers of new tokens:
    # 1 = decode; 1+k = a speculative verify step of k draft tokens (each extra length costs graph memory).
    # None: 1, and 1+k when speculating (vLLM and SGLang capture their verify steps too).
    graph_query_lens: tuple[int, ...] | None = None

    @property
    def uses_draft_model(self) -> bool:
        """Speculation by the model's own draft head (DeepSeek's MTP layer), which the loader then builds."""
        spec = self.speculative
        return spec is not None and "mtp" in (spec.method, spec.inner)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be >= 1")
        if self.speculative is not None and self.parallel.dp_attention:
            raise ValueError("speculative decoding does not run with --dp-attention yet")
        if self.uses_draft_model and (self.parallel.tensor_parallel_size > 1 or self.offload is not None):
            raise ValueError("speculative method 'mtp' runs in one process without --offload so far "
                             "(use --tp 1, or method 'ngram')")
        if self.uses_draft_model and self.speculative.num_speculative_tokens - 1 > self.block_size:
            # a draft chain's positions past a sequence's blocks must fit its one scratch block (spec/mtp.py)
            raise ValueError(f"speculative method 'mtp' with {self.speculative.num_speculative_tokens} tokens needs "
                             f"block_size >= {self.speculative.num_speculative_tokens - 1}")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.graph_query_lens is None:
            verify = () if self.speculative is None else (1 + self.speculative.num_speculative_tokens,)
            object.__setattr__(self, "graph_query_lens", (1, *(n for n in verify if n <= DECODE_MAX_QUERY_LEN)))
        if not self.graph_query_lens or not all(1 <= n <= DECODE_MAX_QUERY_LEN for n in self.graph_query_lens):
            raise ValueError(f"graph_query_lens must hold lengths in [1, {DECODE_MAX_QUERY_LEN}], "
                             f"got {self.graph_query_lens!r}")
        if self.offload is not None and self.parallel.tensor_parallel_size > 1:
            raise ValueError("offload: expert offload runs on one GPU; it does not combine with tensor parallelism")
