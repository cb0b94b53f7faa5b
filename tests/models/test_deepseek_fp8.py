"""A tiny FP8 checkpoint in DeepSeek's format (float8_e4m3fn weights + weight_scale_inv, MTP layer
included) loads, matches its dequantised twin exactly and the unquantised model within FP8 error;
kept in FP8 (quantization="fp8") it matches the model dequantised at load, and dummy FP8 weights
look like the model-dtype dummy ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepseek_support import (
    FP8_TILE,
    TINY_V3,
    PagedDriver,
    load_ours,
    randomize_,
    read_checkpoint,
    write_fp8_checkpoint,
)
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.engine_config import OffloadConfig
from r1deploy.errors import UsageError
from r1deploy.models.loader import load_model
from r1deploy.quant.fp8_block import FP8_DTYPE

BLOCK = list(FP8_TILE)


def write_checkpoints(hf_dir: Path, fp8_dir: Path, twin_dir: Path, block: list[int] = BLOCK) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = dict(read_checkpoint(hf_dir))
    # An MTP layer at index num_hidden_layers, stored like the main layers; it must be skipped.
    tensors["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    tensors["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] = torch.randn(40, 64)
    twin = write_fp8_checkpoint(tensors, config, fp8_dir, tuple(block))
    save_file({k: v.contiguous() for k, v in twin.items()}, str(twin_dir / "model.safetensors"))
    (twin_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    hf = HFDeepseekV3(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=20)
    hf_dir, fp8_dir, twin_dir = (tmp_path_factory.mktemp(n) for n in ("hf", "fp8", "twin"))
    hf.save_pretrained(hf_dir)
    write_checkpoints(hf_dir, fp8_dir, twin_dir)
    return hf_dir, fp8_dir, twin_dir


def prefill_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    return PagedDriver(model).step(prompts, [0] * len(prompts), [[] for _ in prompts]).float()


PROMPTS = [list(range(3, 40, 3)), list(range(100, 107))]


def assert_mostly_close(logits: torch.Tensor, reference: torch.Tensor, tol: float) -> None:
    """Per-token relative error. A rounding-sized change can flip a token's expert choice (as it
    does between transformers' own fp32 and bf16 runs), so a few tokens may differ a lot."""
    per_token = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert per_token.median() < tol, per_token
    assert (per_token < 3 * tol).float().mean() >= 0.75, per_token


def test_fp8_checkpoint_matches_twin_and_original(dirs) -> None:
    hf_dir, fp8_dir, twin_dir = dirs
    assert any(t.dtype == FP8_DTYPE for _, t in read_checkpoint(fp8_dir))
    from_fp8 = prefill_logits(load_ours(fp8_dir), PROMPTS)
    from_twin = prefill_logits(load_ours(twin_dir), PROMPTS)
    original = prefill_logits(load_ours(hf_dir), PROMPTS)
    torch.testing.assert_close(from_fp8, from_twin, atol=1e-6, rtol=0)
    # e4m3 rounds each weight by up to 2^-4 (about 3.6% rms); through ~20 matmuls of O(1)
    # random weights that is ~8% per token, against 1e-6 for the dequantised twin above.
    assert_mostly_close(from_fp8, original, 0.15)


def test_fp8_checkpoint_in_bf16(dirs) -> None:
    """The accelerator-less production path: FP8 dequantised straight to a bf16 model."""
    _, fp8_dir, twin_dir = dirs
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # how the engine's loader builds models
    try:
        model = load_ours(fp8_dir)
    finally:
        torch.set_default_dtype(previous)
    assert model.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    reference = prefill_logits(load_ours(twin_dir), PROMPTS)
    assert_mostly_close(prefill_logits(model, PROMPTS), reference, 0.05)


def test_kept_in_fp8_matches_dequantised_at_load(dirs) -> None:
    """quantization="fp8" on the CPU: FP8 parameters (experts, attention and MLP linears) dequantised per
    call. The same fp32 products as dequantising at load, so the tolerance is fp32 noise (1e-6)."""
    _, fp8_dir, _ = dirs
    kept = load_model(str(fp8_dir), quantization="fp8").model
    layer0, layer1 = kept.model.layers[0], kept.model.layers[1]
    assert layer0.self_attn.q_a_proj.weight.dtype == FP8_DTYPE and layer0.mlp.gate_up_proj.weight.dtype == FP8_DTYPE
    assert layer1.mlp.experts.gate_up_proj.dtype == FP8_DTYPE
    assert layer1.mlp.shared_experts.down_proj.weight.dtype == FP8_DTYPE
    # Unquantised in R1's checkpoint, or read as a matrix by MLA: the model dtype.
    for param in (kept.lm_head.weight, layer0.self_attn.kv_b_proj.weight, layer1.mlp.gate.weight):
        assert param.dtype == torch.float32
    dequantised = load_model(str(fp8_dir), quantization="none").model  # the CPU default ("auto")
    assert dequantised.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32
    torch.testing.assert_close(prefill_logits(kept, PROMPTS), prefill_logits(dequantised, PROMPTS),
                               atol=1e-6, rtol=1e-6)


def test_dummy_fp8_weights_look_like_dummy_bf16(dirs) -> None:
    _, fp8_dir, _ = dirs
    model = load_model(str(fp8_dir), load_format="dummy", quantization="fp8").model
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == FP8_DTYPE and bool((experts.gate_up_proj_scale_inv == 0.02).all())
    real = experts.expert_weights(0, torch.float32)[0]
    assert abs(real.std().item() - 0.02) < 0.002 and abs(real.mean().item()) < 0.002
    assert torch.isfinite(prefill_logits(model, PROMPTS)).all()


def test_fp8_usage_errors(dirs) -> None:
    hf_dir, _, _ = dirs
    with pytest.raises(UsageError, match="needs a checkpoint with block-scaled FP8"):
        load_model(str(hf_dir), quantization="fp8")
    # FP8 experts in the offload store (tests/engine/test_engine_deepseek_offload_fp8.py) need FP8 weights too.
    with pytest.raises(UsageError, match="needs a checkpoint with block-scaled FP8"):
        load_model(str(hf_dir), quantization="fp8", offload=OffloadConfig(gpu_weight_budget_gb=1.0))


# Dimensions that are multiples of 128 (the Triton FP8 GEMM quantises activations per 128 channels),
# except kv_a_proj_with_mqa's 128 + 64 rows: a partial weight tile, as R1's 576.
GPU_V3 = {**TINY_V3, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256,
          "q_lora_rank": 256, "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 128}


@torch.no_grad()
def _cuda_prefill_logits(model, prompts: list[list[int]], block_size: int = 16) -> torch.Tensor:
    config = model.config
    caches = [torch.zeros(model.kv_cache_spec.shape(16, block_size), dtype=torch.bfloat16, device="cuda")
              for _ in range(config.num_hidden_layers)]
    tables = [[2 * i, 2 * i + 1] for i in range(len(prompts))]
    batch = ForwardBatch.build(prompts, [0] * len(prompts), tables, block_size, torch.device("cuda"))
    return model.compute_logits(model(batch, caches)).float().cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_on_the_gpu_by_default(tmp_path_factory: pytest.TempPathFactory) -> None:
    """On sm_89+ "auto" keeps R1-format FP8 (128 x 128 tiles) in FP8: Triton W8A8 linears, W8A16 experts.
    Against the same checkpoint dequantised to bf16 at load the difference is the activations' e4m3
    rounding (2^-4 relative per element) in every linear: a few % per token, mostly under 10%."""
    hf = HFDeepseekV3(DeepseekV3Config(**GPU_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=21)
    hf_dir, fp8_dir, twin_dir = (tmp_path_factory.mktemp(n) for n in ("hf", "fp8", "twin"))
    hf.save_pretrained(hf_dir)
    write_checkpoints(hf_dir, fp8_dir, twin_dir, block=[128, 128])
    kept = load_model(str(fp8_dir), dtype="bfloat16", device="cuda").model
    assert kept.model.layers[1].mlp.experts.down_proj.dtype == FP8_DTYPE
    assert kept.model.layers[0].self_attn.o_proj.weight.dtype == FP8_DTYPE
    dequantised = load_model(str(fp8_dir), dtype="bfloat16", device="cuda", quantization="none").model
    assert dequantised.model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    prompts = [list(range(3, 40, 3)), list(range(100, 107))]
    assert_mostly_close(_cuda_prefill_logits(kept, prompts), _cuda_prefill_logits(dequantised, prompts), 0.1)
