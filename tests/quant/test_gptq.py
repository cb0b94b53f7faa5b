"""GPTQ INT4 (AutoGPTQ format, converted to AWQ's layout at load): packing against AutoGPTQ's loops, each
linear's dequantised weights bit for bit against a float64 reference (groups 128 / 64 / -1, act-order, sym,
v1 and v2 zeros), merged shards in any load order, and tiny GPTQ Llama/Qwen2 checkpoints through load_model
against transformers running the dequantised weights."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from gptq_helpers import autogptq_pack, gptq_checkpoint_tensors, gptq_quantize, gptq_reference_dequant
from safetensors.torch import load_file, save_file
from test_awq import QUANTISED, _make_hf, _our_logits

from r1deploy.errors import UsageError
from r1deploy.layers.linear import Linear, MergedLinear
from r1deploy.models.loader import load_model
from r1deploy.quant.awq import AWQConfig
from r1deploy.quant.gptq import GPTQConfig, unpack_gptq
from r1deploy.quant.registry import quant_config_from_hf
from r1deploy.weights import WeightLoadError


def _config(group_size: int, sym: bool = False, v2: bool = False, desc_act: bool = False) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": "gptq_v2" if v2 else "gptq"}


def _load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], shard_id: str | None = None) -> None:
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor, shard_id)


def _layer_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (loaded and processed) layer's dequantised W [in, out] in the checkpoint's channel order, float64."""
    w = layer.quant_method.awq.dequantized_weight(layer, torch.float64).t()
    return w if layer.input_perm is None else w[torch.argsort(layer.input_perm)]


@pytest.mark.parametrize(("group_size", "act_order", "sym", "v2"), [
    (128, False, False, False), (64, True, False, False), (-1, False, False, False), (64, True, True, False),
    (128, True, False, True), (-1, True, True, True),
])
@torch.no_grad()
def test_linear_matches_float64_reference(group_size: int, act_order: bool, sym: bool, v2: bool) -> None:
    gen = torch.Generator().manual_seed(group_size + 7 * act_order)
    weight = torch.randn(96, 256, generator=gen)  # [out, in]
    order = torch.randperm(256, generator=gen) if act_order else None
    intweight, zeros, scales, g_idx = gptq_quantize(weight, group_size, order, sym)
    tensors = gptq_checkpoint_tensors(weight, group_size, order, sym, v2)
    assert tensors["qweight"].shape == (32, 96) and tensors["qzeros"].shape == (zeros.shape[0], 12)
    assert torch.equal(unpack_gptq(tensors["qweight"]), intweight)  # our unpacking reads AutoGPTQ's bytes
    assert torch.equal(unpack_gptq(tensors["qzeros"].t()).t() + (0 if v2 else 1), zeros)
    if sym:
        assert bool((zeros == 8).all())
    layer = Linear(256, 96, bias=True, quant_method=GPTQConfig.from_hf(_config(group_size, sym, v2)).linear_method())
    bias = torch.randn(96, generator=gen)
    _load(layer, {**tensors, "bias": bias})
    layer.quant_method.process_weights_after_loading(layer)
    ref = gptq_reference_dequant(intweight, zeros, scales, g_idx)  # [in, out]
    assert torch.equal(_layer_weight(layer), ref)  # the conversion loses nothing
    assert (layer.input_perm is not None) == (act_order and group_size != -1)  # one group needs no reorder
    x = torch.randn(5, 256, generator=gen)
    want = x.double() @ ref + bias.double()
    assert torch.allclose(layer(x.double()), want, rtol=0, atol=1e-10)
    assert torch.allclose(layer(x).double(), want, rtol=1e-5, atol=1e-4)  # fp32 activations
    # 4-bit error: at most half a step per weight (plus the fp16 rounding of the scale); sym's clamp aside.
    if not sym:
        step = scales.double()[g_idx.long()]
        assert bool(((ref - weight.t().double()).abs() <= 0.5 * step * 1.01 + 1e-6).all())


@pytest.mark.parametrize("g_idx_first", [True, False])
@torch.no_grad()
def test_merged_act_order_shards_in_any_load_order(g_idx_first: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    shards = {"q": 128, "k": 64, "v": 64}
    method = GPTQConfig.from_hf(_config(64, desc_act=True)).linear_method("qkv_proj")
    layer = MergedLinear(128, shards, bias=True, quant_method=method)
    order = torch.randperm(128, generator=gen)  # q, k and v share their input, hence GPTQ's act-order
    deq, biases = [], []
    for i, (shard_id, width) in enumerate(shards.items()):
        weight = torch.randn(width, 128, generator=gen)
        tensors = gptq_checkpoint_tensors(weight, 64, order)
        g_idx = tensors.pop("g_idx")
        first = (i == 0) == g_idx_first  # g_idx before the first shard's qweight, or after it
        _load(layer, {"g_idx": g_idx, **tensors} if first else {**tensors, "g_idx": g_idx}, shard_id)
        biases.append(torch.randn(width, generator=gen))
        _load(layer, {"bias": biases[-1]}, shard_id)
        deq.append(gptq_reference_dequant(*gptq_quantize(weight, 64, order)))
    assert layer.input_perm is not None
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(_layer_weight(layer), torch.cat(deq, 1))
    x = torch.randn(4, 128, generator=gen)
    want = x.double() @ torch.cat(deq, 1) + torch.cat(biases).double()
    assert torch.allclose(layer(x.double()), want, rtol=0, atol=1e-10)


@torch.no_grad()
def test_refusals() -> None:
    for bad in (_config(128) | {"bits": 8}, _config(100), _config(128) | {"checkpoint_format": "marlin"},
                _config(128) | {"lm_head": True}):
        with pytest.raises(UsageError):
            GPTQConfig.from_hf(bad)
    assert isinstance(quant_config_from_hf(_config(64)), GPTQConfig)
    assert isinstance(quant_config_from_hf({"quant_method": "awq", "group_size": 64}), AWQConfig)
    gen = torch.Generator().manual_seed(4)
    # Shards of a merged layer with different act-orders cannot share one activation permutation.
    layer = MergedLinear(64, {"gate": 64, "up": 64}, bias=False, quant_method=GPTQConfig(32).linear_method())
    for shard_id in ("gate", "up"):
        tensors = gptq_checkpoint_tensors(torch.randn(64, 64, generator=gen), 32, torch.randperm(64, generator=gen))
        with pytest.raises(ValueError, match="different g_idx") if shard_id == "up" else contextlib.nullcontext():
            _load(layer, tensors, shard_id)
    # A g_idx whose groups are not group_size channels each.
    layer = Linear(64, 64, bias=False, quant_method=GPTQConfig(32).linear_method())
    with pytest.raises(ValueError, match="exactly 32"):
        _load(layer, {"g_idx": torch.zeros(64, dtype=torch.int32)})
    # A v1 zero point of 0: stored as -1, which AutoGPTQ's packing smears over the higher nibbles.
    intweight, zeros, _, _ = gptq_quantize(torch.randn(64, 64, generator=gen), 32)
    zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        _load(layer, {"qzeros": autogptq_pack(intweight, zeros)[1]})


GPTQ_CASES = {  # test_awq's tiny models (hidden 64 / 128; Qwen2 has q/k/v bias), group, desc_act, sym;
    # groups smaller than hidden, so that act-order really permutes every layer's input
    "llama-g32-act": ("llama-g64", 32, True, False),
    "qwen2-g64-act-sym": ("qwen2-g128", 64, True, True),
    "qwen2-gall": ("qwen2-g128", -1, False, False),
}
INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
            "up_proj": "mlp", "down_proj": "down"}


def _write_gptq_checkpoint(case: str, root: Path) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """(fp32 model, its dequantised twin, GPTQ dir): transformers' layout, config.json's quantization_config."""
    model_case, group_size, act_order, sym = GPTQ_CASES[case]
    hf = _make_hf(model_case)
    hf.save_pretrained(root / "fp32")
    state = load_file(str(root / "fp32" / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    orders: dict[str, torch.Tensor] = {}  # one act-order per input (q/k/v share one, gate/up another)
    gptq_state, deq_state = {}, {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight").rpartition(".")[2]
        if name.endswith(".weight") and module in QUANTISED:
            key = name.rpartition(".")[0].rpartition(".")[0] + INPUT_OF[module]
            order = orders.setdefault(key, torch.randperm(tensor.shape[1], generator=gen)) if act_order else None
            packed = gptq_checkpoint_tensors(tensor, group_size, order, sym)
            gptq_state.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in packed.items()})
            ref = gptq_reference_dequant(*gptq_quantize(tensor, group_size, order, sym))
            deq_state[name] = ref.float().t().contiguous()
        else:
            gptq_state[name] = deq_state[name] = tensor
    twin = _make_hf(model_case)
    twin.load_state_dict(deq_state)
    gptq_dir = root / "gptq"
    gptq_dir.mkdir()
    save_file(gptq_state, str(gptq_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "fp32" / "config.json").read_text())
    config["quantization_config"] = _config(group_size, sym, desc_act=act_order) | {
        "damp_percent": 0.01, "true_sequential": True, "lm_head": False}
    (gptq_dir / "config.json").write_text(json.dumps(config))
    return hf, twin, gptq_dir


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_tiny_gptq_checkpoint_matches_dequantised_twin(case: str, tmp_path: Path) -> None:
    hf, twin, gptq_dir = _write_gptq_checkpoint(case, tmp_path)
    loaded = load_model(str(gptq_dir))
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight is None and qkv.weight_packed.dtype == torch.int32  # really quantised, merged q/k/v
    assert (qkv.input_perm is not None) == (GPTQ_CASES[case][2] and GPTQ_CASES[case][1] != -1)
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4)]
    ours, seqs = _our_logits(loaded.model, loaded.config, prompts)
    with torch.no_grad():
        for got, tokens in zip(ours, seqs, strict=True):
            ref = twin(torch.tensor([tokens])).logits[0].float()
            assert (got - ref).abs().max().item() <= 2e-5  # ~4e-6 seen: fp32 sums in another order
            # 4-bit error against the fp32 original: the twin's, and small against an unrelated model's ~1.4
            # (random N(0, 0.1) weights are 4-bit's worst case; 0.23-0.40 here, the most with one group per row).
            full = hf(torch.tensor([tokens])).logits[0].float()
            rel = ((got - full).norm() / full.norm()).item()
            rel_twin = ((ref - full).norm() / full.norm()).item()
            assert 0 < rel < 0.5 and abs(rel - rel_twin) < 1e-3, (rel, rel_twin)


def test_checkpoint_missing_g_idx_is_refused(tmp_path: Path) -> None:
    _, _, gptq_dir = _write_gptq_checkpoint("qwen2-gall", tmp_path)
    state = load_file(str(gptq_dir / "model.safetensors"))
    del state["model.layers.0.mlp.down_proj.g_idx"]
    save_file(state, str(gptq_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match="down_proj.g_idx"):
        load_model(str(gptq_dir))
