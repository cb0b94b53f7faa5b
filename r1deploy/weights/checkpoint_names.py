"""HF checkpoint names shared by the model's weight mapping (models/deepseek_weights.py) and the expert store's
index of the safetensors files (weights/expert_source.py): one regex each, parsed in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(model\.layers\.(\d+)\..*\.experts)\.(\d+)\.(gate|up|down)_proj\."
                     r"(weight|weight_scale_inv|qweight|qzeros|scales)$")
# transformers 5's fused stacks: experts.gate_up_proj [E, 2I, H] (gate rows first), experts.down_proj [E, H, I].
STACKED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\..*\.experts\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertTensor:
    """One routed expert's checkpoint tensor, e.g. model.layers.3.mlp.experts.7.up_proj.weight_scale_inv."""

    module: str  # model.layers.3.mlp.experts
    layer: int
    expert: int
    projection: str  # "gate" | "up" | "down"
    kind: str  # "weight" | "weight_scale_inv" (FP8) | "qweight" | "qzeros" | "scales" (AWQ)


def expert_tensor(name: str) -> ExpertTensor | None:
    m = _EXPERT.match(name)
    if m is None:
        return None
    module, layer, expert, projection, kind = m.groups()
    return ExpertTensor(module, int(layer), int(expert), projection, kind)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (model.layers.{i}.), None outside the layers."""
    m = LAYER.match(name)
    return None if m is None else int(m.group(1))
