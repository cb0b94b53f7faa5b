"""DeepSeekMoE as Router + ExpertsMethod (one per weight format) + dispatcher (one per parallel mode):
router.py, experts.py (the stacks and the torch path), experts_dense.py (bf16 / FP8 block), experts_awq.py,
experts_offload.py (the tiered store), dispatch.py, block.py (DeepseekMoE), mlp.py (dense / shared SwiGLU)."""

from r1deploy.layers.moe.block import DeepseekMoE, experts_method
from r1deploy.layers.moe.experts import DeepseekExperts, ExpertsMethod
from r1deploy.layers.moe.mlp import DeepseekMLP
from r1deploy.layers.moe.router import Router, RouterSpec, select_experts

__all__ = ["DeepseekExperts", "DeepseekMLP", "DeepseekMoE", "ExpertsMethod", "Router", "RouterSpec",
           "experts_method", "select_experts"]
