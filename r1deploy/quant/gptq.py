"""GPTQ INT4 checkpoints (AutoGPTQ / GPTQModel, as transformers saves them), run as AWQ.

Format (per linear, `in` x `out`, G groups; config.json's quantization_config {quant_method: "gptq",
bits: 4, group_size: 128 | 64 | ... | -1 (one group), desc_act, sym, checkpoint_format}):
  qweight int32 [in / 8, out]   eight 4-bit values per int32 along the INPUT dim, nibble j = row 8r + j
  qzeros  int32 [G, out / 8]    zero points along the output dim, nibble j = column 8c + j; the
                                "gptq" (v1) format, which transformers / optimum write, stores zero - 1,
                                "gptq_v2" (GPTQModel) the zero itself
  scales  fp16  [G, out]
  g_idx   int32 [in]            the group of each input channel: i // group_size, or a permutation of it
                                under act-order (desc_act: groups were formed in activation order)
  W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]   (W is [in, out]: y = x @ W + b)

Each linear is converted while it loads into AWQ's layout (quant/awq.py: qweight [in, out / 8] packed
along the output dim in AutoAWQ's nibble order, true zero points, the same scales), so AWQ's linear
method and kernels run it. Act-order: the rows of W are sorted by group (a stable argsort of g_idx,
so each group's rows become contiguous and row j is in group j // group_size, AWQ's rule) and apply
permutes the activation's channels the same way, x[:, perm] @ W[perm] = x @ W. The q/k/v (gate/up)
shards of a merged layer share their input, so GPTQ gives them the same g_idx; a checkpoint whose
shards differ is refused. v1 zero points of 0 (stored as -1, i.e. nibble 15, which v1 kernels read as
16) have no AWQ equivalent and are refused too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from r1deploy.errors import UsageError
from r1deploy.kernels.awq_format import PACK_FACTOR
from r1deploy.layers.linear import default_weight_loader, quantized_parameter
from r1deploy.quant.awq import AWQConfig, AWQLinearMethod, pack_awq

CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # format -> what to add to a stored zero point


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int  # -1: one group spanning each layer's whole input
    desc_act: bool = False  # informational: g_idx decides the channel order
    sym: bool = True  # informational: symmetric checkpoints simply store zero points of 8
    checkpoint_format: str = "gptq"

    @staticmethod
    def from_hf(raw: dict[str, Any]) -> GPTQConfig:
        """config.json's quantization_config (transformers' GPTQConfig)."""
        bits = int(raw.get("bits", 4))
        group_size = int(raw.get("group_size", 128))
        checkpoint_format = str(raw.get("checkpoint_format", "gptq")).lower()
        if bits != 4:
            raise UsageError(f"GPTQ with {bits} bits is not supported (only 4)")
        if group_size != -1 and (group_size <= 0 or group_size % 16):
            raise UsageError(f"GPTQ group_size must be -1 or a positive multiple of 16, got {group_size}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise UsageError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported "
                             f"(only {', '.join(CHECKPOINT_FORMATS)})")
        if raw.get("lm_head"):
            raise UsageError("GPTQ checkpoints with a quantised lm_head are not supported")
        return GPTQConfig(group_size, bool(raw.get("desc_act", False)), bool(raw.get("sym", True)),
                          checkpoint_format)

    def linear_method(self, prefix: str = "") -> GPTQLinearMethod:
        return GPTQLinearMethod(self)


class GPTQLinearMethod:
    """Registers AWQ's parameters plus `g_idx`, and converts each GPTQ tensor as it is loaded; holds the
    layer's loading state, so one instance per layer (linear_method makes one).

    Tensor parallelism: each checkpoint tensor is converted whole, then the layer's shard_of narrows it like
    AWQ's (layers/linear.py); a row-parallel rank keeps its input rows of qweight and g_idx, and the groups
    those rows fill. Act-order works where each rank's rows are whole groups, and is refused elsewhere."""

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.zero_offset = CHECKPOINT_FORMATS[config.checkpoint_format]
        self.awq: AWQLinearMethod | None = None
        self.g_idx_loaded = False

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        one_group = self.config.group_size == -1
        group = in_features if one_group else self.config.group_size
        if group % 16:
            raise UsageError(f"GPTQ layer {in_features} -> {out_features}: a group of {group} input channels "
                             "is not a multiple of 16")
        self.awq = AWQLinearMethod(AWQConfig(group))
        self.awq.create_weights(layer, in_features, out_features)
        if one_group:  # the one group's zeros and scales apply to every input row: whole on every rank
            layer.qzeros.input_dim = layer.scales.input_dim = None
        # One group id per input row: no output dim, so every q/k/v (gate/up) or column shard holds it whole.
        layer.g_idx = quantized_parameter(in_features, dtype=torch.int32, output_dim=None, pack_factor=1,
                                          input_dim=0)
        layer.register_buffer("input_perm", None, persistent=False)  # set by an act-order g_idx

    def load(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        """One checkpoint tensor (of one shard, for a merged layer) in GPTQ's layout -> AWQ's, then the
        layer's part of it (Linear.shard_of) into param."""
        if param is layer.g_idx:
            part = layer.shard_of(param, loaded, shard_id)[1]
            self._load_g_idx(layer, part, split=part.shape != loaded.shape)
            return
        if param is layer.qweight:
            target, part = layer.shard_of(param, pack_awq(unpack_gptq(_int32(loaded))), shard_id)
            if layer.input_perm is not None:
                part = part[layer.input_perm.to(part.device)]
            default_weight_loader(target, part)
            return
        if param is layer.qzeros:
            zeros = unpack_gptq(_int32(loaded).t()).t() + self.zero_offset
            if int(zeros.max()) > 15:
                raise ValueError("a v1 ('gptq') zero point of 0 is stored as -1, which GPTQ's v1 packing "
                                 "corrupts; re-export the checkpoint as 'gptq_v2'")
            loaded = pack_awq(zeros)
        layer.copy_shard(param, loaded, shard_id)

    def _load_g_idx(self, layer: nn.Module, g_idx: torch.Tensor, split: bool) -> None:
        """This layer's rows of g_idx (split: a row-parallel rank's share, numbered from its first group)."""
        in_features, group = layer.g_idx.shape[0], self.awq.config.group_size
        first_group = 0 if self.config.group_size == -1 else layer.input_start // group
        g_idx = g_idx.to(torch.int32).cpu() - first_group
        if self.g_idx_loaded:  # a merged layer's next shard
            if not torch.equal(g_idx, layer.g_idx.cpu()):
                raise ValueError("the shards of a merged layer have different g_idx (act-order); unsupported")
            return
        if g_idx.shape != (in_features,):
            raise ValueError(f"g_idx of shape {tuple(g_idx.shape)}, expected ({in_features},)")
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(in_features, dtype=torch.int32) // group):
            if split:
                start = layer.input_start
                raise UsageError(f"act-order GPTQ: the input rows [{start}, {start + in_features}) this "
                                 "tensor-parallel rank holds are not whole quantisation groups (g_idx mixes "
                                 "groups across ranks); run this checkpoint with --tp 1")
            raise ValueError(f"g_idx does not give each group exactly {group} input channels")
        layer.g_idx.copy_(g_idx)
        if not torch.equal(perm, torch.arange(in_features)):  # act-order
            perm = perm.to(layer.qweight.device)
            layer.qweight.copy_(layer.qweight[perm])  # the rows loaded so far; later shards permute on load
            layer.input_perm = perm
        self.g_idx_loaded = True

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.awq.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.input_perm is not None:
            x = x.index_select(-1, layer.input_perm)
        return self.awq.apply(layer, x, bias)


def _int32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int32:
        raise ValueError(f"expected packed int32, got {t.dtype}")
    return t


def unpack_gptq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R / 8, C] -> int32 [R, C] of values 0..15; nibble j (bits 4j..4j+3) of row r is row 8r + j."""
    shifts = 4 * torch.arange(PACK_FACTOR, dtype=torch.int32, device=packed.device)
    return ((packed[:, None, :] >> shifts[:, None]) & 0xF).flatten(0, 1)
