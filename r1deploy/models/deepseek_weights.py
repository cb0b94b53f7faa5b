"""DeepSeek's checkpoint mapping, kept apart from the model's maths (deepseek_v3.py).

Parameter names follow transformers, except that dense/shared gate_proj + up_proj are one `gate_up_proj` and
routed experts are stacked (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I], transformers 5's
layout). Loading maps checkpoint names, keeps FP8 weights where the model holds them in FP8 (built with
the loader's FP8 choice, quant/methods.LinearQuant), dequantises them elsewhere, repacks AWQ experts one tensor at a
time, and loads the first MTP layer (model.layers.{num_hidden_layers}.*) into the model's `draft` when build_draft()
built one (deepseek_mtp.py: its embed_tokens / shared_head.head copies are skipped), skipping the MTP layers otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from r1deploy.layers.linear import default_weight_loader
from r1deploy.quant.awq import AWQ_PARTS, dequantize_awq_modules, repack_awq_tensor
from r1deploy.quant.fp8_block import dequantize_fp8_block
from r1deploy.quant.fp8_checkpoint import SCALE_SUFFIX, fp8_pairs
from r1deploy.weights import WeightLoadError, process_weights_after_loading
from r1deploy.weights.checkpoint_names import expert_tensor, layer_index
from r1deploy.weights.tiered_store import TieredExpertStore

if TYPE_CHECKING:
    from r1deploy.models.base import CausalLM

# A per-expert tensor's kind -> the suffix of the stack it fills: experts.{gate_up,down}_proj<suffix>.
_EXPERT_STACK_SUFFIX = {"weight": "", "weight_scale_inv": SCALE_SUFFIX,
                        "qweight": "_packed", "qzeros": "_zeros", "scales": "_scales"}
_MERGED = re.compile(r"\.(gate|up)_proj\.")  # dense and shared MLPs
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The MTP layer's copies of the main model's embedding and head (deepseek_mtp.py uses the main model's)
MTP_SHARED = ("embed_tokens.", "shared_head.head.")
_OTHER_RANK = "<an expert another rank holds>"  # _load_one's answer for a known tensor this rank skips


@torch.no_grad()
def load_deepseek_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Fill every parameter from HF-named tensors. An FP8 weight and its scales go to an FP8 parameter and its
    `<param>_scale_inv` sibling as they are, or are dequantised to the model dtype where the model holds that
    weight unquantised; AWQ tensors likewise (_awq_tensors), and the AWQ linears repack theirs once all are in.
    Raises WeightLoadError on unknown tensors or unfilled parameters."""
    config = model.config
    mtp_prefix = f"model.layers.{config.num_hidden_layers}."  # the draft's tensors in the checkpoint
    # Keyed by checkpoint name: the draft's parameters (draft.X) are model.layers.{n}.X there
    params = {mtp_prefix + n[len("draft."):] if n.startswith("draft.") else n: p
              for n, p in model.named_parameters()}
    filled = dict.fromkeys(params, 0)  # elements written, so merged/stacked params count every shard
    block = config.fp8_block_size or (128, 128)
    dtype = model.model.embed_tokens.weight.dtype
    unexpected: list[str] = []
    stream = _main_layers(weights, config.num_hidden_layers, config.tie_word_embeddings, model.draft is not None)
    if config.awq is not None:
        stream = _awq_tensors(stream, params, dtype, config.awq.group_size)
    try:
        for name, tensor, scale_inv in fp8_pairs(stream):
            keep_fp8 = scale_inv is not None and param_name(name) + SCALE_SUFFIX in params
            if scale_inv is not None and not keep_fp8:
                tensor = dequantize_fp8_block(tensor, scale_inv, dtype, block)
            for part, value in [(name, tensor)] + ([(name + SCALE_SUFFIX, scale_inv)] if keep_fp8 else []):
                target = _load_one(model, params, part, value, mtp_prefix)
                if target is None:
                    unexpected.append(part)
                elif target is not _OTHER_RANK:
                    filled[target] += value.numel()
    except ValueError as e:
        raise WeightLoadError(f"checkpoint: {e}") from None
    if unexpected:
        raise WeightLoadError(f"checkpoint has tensors the model does not use: {', '.join(sorted(unexpected))}")
    missing = sorted(n for n, count in filled.items() if count < params[n].numel())
    if any(n.startswith(mtp_prefix) for n in missing):
        raise WeightLoadError(f"speculative method 'mtp': the checkpoint has no complete MTP layer ({mtp_prefix}*: "
                              f"{sum(n.startswith(mtp_prefix) for n in missing)} tensors missing); "
                              "use a checkpoint that ships it (DeepSeek-V3 / R1) or another method")
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise WeightLoadError(f"checkpoint is missing {len(missing)} parameters: {shown}")
    process_weights_after_loading(model)  # the AWQ linears' repack
    if isinstance(model.offload_store, TieredExpertStore):  # every routed expert in the host tier or on disk
        model.offload_store.finish_loading(
            (i, e) for i in range(config.num_hidden_layers) if config.is_moe_layer(i)
            for e in range(config.n_routed_experts))


def _main_layers(weights: Iterable[tuple[str, torch.Tensor]], num_layers: int, tied: bool, with_mtp: bool
                 ) -> Iterable[tuple[str, torch.Tensor]]:
    """Drop the MTP layers (model.layers.{num_hidden_layers}...) unless the model built its draft (then the
    first one stays, less its copies of the main model's embedding and head), and derived tables the model
    recomputes."""
    mtp_prefix = f"model.layers.{num_layers}."
    for name, tensor in weights:
        layer = layer_index(name)
        if layer is not None and layer >= num_layers and (
                not with_mtp or layer > num_layers or name[len(mtp_prefix):].startswith(MTP_SHARED)):
            continue
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        yield name, tensor


def _awq_tensors(weights: Iterable[tuple[str, torch.Tensor]], params: dict[str, nn.Parameter],
                 dtype: torch.dtype, group_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """AWQ checkpoint tensors -> what the model holds: a quantised layer the model keeps unquantised (kv_b_proj)
    gets one dequantised `.weight`; each routed expert's qweight / qzeros / scales is repacked into the kernel
    layout on its own (quant/awq.repack_awq_tensor), so it can be copied into the stacks as it arrives.
    Everything else passes through."""

    def held_plain(module: str) -> bool:
        return param_name(f"{module}.qweight") not in params and param_name(f"{module}.weight") in params

    for name, tensor in dequantize_awq_modules(weights, held_plain, group_size, dtype):
        expert = expert_tensor(name)
        kind = expert.kind if expert else None
        yield name, repack_awq_tensor(kind, tensor, group_size) if kind in AWQ_PARTS else tensor


def param_name(name: str) -> str:
    """The parameter a checkpoint tensor fills: per-expert tensors go to the stacks (_EXPERT_STACK_SUFFIX),
    gate/up to the merged gate_up_proj. A weight's `_scale_inv` maps to its parameter's `_scale_inv` sibling."""
    expert = expert_tensor(name)
    if expert:
        stack = "down_proj" if expert.projection == "down" else "gate_up_proj"
        return f"{expert.module}.{stack}{_EXPERT_STACK_SUFFIX[expert.kind]}"
    merged = _MERGED.search(name)
    return name.replace(merged.group(0), ".gate_up_proj.") if merged else name


def _load_one(model: nn.Module, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
              mtp_prefix: str) -> str | None:
    """Copy one checkpoint tensor into place; returns the parameter it filled (its checkpoint name), None if
    unknown. The MTP layer's (mtp_prefix) modules are the model's `draft`."""
    target = param_name(name)
    if target not in params:
        return None
    try:
        expert = expert_tensor(name)
        if expert:
            module = expert.module
            experts = model.get_submodule("draft." + module[len(mtp_prefix):] if module.startswith(mtp_prefix)
                                          else module)
            if not experts.owns(expert.expert):
                return _OTHER_RANK if expert.expert < experts.num_experts else None
            experts.load_expert(expert.expert, expert.projection, tensor, _EXPERT_STACK_SUFFIX[expert.kind])
            return target
        merged = _MERGED.search(name)
        param = params[target]
        if merged:
            param.weight_loader(param, tensor, merged.group(1))
        else:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return target
    except ValueError as e:
        raise ValueError(f"tensor {name}: {e}") from None
