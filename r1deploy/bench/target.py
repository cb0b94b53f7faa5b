"""What is measured: an HTTP server (--url) or the in-process engine (a preset, alias or path), on one
device or split over --tp N ranks.

Before loading anything in-process, check the model can run here: the engine's architectures, the
weights against this machine's GPU or host memory (1/N of them per GPU under --tp N), the GPUs visible
against N, the context against the model's. When it
cannot, raise one UsageError that says why and what would work (from the planner), e.g.
"deepseek-r1 ... needs 8x H200 (TP8, FP8)", instead of failing deep inside a loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1deploy.bench import planlink
from r1deploy.errors import UsageError

GiB = 1 << 30
# Weights may use this share of the memory that is free: the KV cache and activations need the rest.
_WEIGHTS_SHARE = 0.9
_ENGINE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelFacts:
    name: str  # what the user typed, or the preset's canonical name
    config: dict[str, Any]
    plan: dict[str, Any] | None
    preset: bool  # a preset ships a config.json and no weights


def engine_architectures() -> tuple[str, ...]:
    try:
        from r1deploy.models.registry import MODEL_CLASSES
    except ImportError:
        return _ENGINE_ARCHITECTURES
    return tuple(MODEL_CLASSES)


def model_facts(model: str, **workload: Any) -> ModelFacts | None:
    """Config and plan (at the run's workload) of a preset, alias, config.json or model directory;
    None for other files (GGUF: the loader reads its own metadata)."""
    from r1deploy.presets import canonical_name, resolve_config_path

    path = Path(model).expanduser()
    if path.is_file() and path.suffix != ".json":
        return None
    config_path = resolve_config_path(model)
    name = model if path.exists() else canonical_name(model)
    return ModelFacts(name, planlink.read_config(config_path), planlink.plan(model, **workload), not path.exists())


def available_memory(device: str | None) -> tuple[int, str, int]:
    """Bytes the engine could use per rank, where, and the GPUs visible: one GPU's total memory, or the
    host's available RAM (0 GPUs)."""
    import psutil
    import torch

    if device != "cpu" and torch.cuda.is_available():
        _, total = torch.cuda.mem_get_info()
        return int(total), f"GPU 0 ({torch.cuda.get_device_name(0)}, {total / GiB:.0f} GiB)", torch.cuda.device_count()
    return int(psutil.virtual_memory().available), "this machine (no GPU; host RAM available)", 0


def check_runs_here(facts: ModelFacts, device: str | None, context_len: int, offload: Any = None,
                    tp: int = 1) -> None:
    """offload: --offload experts|layers; the offloaded weights live in host memory, the GPU holds a budget.
    tp: --tp N, one rank per GPU, each holding about 1/N of the weights (CPU ranks share the host's RAM)."""
    config, name = facts.config, facts.name
    hint = planlink.deployment_hint(facts.plan)
    where_it_runs = (f"it needs {hint} (from `r1deploy plan`)" if hint
                     else f"see `r1deploy plan --model {name}` for the hardware it needs")
    advice = (f"{where_it_runs}; serve it there (r1deploy serve, vLLM or SGLang) and benchmark it with "
              "--url http://HOST:PORT, or benchmark a distilled model here, e.g. "
              "--model r1-distill-qwen-1.5b --load-format dummy")
    architecture = (config.get("architectures") or ["?"])[0]
    total = planlink.get(facts.plan, "model.total_params")
    size = f", {total / 1e9:.0f}B parameters" if isinstance(total, (int, float)) else ""
    supported = engine_architectures()
    if architecture not in supported:
        raise UsageError(f"{name} ({architecture}{size}) cannot run in-process here: the in-process engine "
                         f"runs {' and '.join(a.removesuffix('ForCausalLM') for a in supported)} models only; "
                         f"{advice}")
    weights = planlink.get(facts.plan, "memory.weights_bytes") or planlink.dense_weights_bytes(config)
    memory, where, gpus = available_memory(device)
    if gpus and gpus < tp:
        raise UsageError(f"--tp {tp} needs {tp} GPUs, {gpus} visible here (CUDA_VISIBLE_DEVICES?); "
                         f"lower --tp to {gpus} or run on a machine with {tp} GPUs")
    if gpus and weights:
        # Heads and routed experts split over the ranks; the small replicated parts (norms, and with
        # --dp-attention attention and the shared experts) come out of the weights share's slack.
        weights //= tp
        where = f"one of {tp} GPUs, {where}" if tp > 1 else where
    if offload is not None:
        if getattr(offload, "target", "experts") == "experts" and not config.get("n_routed_experts"):
            raise UsageError(f"--offload experts needs a MoE model; {name} has no routed experts")
        weights = None  # the store sizes itself from --gpu-weight-budget / --host-weight-budget
    if weights and weights > _WEIGHTS_SHARE * memory:
        per = " per GPU" if gpus and tp > 1 else ""
        raise UsageError(f"{name} needs {weights / GiB:.1f} GiB{per} for its weights, more than {where} can hold "
                         f"({memory / GiB:.1f} GiB); {advice}")
    max_len = config.get("max_position_embeddings")
    if isinstance(max_len, int) and context_len > max_len:
        raise UsageError(f"prompt + output = {context_len} tokens, beyond {name}'s context of {max_len}: "
                         "lower --seq/--input-len or --output-len")


def load_engine(model: str | None, device: str | None, dtype: str | None, load_format: str,
                max_num_seqs: int, context_len: int, workload: dict[str, Any], offload: Any = None,
                tp: int = 1, dp_attention: bool = False, speculative: Any = None) -> Any:
    """An LLMEngine sized for the run; loader failures become one clear line. offload: an OffloadConfig
    (--offload experts|layers); tp, dp_attention: `serve --tp N [--dp-attention]`'s split, one process per rank;
    speculative: a SpeculativeConfig (--speculative-config)."""
    try:
        from r1deploy.distributed.worker import precheck
        from r1deploy.engine.engine import LLMEngine
        from r1deploy.engine_config import EngineConfig, ParallelConfig
    except ImportError as exc:
        raise UsageError(f"the in-process engine is not available in this install ({exc}); "
                         "benchmark a server with --url instead") from None
    if model is not None:
        facts = model_facts(model, **workload)
        if facts is not None:
            check_runs_here(facts, device, context_len, offload, tp)
            if facts.preset and load_format != "dummy":
                raise UsageError(f"{facts.name} is a preset: it ships a config.json but no weights; pass "
                                 "--load-format dummy for random weights at its real shape, or a model directory")
    precheck(model, tp, dp_attention)  # a --tp that cannot split the model fails before any rank starts
    try:
        config = EngineConfig(max_num_seqs=max(max_num_seqs, 1), offload=offload, speculative=speculative,
                              parallel=ParallelConfig(tensor_parallel_size=tp, dp_attention=dp_attention))
    except ValueError as exc:  # e.g. --offload with --tp > 1
        raise UsageError(str(exc)) from None
    try:
        if offload is not None and offload.target == "experts" and load_format == "dummy":
            return LLMEngine(model, config=config, device=device,
                             loaded=load_offloaded_dummy(model, device, dtype, offload))
        return LLMEngine(model, config=config, device=device, dtype=dtype, load_format=load_format)
    except UsageError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot load {model or 'the embedded model'}: {exc}"
                         + ("" if load_format == "dummy" else " (random weights: --load-format dummy)")) from None


def load_offloaded_dummy(model: str | None, device: str | None, dtype: str | None, offload: Any) -> Any:
    """load_format="dummy" with --offload experts: the loader leaves the store's host tier empty (no checkpoint
    to fill it from), so every routed expert gets random values there before the engine's first step."""
    import torch

    from r1deploy.models.loader import load_model

    if model is None:
        raise UsageError("--offload experts needs a MoE model directory")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(model, dtype=dtype, device=device, load_format="dummy", offload=offload)
    store = loaded.model.offload_store
    if store is not None:
        config = loaded.config
        store.init_dummy_weights((i, e) for i in range(config.num_hidden_layers) if config.is_moe_layer(i)
                                 for e in range(config.n_routed_experts))
    return loaded
