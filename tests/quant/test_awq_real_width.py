"""AWQ at the R1-Distill-Qwen-7B widths (merged q/k/v of unequal shards 3584 / 512 / 512 with bias, a
148-group in_features = 18944), and the H200 benchmark's in-memory AWQ checkpoint against its dequantised
twin: the checks that tell a bug in our AWQ path or in the benchmark's checkpoint from 4-bit error."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from awq_helpers import autoawq_quantize, awq_checkpoint_tensors, reference_dequant

from r1deploy.layers.linear import Linear, MergedLinear
from r1deploy.quant.awq import AWQConfig

GROUP = 128
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def test_merged_qkv_at_7b_width_matches_float64_dequant() -> None:
    gen = torch.Generator().manual_seed(0)
    shards = {"q": 3584, "k": 512, "v": 512}
    layer = MergedLinear(3584, shards, bias=True, quant_method=AWQConfig(GROUP).linear_method("qkv_proj"))
    deq, biases = [], []
    for shard_id, width in shards.items():
        weight = torch.randn(width, 3584, generator=gen) * 0.02
        bias = torch.randn(width, generator=gen) * 0.1
        for name, tensor in awq_checkpoint_tensors(weight, GROUP).items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor, shard_id)
        layer.bias.weight_loader(layer.bias, bias, shard_id)
        deq.append(reference_dequant(*autoawq_quantize(weight, GROUP), GROUP))  # [in, width], no packing
        biases.append(bias.double())
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(16, 3584, generator=gen)
    want = x.double() @ torch.cat(deq, 1) + torch.cat(biases)
    got = layer(x)
    for a, b in ((0, 3584), (3584, 4096), (4096, 4608)):  # each shard where it belongs
        assert _rel(got[:, a:b], want[:, a:b]) < 1e-5


@torch.no_grad()
def test_down_proj_148_groups_matches_float64_dequant() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = Linear(18944, 64, bias=False, quant_method=AWQConfig(GROUP).linear_method("down_proj"))
    weight = torch.randn(64, 18944, generator=gen) * 0.02
    for name, tensor in awq_checkpoint_tensors(weight, GROUP).items():
        getattr(layer, name).weight_loader(getattr(layer, name), tensor)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(8, 18944, generator=gen)
    want = x.double() @ reference_dequant(*autoawq_quantize(weight, GROUP), GROUP)
    assert _rel(layer(x), want) < 1e-5
    # and the 4-bit error of N(0, 0.02) weights itself: ~10% per linear (group 128, min/max zero point)
    assert 0.08 < _rel(layer(x), x.double() @ weight.double().t()) < 0.12


def _h200_quant():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("h200_quant")
    finally:
        sys.path.remove(str(BENCHMARKS))


@torch.no_grad()
def test_benchmark_awq_checkpoint_matches_its_dequantised_twin() -> None:
    """The benchmark's quantise-and-load (h200_quant.awq_checkpoint) and its correctness gate (the twin)."""
    from r1deploy.models.loader import build_model
    from r1deploy.weights import load_weights
    from r1deploy.weights.dummy import init_dummy_weights

    bench = _h200_quant()
    raw = dict(bench.SMOKE_CONFIG)
    ref, config = build_model(raw, torch.float32, torch.device("cpu"))
    init_dummy_weights(ref)
    qkv_bias = ref.model.layers[0].self_attn.qkv_proj.bias
    qkv_bias.copy_(torch.randn(qkv_bias.shape, generator=torch.Generator().manual_seed(2)) * 0.1)  # nonzero
    awq_raw = dict(raw, quantization_config={"quant_method": "awq", "bits": 4, "group_size": bench.GROUP_SIZE,
                                              "zero_point": True, "version": "gemm"})
    awq, awq_config = build_model(awq_raw, torch.float32, torch.device("cpu"))
    load_weights(awq, bench.awq_checkpoint(ref, config, bench.GROUP_SIZE))
    twin = bench.dequantised_twin(raw, awq, torch.float32, "cpu")
    # The twin's weights are the independent AutoAWQ quantisation of the reference's, merged shards in order.
    q, kv = config.q_size, config.kv_size
    for name, param in ref.named_parameters():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rpartition(".")[2] in bench.QUANTISED:
            splits = {"qkv_proj": (q, kv, kv), "gate_up_proj": (config.intermediate_size,) * 2}
            parts = param.split(splits.get(module.rpartition(".")[2], (param.shape[0],)), 0)
            want = torch.cat([reference_dequant(*autoawq_quantize(p, GROUP), GROUP) for p in parts], 1)
            assert torch.equal(twin.get_submodule(module).weight.double().t(), want), name
    errors = bench.linear_errors(awq, twin, "cpu", torch.float32)
    assert max(errors.values()) < 1e-5, errors
    prompt = list(range(3, 35))
    got = bench.prompt_logits(awq, awq_config, prompt, "cpu", torch.float32)
    deq = bench.prompt_logits(twin, config, prompt, "cpu", torch.float32)
    full = bench.prompt_logits(ref, config, prompt, "cpu", torch.float32)
    assert _rel(got, deq) < 1e-5
    assert 0.01 < _rel(got, full) < 0.5  # quantisation error: real, and the same as the twin's
    assert abs(_rel(got, full) - _rel(deq, full)) < 1e-4
