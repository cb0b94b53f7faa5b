"""AWQ INT4 DeepSeek-V3 (AutoAWQ GEMM format): a tiny checkpoint with its attention projections, dense MLP,
shared and routed experts quantised (kv_b_proj too, which the model dequantises at load) loads through
load_model and matches its dequantised twin, in our model, our engine and transformers; and the refusals
(--dp-attention, --offload experts, methods other than fp8 / awq)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from awq_helpers import autoawq_quantize, awq_checkpoint_tensors, reference_dequant
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine_config import EngineConfig, OffloadConfig
from r1deploy.errors import UsageError
from r1deploy.models.deepseek_v3 import DeepseekV3ForCausalLM
from r1deploy.models.loader import load_model
from r1deploy.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from deepseek_support import (
    TINY_V3,
    TOL,
    PagedDriver,
    randomize_,
    read_checkpoint,
    reference_logits,
    run_steps,
)

GROUP = 16  # divides every input width of TINY_V3 (hidden 64, q/kv lora 32, experts 32)
NOT_CONVERTED = ["kv_a_proj_with_mqa"]  # modules_to_not_convert: stays a plain weight in model and checkpoint
# AutoAWQ quantises the decoder's nn.Linear layers only: never the embedding, norms, router or lm_head.
_PLAIN = ("norm", "embed_tokens", "lm_head", "mlp.gate.", *NOT_CONVERTED)
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": NOT_CONVERTED}


def write_awq_checkpoint(hf_dir: Path, awq_dir: Path, twin_dir: Path) -> None:
    """hf_dir's checkpoint as AutoAWQ writes it (`<linear>.qweight / .qzeros / .scales`, routed experts per
    expert) into awq_dir, and its dequantised twin (fp32, exact) into twin_dir."""
    config = json.loads((hf_dir / "config.json").read_text())
    awq, twin = {}, {}
    for name, tensor in read_checkpoint(hf_dir):
        if name.endswith(".weight") and tensor.dim() == 2 and not any(p in name for p in _PLAIN):
            base = name.removesuffix(".weight")
            awq.update({f"{base}.{part}": t for part, t in awq_checkpoint_tensors(tensor, GROUP).items()})
            twin[name] = reference_dequant(*autoawq_quantize(tensor, GROUP), GROUP).float().t().contiguous()
        else:
            awq[name] = twin[name] = tensor
    save_file(awq, str(awq_dir / "model.safetensors"), metadata={"format": "pt"})
    (awq_dir / "config.json").write_text(json.dumps({**config, "quantization_config": AWQ_CONFIG}))
    save_file(twin, str(twin_dir / "model.safetensors"), metadata={"format": "pt"})
    (twin_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    hf = HFDeepseekV3(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=30)
    hf_dir, awq_dir, twin_dir = (tmp_path_factory.mktemp(n) for n in ("hf", "awq", "twin"))
    hf.save_pretrained(hf_dir)
    write_awq_checkpoint(hf_dir, awq_dir, twin_dir)
    return awq_dir, twin_dir


def test_awq_checkpoint_matches_dequantised_twin(dirs: tuple[Path, Path]) -> None:
    """Batched prefill then decode steps (expanded and absorbed MLA, the sorted expert loop)."""
    awq_dir, twin_dir = dirs
    ours = load_model(str(awq_dir)).model
    for got, expected in zip(run_steps(ours), run_steps(load_model(str(twin_dir)).model), strict=True):
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    hf_twin = HFDeepseekV3.from_pretrained(twin_dir, attn_implementation="eager", dtype=torch.float32).eval()
    prompts = [list(range(3, 40, 3)), list(range(100, 107))]
    logits = PagedDriver(ours).step(prompts, [0] * len(prompts), [[] for _ in prompts])
    expected = torch.cat([reference_logits(hf_twin, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=TOL, rtol=0)


def test_awq_layers_are_held_quantised(dirs: tuple[Path, Path]) -> None:
    awq_dir, twin_dir = dirs
    model = load_model(str(awq_dir)).model
    twin = dict(read_checkpoint(twin_dir))
    attn, dense, moe = model.model.layers[0].self_attn, model.model.layers[0].mlp, model.model.layers[1].mlp
    for layer in (attn.q_a_proj, attn.q_b_proj, attn.o_proj, dense.gate_up_proj, dense.down_proj,
                  moe.shared_experts.gate_up_proj):
        assert layer.weight is None and layer.weight_packed.dtype == torch.int32
    assert attn.kv_a_proj_with_mqa.quant_method is None  # modules_to_not_convert
    # kv_b_proj: the absorbed decode reads its matrix, so it holds the exact dequantised weight.
    assert torch.equal(attn.kv_b_proj.weight, twin["model.layers.0.self_attn.kv_b_proj.weight"])
    experts, (e, h, i) = moe.experts, (TINY_V3["n_routed_experts"], TINY_V3["hidden_size"],
                                       TINY_V3["moe_intermediate_size"])
    assert experts.gate_up_proj_packed.shape == (e, 2 * i, h // 8) and experts.gate_up_proj_packed.dtype == torch.int32
    assert experts.down_proj_zeros.shape == (e, h, i // GROUP) and experts.down_proj_zeros.dtype == torch.uint8
    assert experts.down_proj_scales.dtype == torch.float16
    gate_up, down = experts.expert_weights(5, torch.float32)
    prefix = "model.layers.1.mlp.experts.5"
    assert torch.equal(gate_up, torch.cat([twin[f"{prefix}.gate_proj.weight"], twin[f"{prefix}.up_proj.weight"]]))
    assert torch.equal(down, twin[f"{prefix}.down_proj.weight"])
    assert not model.capabilities.cuda_graphs  # the busy-expert loop reads routing on the host


def _engine_tokens(model_dir: Path, device: str, block_size: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 9, 2, 40], list(range(10, 23))]
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(str(model_dir), config=EngineConfig(block_size=block_size), device=device, dtype="float32")
    return [list(o.token_ids) for o in llm.generate(prompts, params)]


def test_engine_generates_what_the_twin_generates(dirs: tuple[Path, Path]) -> None:
    """The engine (scheduler, paged cache, sampler) runs the AWQ model: greedy tokens as the twin's."""
    assert _engine_tokens(dirs[0], "cpu", 4) == _engine_tokens(dirs[1], "cpu", 4)


@pytest.mark.gpu
def test_engine_on_cuda_generates_what_the_twin_generates(dirs: tuple[Path, Path]) -> None:
    """On CUDA: the AWQ linears' Triton kernels and the experts' awq_dequantize, eager (no graphs), against
    the twin's bf16-path kernels (fused MoE, graphs), both in fp32; and against the CPU."""
    awq_cuda = _engine_tokens(dirs[0], "cuda", 16)
    assert awq_cuda == _engine_tokens(dirs[1], "cuda", 16)
    assert awq_cuda == _engine_tokens(dirs[0], "cpu", 16)


def test_awq_refusals(dirs: tuple[Path, Path]) -> None:
    awq_dir, _ = dirs
    config = DeepseekConfig.from_hf(awq_dir)
    assert config.awq is not None and config.awq.group_size == GROUP and config.fp8_block_size is None
    # Tensor parallelism splits AWQ weights (tests/distributed/test_quant_models_parallel.py); --dp-attention not yet.
    DeepseekV3ForCausalLM.check_parallel(config, 2)
    with pytest.raises(UsageError, match="--dp-attention .*AWQ"):
        DeepseekV3ForCausalLM.check_parallel(config, 2, dp_attention=True)
    with pytest.raises(UsageError, match="--offload experts .*AWQ"):
        load_model(str(awq_dir), offload=OffloadConfig(gpu_weight_budget_gb=1.0))
    raw = json.loads((awq_dir / "config.json").read_text())
    with pytest.raises(UsageError, match="only fp8 and awq"):
        DeepseekConfig.from_hf({**raw, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(UsageError, match="8 bits"):
        DeepseekConfig.from_hf({**raw, "quantization_config": {**AWQ_CONFIG, "bits": 8}})
