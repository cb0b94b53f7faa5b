"""A tiny FP8 checkpoint in DeepSeek's format (float8_e4m3fn weights + weight_scale_inv, MTP layer
included) loads, matches its dequantised twin exactly and the unquantised model within FP8 error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepseek_support import TINY_V3, PagedDriver, load_ours, randomize_, read_checkpoint
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block

# Small tiles so the tiny shapes span several, with partial edge tiles (kv_a_proj_with_mqa has
# 32 + 8 = 40 rows: 3 row tiles, the last 8 tall), the 576-row situation in miniature.
BLOCK = [16, 16]
_NOT_FP8 = ("norm", "embed_tokens", "lm_head", "mlp.gate.weight")  # as in R1's checkpoint


def is_fp8(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and not any(s in name for s in _NOT_FP8)


def write_checkpoints(hf_dir: Path, fp8_dir: Path, twin_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = dict(read_checkpoint(hf_dir))
    # An MTP layer at index num_hidden_layers, stored like the main layers; it must be skipped.
    tensors["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    tensors["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] = torch.randn(40, 64)
    fp8: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_fp8(name, tensor):
            q, scale_inv = quantize_fp8_block(tensor, tuple(BLOCK))
            fp8[name], fp8[name + "_scale_inv"] = q, scale_inv
            twin[name] = dequantize_fp8_block(q, scale_inv, torch.float32, tuple(BLOCK))
        else:
            fp8[name] = twin[name] = tensor
    for directory, state, extra in ((fp8_dir, fp8, {"quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK}}),
            (twin_dir, twin, {})):
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({**config, **extra}))


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
