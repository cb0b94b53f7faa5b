"""Checkpoint readers (safetensors, GGUF, dummy) and `load_weights`, which fills a model's
parameters from (HF name, tensor) pairs through each parameter's `weight_loader`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from r1deploy.errors import UsageError
from r1deploy.layers.linear import default_weight_loader


class WeightLoadError(UsageError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or tensor."""


# Derived tables that some checkpoints store but the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy every checkpoint tensor into its parameter; raise naming unused or missing tensors."""
    mapping: dict[str, tuple[str, str]] = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    aliases = set(dict(model.named_parameters(remove_duplicate=False))) - set(params)  # tied lm_head
    expected = set(_checkpoint_names(params, mapping))
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if name in aliases or name.endswith(_IGNORED_SUFFIXES):
            continue
        target, shard_id = _target(name, mapping)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise WeightLoadError(f"checkpoint tensor {name}: {e}") from None
        loaded.add(name)
    if unexpected:
        raise WeightLoadError(f"checkpoint has tensors the model does not use: {', '.join(sorted(unexpected))}")
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise WeightLoadError(f"checkpoint is missing {len(missing)} parameters: {shown}")
    process_weights_after_loading(model)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each quantised layer turn its checkpoint tensors into its kernels' layout (AWQ / GPTQ repack),
    now that every shard of a merged layer is in."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


def _target(name: str, mapping: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    """HF tensor name -> (model parameter name, shard id or None)."""
    for hf_module, (merged, shard_id) in mapping.items():
        if f".{hf_module}." in name:
            return name.replace(f".{hf_module}.", f".{merged}."), shard_id
    return name, None


def _checkpoint_names(params: dict[str, nn.Parameter], mapping: dict[str, tuple[str, str]]) -> Iterator[str]:
    """The HF tensor names that together fill `params`."""
    for name in params:
        shards = [hf for hf, (merged, _) in mapping.items() if f".{merged}." in name]
        if not shards:
            yield name
        for hf_module in shards:
            yield name.replace(f".{mapping[hf_module][0]}.", f".{hf_module}.")
