"""AWQ INT4 (AutoAWQ GEMM format): packing against AutoAWQ's own loop, dequantisation bit for bit against
a float64 reference, loading by name (merged qkv / gate-up), and a tiny AWQ Llama/Qwen2 checkpoint
against transformers running the dequantised weights."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from awq_helpers import autoawq_pack, autoawq_quantize, awq_checkpoint_tensors, reference_dequant
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from r1deploy.config import ModelConfig
from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.errors import UsageError
from r1deploy.kernels.awq_format import dequantize_awq_packed, unpack_awq_packed
from r1deploy.layers.attention import kv_cache_shape
from r1deploy.models.loader import load_model
from r1deploy.quant.awq import AWQConfig, dequantize_awq, pack_awq, repack_awq, unpack_awq

QUANTISED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("group_size", [128, 64])
def test_pack_unpack_round_trip_matches_autoawq(group_size: int) -> None:
    torch.manual_seed(group_size)
    weight = torch.randn(96, 256)  # [out, in]
    intweight, zeros, scales = autoawq_quantize(weight, group_size)
    qweight, qzeros = autoawq_pack(intweight), autoawq_pack(zeros)
    assert qweight.shape == (256, 12) and qzeros.shape == (256 // group_size, 12) and scales.dtype == torch.float16
    assert torch.equal(unpack_awq(qweight), intweight)
    assert torch.equal(unpack_awq(qzeros), zeros)
    assert torch.equal(pack_awq(intweight), qweight)  # our packer writes AutoAWQ's bytes
    ref = reference_dequant(intweight, zeros, scales, group_size)
    assert torch.equal(dequantize_awq(qweight, qzeros, scales, group_size, torch.float64), ref)
    assert torch.equal(dequantize_awq(qweight, qzeros, scales, group_size, torch.float32), ref.float())
    assert torch.equal(dequantize_awq(qweight, qzeros, scales, group_size, torch.float16), ref.half())
    # Quantisation error is at most half a step per element (plus the fp16 rounding of the scale).
    step = scales.float().repeat_interleave(group_size, 0)
    assert bool(((ref.float() - weight.t()).abs() <= 0.5 * step * 1.01 + 1e-6).all())


@pytest.mark.parametrize("group_size", [64, 128])
def test_repack_for_the_kernels_keeps_every_weight(group_size: int) -> None:
    """Checkpoint layout -> the kernels' ([out, in / 8] words, nibble i of word j of a group's chunk = input
    i * g / 8 + j): the same W bit for bit, and the documented nibble positions."""
    gen = torch.Generator().manual_seed(group_size)
    intweight = torch.randint(0, 16, (256, 24), generator=gen, dtype=torch.int32)  # [in, out]
    zeros = torch.randint(0, 16, (256 // group_size, 24), generator=gen, dtype=torch.int32)
    scales = (torch.rand(256 // group_size, 24, generator=gen) * 0.02).half()
    packed, zeros_t, scales_t = repack_awq(pack_awq(intweight), pack_awq(zeros), scales, group_size)
    assert packed.shape == (24, 32) and zeros_t.dtype == torch.uint8 and scales_t.shape == (24, 256 // group_size)
    assert torch.equal(unpack_awq_packed(packed, group_size), intweight.t())
    words = group_size // 8
    n, c, i, j = 5, 1, 6, 3  # output 5, chunk 1, nibble 6, word 3 -> input c g + i W + j
    assert (int(packed[n, c * words + j]) >> (4 * i)) & 0xF == int(intweight[c * group_size + i * words + j, n])
    for dtype in (torch.float64, torch.float16):
        assert torch.equal(dequantize_awq_packed(packed, zeros_t, scales_t, group_size, dtype).t(),
                           dequantize_awq(pack_awq(intweight), pack_awq(zeros), scales, group_size, dtype))


def test_config_validation() -> None:
    cfg = AWQConfig.from_hf({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"})
    assert cfg.group_size == 64
    for bad in ({"quant_method": "gptq", "bits": 4}, {"quant_method": "awq", "bits": 8},
                {"quant_method": "awq", "version": "gemv"}, {"quant_method": "awq", "zero_point": False}):
        with pytest.raises(UsageError):
            AWQConfig.from_hf(bad)


TINY = {"vocab_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
CASES = {  # (HF class, config, group size): hidden 64 / 128 so every in-dim is a multiple of the group
    "llama-g64": (LlamaForCausalLM, LlamaConfig, {"hidden_size": 64, "intermediate_size": 128}, 64),
    "qwen2-g128": (Qwen2ForCausalLM, Qwen2Config, {"hidden_size": 128, "intermediate_size": 256}, 128),
}


def _make_hf(case: str) -> torch.nn.Module:
    cls, config_cls, dims, _ = CASES[case]
    torch.manual_seed(0)
    model = cls(config_cls(**TINY, **dims)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn_like(param)
            param.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model


def _write_awq_checkpoint(case: str, root: Path) -> tuple[torch.nn.Module, torch.nn.Module, Path, Path]:
    """(fp32 model, its dequantised twin, AWQ dir, dequantised-twin dir)."""
    group_size = CASES[case][3]
    hf = _make_hf(case)
    fp32_dir, awq_dir, deq_dir = root / "fp32", root / "awq", root / "deq"
    hf.save_pretrained(fp32_dir)
    state = load_file(str(fp32_dir / "model.safetensors"))
    awq_state, deq_state = {}, {}
    for name, tensor in state.items():
        if name.endswith(".weight") and any(f".{p}." in name for p in QUANTISED):
            base = name.removesuffix(".weight")
            packed = awq_checkpoint_tensors(tensor, group_size)
            awq_state.update({f"{base}.{k}": v for k, v in packed.items()})
            intweight, zeros, scales = autoawq_quantize(tensor, group_size)
            deq_state[name] = reference_dequant(intweight, zeros, scales, group_size).float().t().contiguous()
        else:
            awq_state[name] = tensor
            deq_state[name] = tensor
    twin = _make_hf(case)
    twin.load_state_dict(deq_state)
    twin.save_pretrained(deq_dir)
    awq_dir.mkdir()
    save_file(awq_state, str(awq_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp32_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm"}
    (awq_dir / "config.json").write_text(json.dumps(config))
    return hf, twin, awq_dir, deq_dir


@torch.inference_mode()
def _our_logits(
    model: torch.nn.Module, config: ModelConfig, chunks: list[list[int]]
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill a batch, then two decode steps per sequence; logits of every token, per sequence."""
    block_size = 4
    caches = [torch.zeros(kv_cache_shape(config, 32, block_size)) for _ in range(config.num_hidden_layers)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(chunks))]
    batch = ForwardBatch.build(chunks, [0] * len(chunks), tables, block_size, "cpu")
    logits = model.compute_logits(model(batch, caches))
    out = [logits[a:b] for a, b in itertools.pairwise(batch.query_start_loc.tolist())]
    seqs = [list(c) for c in chunks]
    for step in range(2):
        new = [[(7 * step + 5 * i) % 250 + 3] for i in range(len(chunks))]
        batch = ForwardBatch.build(new, [len(s) for s in seqs], tables, block_size, "cpu")
        logits = model.compute_logits(model(batch, caches))
        for i in range(len(chunks)):
            seqs[i] += new[i]
            out[i] = torch.cat([out[i], logits[i : i + 1]])
    return out, seqs


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_awq_checkpoint_matches_dequantised_twin(case: str, tmp_path: Path) -> None:
    hf, twin, awq_dir, _ = _write_awq_checkpoint(case, tmp_path)
    loaded = load_model(str(awq_dir))
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight is None and qkv.weight_packed.dtype == torch.int32  # really quantised, merged q/k/v
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4)]
    ours, seqs = _our_logits(loaded.model, loaded.config, prompts)
    with torch.no_grad():
        for got, tokens in zip(ours, seqs, strict=True):
            ref = twin(torch.tensor([tokens])).logits[0].float()
            assert (got - ref).abs().max().item() <= 1e-4
            # Within 4-bit quantisation error of the original fp32 model: the twin's error, and small against
            # the ~1.4 of an unrelated model (random weights of std 0.1 are 4-bit's worst case: ~9% per weight).
            full = hf(torch.tensor([tokens])).logits[0].float()
            rel = ((got - full).norm() / full.norm()).item()
            rel_twin = ((ref - full).norm() / full.norm()).item()
            assert 0 < rel < 0.4 and abs(rel - rel_twin) < 1e-3, (rel, rel_twin)


def test_unquantised_layers_keep_their_dtype_and_lm_head(tmp_path: Path) -> None:
    _, _, awq_dir, _ = _write_awq_checkpoint("llama-g64", tmp_path)
    loaded = load_model(str(awq_dir))
    names = dict(loaded.model.named_parameters())
    assert "lm_head.weight" in names and names["lm_head.weight"].dtype == torch.float32
    # repacked after loading: [out, in / 8] words, [out, in / g] scales and zeros
    assert names["model.layers.1.mlp.gate_up_proj.weight_packed"].shape == (2 * 128, 64 // 8)
    assert names["model.layers.1.mlp.down_proj.weight_scales"].shape == (64, 128 // 64)
    assert "model.layers.1.mlp.down_proj.qweight" not in names  # the checkpoint layout is not kept too
