"""FP8 experts in the tiered expert store (issue 9), on CPU: a tiny DeepSeek-V3 FP8 checkpoint (block-scaled
e4m3 weights + weight_scale_inv, small tiles with partial edge tiles) served from an FP8 store gives exactly
the logits of the same model resident in forced-FP8 mode, whatever the slot count, host budget (disk reads of
the checkpoint's FP8 tensors as stored) or host compute; every tier holds FP8 + fp32 scales and the byte
counters count FP8 bytes; dummy FP8 experts; stacked and unquantised sources."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from deepseek_support import FP8_TILE, TINY_V3, randomize_, read_checkpoint, run_steps, write_fp8_checkpoint
from transformers import DeepseekV3Config
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from r1deploy.engine_config import OffloadConfig
from r1deploy.models.loader import load_model
from r1deploy.quant.fp8_block import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block
from r1deploy.weights.tiered_store import TieredExpertStore, budget_slots

BLOCK = FP8_TILE  # TINY_V3: hidden 64, moe_intermediate 32 -> gate/up scales [2, 4], down [4, 2]
H, I = TINY_V3["hidden_size"], TINY_V3["moe_intermediate_size"]
SCALE_BYTES = 4 * (2 * 2 * 4 + 4 * 2)
FP8_EXPERT_BYTES = 3 * H * I + SCALE_BYTES  # one byte a weight, plus the fp32 tile scales
MOE_LAYERS = 2
ALL = MOE_LAYERS * TINY_V3["n_routed_experts"]


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = HFDeepseekV3(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=9)
    hf_dir, fp8_dir = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("fp8")
    hf.save_pretrained(hf_dir)
    write_fp8_checkpoint(dict(read_checkpoint(hf_dir)), json.loads((hf_dir / "config.json").read_text()), fp8_dir,
                         BLOCK)
    return fp8_dir


def slots_gb(n: int) -> float:
    return n * FP8_EXPERT_BYTES / 1e9


@pytest.fixture(scope="module")
def resident_logits(fp8_checkpoint: Path) -> list[torch.Tensor]:
    model = load_model(str(fp8_checkpoint), dtype="float32", quantization="fp8").model
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == FP8_DTYPE  # resident FP8 experts
    return run_steps(model)


@pytest.mark.parametrize("offload", [
    OffloadConfig(slots_gb(1)),  # one GPU slot: every expert copied in for every use, evicting
    OffloadConfig(slots_gb(MOE_LAYERS), host_weight_budget_gb=0.0),  # no host tier: FP8 read from disk per miss
    OffloadConfig(slots_gb(4), host_weight_budget_gb=5 * FP8_EXPERT_BYTES / 1e9, policy="lfu"),  # host evicts
    OffloadConfig(slots_gb(1), cpu_compute="always"),  # misses dequantised and computed on the host copy
    OffloadConfig(slots_gb(ALL)),  # all resident after first use
], ids=["one_slot", "disk", "host_lfu", "host_compute", "all"])
def test_fp8_offloaded_logits_equal_fp8_resident(fp8_checkpoint: Path, resident_logits: list[torch.Tensor],
                                                 offload: OffloadConfig) -> None:
    model = load_model(str(fp8_checkpoint), dtype="float32", quantization="fp8", offload=offload).model
    store = model.offload_store
    experts = model.model.layers[1].mlp.experts
    assert store.fp8 and store.expert_bytes == FP8_EXPERT_BYTES
    assert experts.gate_up_proj.numel() == 0 and experts.gate_up_proj.dtype == FP8_DTYPE  # no resident copy
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == FP8_DTYPE  # non-expert linears: FP8 rules
    assert store.gpu.gate_up.dtype == store.gpu.down.dtype == store.host.gate_up.dtype == FP8_DTYPE
    assert store.gpu.gate_up_scale.dtype == torch.float32 and store.gpu.gate_up_scale.shape[1:] == (4, 4)
    got = run_steps(model)
    for a, b in zip(got, resident_logits, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
    stats = store.stats()
    copies = stats.misses - stats.cpu_computes + stats.prefetches
    assert stats.misses > 0 and stats.bytes_to_device == copies * FP8_EXPERT_BYTES
    assert FP8_EXPERT_BYTES < 3 * H * I * 2 * 0.51  # about half of bf16's bytes (the scales are ~1/64 of it here)
    if offload.host_weight_budget_gb == 0.0:
        assert stats.disk_reads > 0 and stats.host_slots == 0
        assert stats.bytes_from_disk == stats.disk_reads * FP8_EXPERT_BYTES  # FP8 + scales as stored
    elif offload.host_weight_budget_gb is None:
        assert stats.host_bytes == ALL * FP8_EXPERT_BYTES
    if offload.cpu_compute == "always":
        assert stats.cpu_computes > 0
    if stats.gpu_slots == 1 and offload.cpu_compute == "never":
        assert stats.evictions >= stats.misses - 1 > 0
    if stats.gpu_slots == ALL:
        assert stats.evictions == 0 and stats.hits > 0
    store.close()
    assert store.stats().host_bytes == 0


def test_fp8_tiers_hold_the_checkpoint_bytes(fp8_checkpoint: Path) -> None:
    """Host slot, disk read and device slot all hold the checkpoint's FP8 values and scales bit for bit."""
    stored = dict(read_checkpoint(fp8_checkpoint))
    for host in (None, 0.0):
        model = load_model(str(fp8_checkpoint), dtype="float32", quantization="fp8",
                           offload=OffloadConfig(slots_gb(2), host_weight_budget_gb=host)).model
        store = model.offload_store
        res = store.get(2, [6])
        slot = res.slots[0]
        prefix = "model.layers.2.mlp.experts.6"
        gate, up, down = (stored[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        scales = [stored[f"{prefix}.{p}_proj.weight_scale_inv"] for p in ("gate", "up", "down")]
        assert torch.equal(res.gate_up[slot].view(torch.uint8), torch.cat([gate, up]).view(torch.uint8))
        assert torch.equal(res.down[slot].view(torch.uint8), down.view(torch.uint8))
        assert torch.equal(res.gate_up_scale[slot], torch.cat(scales[:2]))
        assert torch.equal(res.down_scale[slot], scales[2])
        gate_up, dq_down = store.dequantized(res, 0, torch.float32)
        assert torch.equal(gate_up[:I], dequantize_fp8_block(gate, scales[0], torch.float32, BLOCK))
        assert torch.equal(dq_down, dequantize_fp8_block(down, scales[2], torch.float32, BLOCK))
        assert store.stats().disk_reads == (1 if host == 0.0 else 0)
        store.close()


def test_auto_on_cpu_keeps_the_model_dtype(fp8_checkpoint: Path) -> None:
    """quantization "auto" on the CPU: experts dequantised at load into a model-dtype store (CI's numbers)."""
    model = load_model(str(fp8_checkpoint), dtype="float32", offload=OffloadConfig(slots_gb(4))).model
    store = model.offload_store
    assert not store.fp8 and store.gpu.gate_up.dtype == torch.float32 and store.expert_bytes == 3 * H * I * 4
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float32
    resident = load_model(str(fp8_checkpoint), dtype="float32").model
    for a, b in zip(run_steps(model), run_steps(resident), strict=True):
        assert torch.equal(a, b)
    store.close()


def test_dummy_fp8_experts_in_the_store(fp8_checkpoint: Path) -> None:
    model = load_model(str(fp8_checkpoint), dtype="float32", quantization="fp8", load_format="dummy",
                       offload=OffloadConfig(slots_gb(3))).model
    store = model.offload_store
    # As bench/target.load_offloaded_dummy does: the loader leaves the host tier empty for dummy weights.
    store.init_dummy_weights((layer, e) for layer in (1, 2) for e in range(TINY_V3["n_routed_experts"]))
    assert store.fp8 and len(store.host.slot_of) == ALL
    assert store.host.gate_up.dtype == FP8_DTYPE and bool((store.host.gate_up_scale == 0.02).all())
    res = store.get(1, [0, 5])
    gate_up, _ = store.dequantized(res, 1, torch.float32)
    assert abs(gate_up.std().item() - 0.02) < 0.003 and abs(gate_up.mean().item()) < 0.003
    assert all(torch.isfinite(t).all() for t in run_steps(model))
    store.close()


def toy_fp8_store(**kwargs) -> TieredExpertStore:
    kwargs.setdefault("num_gpu_slots", 1)
    return TieredExpertStore(hidden_size=40, intermediate_size=24, dtype=torch.bfloat16, fp8=True,
                             fp8_block=(16, 16), **kwargs)


def test_fp8_store_sizes_and_parts() -> None:
    """Partial edge tiles (24 = 16 + 8 rows); weights and scales arrive separately in any order, or a
    weight unquantised (quantised with the store's tiles); the unit counters count FP8 bytes."""
    store = toy_fp8_store(num_gpu_slots=2)
    scale_bytes = 4 * (2 * 2 * 3 + 3 * 2)
    assert store.expert_bytes == 3 * 40 * 24 + scale_bytes
    bf16 = TieredExpertStore(hidden_size=40, intermediate_size=24, dtype=torch.bfloat16, num_gpu_slots=1)
    assert store.expert_bytes < 0.6 * bf16.expert_bytes
    assert budget_slots(2 * store.expert_bytes / 1e9, 40, 24, torch.bfloat16, (16, 16)) == 2
    generator = torch.Generator().manual_seed(0)
    weights = {p: torch.randn(shape, generator=generator) for p, shape in (("gate", (24, 40)), ("up", (24, 40)),
                                                                          ("down", (40, 24)))}
    quantized = {p: quantize_fp8_block(w, (16, 16)) for p, w in weights.items()}
    for p in ("down", "gate", "up"):  # expert 0: scales first, then the FP8 weights
        store.load_expert(0, 0, p, quantized[p][1])
    for p in ("gate", "up", "down"):
        store.load_expert(0, 0, p, quantized[p][0])
    for p in ("gate", "up", "down"):  # expert 1: the unquantised weights
        store.load_expert(0, 1, p, weights[p])
    store.finish_loading([(0, 0), (0, 1)])
    res = store.get(0, [0, 1])
    for index in range(2):
        gate_up, down = store.dequantized(res, index, torch.float32)
        assert torch.equal(down, dequantize_fp8_block(*quantized["down"], torch.float32, (16, 16)))
        assert torch.equal(gate_up[24:], dequantize_fp8_block(*quantized["up"], torch.float32, (16, 16)))
    out = store.compute_on_host(0, 1, torch.randn(3, 40, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (3, 40)
    stats = store.stats()
    assert stats.bytes_to_device == 2 * store.expert_bytes
    assert stats.host_bytes == stats.host_slots * store.expert_bytes
    with pytest.raises(Exception, match="down_proj scales: expected"):
        store.load_expert(0, 2, "down", torch.ones(2, 2), scale=True)
    incomplete = toy_fp8_store()
    incomplete.load_expert(0, 0, "gate", quantized["gate"][0])
    for p in ("up", "down"):
        incomplete.load_expert(0, 0, p, weights[p])
    with pytest.raises(Exception, match="incomplete"):  # the gate's scales never came
        incomplete.finish_loading([(0, 0)])


def test_fp8_stacked_checkpoint_on_disk(tmp_path: Path) -> None:
    """Stacked `experts.gate_up_proj` FP8 with a stacked `_scale_inv` (gate tile rows first) on disk."""
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(3, 48, 40, generator=generator)
    down = torch.randn(3, 40, 24, generator=generator)
    q_gate, s_gate = zip(*(quantize_fp8_block(g[:24], (16, 16)) for g in gate_up), strict=True)
    q_up, s_up = zip(*(quantize_fp8_block(g[24:], (16, 16)) for g in gate_up), strict=True)
    q_down, s_down = zip(*(quantize_fp8_block(d, (16, 16)) for d in down), strict=True)
    name = "model.layers.1.mlp.experts"
    save_file({f"{name}.gate_up_proj": torch.stack([torch.cat(p) for p in zip(q_gate, q_up, strict=True)]),
               f"{name}.gate_up_proj_scale_inv": torch.stack([torch.cat(p) for p in zip(s_gate, s_up, strict=True)]),
               f"{name}.down_proj": torch.stack(q_down), f"{name}.down_proj_scale_inv": torch.stack(s_down)},
              str(tmp_path / "model.safetensors"))
    for fp8 in (True, False):
        store = TieredExpertStore(hidden_size=40, intermediate_size=24, dtype=torch.float32, fp8=fp8,
                                  fp8_block=(16, 16), num_gpu_slots=1, host_budget_bytes=0, checkpoint_dir=tmp_path)
        store.finish_loading([(1, e) for e in range(3)])
        res = store.get(1, [2])
        got_gate_up, got_down = store.dequantized(res, 0, torch.float32)
        assert torch.equal(got_gate_up[24:], dequantize_fp8_block(q_up[2], s_up[2], torch.float32, (16, 16)))
        assert torch.equal(got_down, dequantize_fp8_block(q_down[2], s_down[2], torch.float32, (16, 16)))
        assert res.gate_up.dtype == (FP8_DTYPE if fp8 else torch.float32)
