"""Tiered GPU / host / disk expert store on CPU: offloaded == resident logits exactly for a tiny
DeepSeek-V3, eviction order, hand-computed counters, disk reads via safetensors mmap (never
torch.load), host-tier release on close()."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from deepseek_support import TINY_V3, load_ours, randomize_, read_checkpoint, run_steps
from transformers import DeepseekV3Config
from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.models.deepseek_v3 import DeepseekV3ForCausalLM
from r1deploy.weights.expert_cache import building_with
from r1deploy.weights.tiered_store import TieredExpertStore

H, I = 8, 4  # toy expert shapes for the unit tests
EXPERT_BYTES = 3 * H * I * 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = HFDeepseekV3(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=0)
    path = tmp_path_factory.mktemp("deepseek_v3_offload")
    hf.save_pretrained(path)
    return path


def offloaded(path: Path, **kwargs) -> DeepseekV3ForCausalLM:
    config = DeepseekConfig.from_hf(path)
    store = TieredExpertStore.for_model(config, torch.float32, "cpu", checkpoint_dir=path, **kwargs)
    with building_with(store):
        model = DeepseekV3ForCausalLM(config).eval()
    model.load_weights(read_checkpoint(path))
    return model


MOE_LAYERS = 2  # TINY_V3: 3 layers, the first dense
ALL = MOE_LAYERS * TINY_V3["n_routed_experts"]


@pytest.mark.parametrize("kwargs", [
    {"num_gpu_slots": 1},  # every expert copied in for every use; rounds of one
    {"num_gpu_slots": MOE_LAYERS},  # one slot per MoE layer
    {"num_gpu_slots": ALL},  # everything resident after first use
    {"num_gpu_slots": 3, "host_budget_bytes": 0},  # host tier empty: every miss read from disk
    {"num_gpu_slots": 4, "host_budget_bytes": 5 * 3 * 64 * 32 * 4, "policy": "lfu"},  # host evicts to disk
    {"num_gpu_slots": 2, "cpu_compute": "always"},  # misses computed on the host copy
    {"num_gpu_slots": 4, "prefetch": False},
])
def test_offloaded_logits_equal_resident(checkpoint: Path, kwargs: dict) -> None:
    resident = run_steps(load_ours(checkpoint))
    model = offloaded(checkpoint, **kwargs)
    assert model.model.layers[1].mlp.experts.gate_up_proj.numel() == 0  # no resident copy at all
    got = run_steps(model)
    for a, b in zip(got, resident, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    stats = model.offload_store.stats()
    assert stats.misses > 0 and stats.bytes_to_device == (stats.misses - stats.cpu_computes + stats.prefetches) * (
        3 * TINY_V3["hidden_size"] * TINY_V3["moe_intermediate_size"] * 4)
    if kwargs.get("host_budget_bytes") == 0:
        assert stats.disk_reads > 0 and stats.host_slots == 0
    if kwargs["num_gpu_slots"] == ALL:
        assert stats.evictions == 0 and stats.hits > 0
    if kwargs["num_gpu_slots"] == 1:
        assert stats.hits + stats.misses > 0 and stats.evictions >= stats.misses - 1
    model.offload_store.close()


def test_prefetch_hits_next_layer(checkpoint: Path) -> None:
    model = offloaded(checkpoint, num_gpu_slots=ALL)
    run_steps(model)
    stats = model.offload_store.stats()
    assert stats.prefetches > 0 and stats.prefetch_hits > 0


def toy_store(**kwargs) -> TieredExpertStore:
    kwargs.setdefault("num_gpu_slots", 1)
    store = TieredExpertStore(hidden_size=H, intermediate_size=I, dtype=torch.float32, **kwargs)
    for e in range(4):
        for p, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            store.load_expert(0, e, p, torch.full(shape, float(e)))
    store.finish_loading([(0, e) for e in range(4)])
    return store


def test_eviction_order_one_slot() -> None:
    store = toy_store(num_gpu_slots=1)
    for e in (0, 1, 1, 2, 0):
        res = store.get(0, [e])
        assert res.slots == (0,)
        assert torch.equal(res.gate_up[0], torch.full((2 * I, H), float(e)))  # the slot holds expert e
        assert store.resident_keys() == [(0, e)]
    s = store.stats()
    assert (s.hits, s.misses, s.evictions) == (1, 4, 3)
    with pytest.raises(ValueError, match="only 1 slots"):
        store.get(0, [1, 2])


def test_lru_vs_lfu_victim() -> None:
    for policy, victim in (("lru", 1), ("lfu", 2)):
        store = toy_store(num_gpu_slots=2, policy=policy)
        store.get(0, [1]), store.get(0, [1]), store.get(0, [2])  # 1: used twice but older
        store.get(0, [3])
        assert (0, victim) not in store.resident_keys(), policy


def test_counters_hand_computed() -> None:
    store = toy_store(num_gpu_slots=2)
    store.get(0, [0, 1])  # 2 misses
    store.get(0, [1, 2])  # hit 1; miss 2 evicts 0 (LRU)
    assert store.prefetch(0, [0]) == 0  # would evict 1 or 2, both in use by the last get: dropped
    store.get(0, [0])  # miss, evicts 1
    assert store.resident_keys() == [(0, 2), (0, 0)]
    assert store.prefetch(0, [0, 3]) == 1  # 0 resident; 3 evicts 2 (not in use any more)
    assert store.resident_keys() == [(0, 0), (0, 3)]
    store.get(0, [3])  # prefetched hit
    s = store.stats()
    assert (s.hits, s.misses, s.evictions, s.prefetches, s.prefetch_hits, s.prefetch_dropped) == (2, 4, 3, 1, 1, 1)
    assert s.bytes_to_device == 5 * EXPERT_BYTES  # 4 misses + 1 prefetch
    assert s.host_hits == 5 and s.disk_reads == 0
    assert 0 < s.hit_rate < 1
    with pytest.raises(AttributeError):
        s.hits = 0  # type: ignore[misc]  # a frozen snapshot


def test_disk_tier_uses_mmap_not_torch_load(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    model = offloaded(checkpoint, num_gpu_slots=2, host_budget_bytes=0)
    store = model.offload_store
    res = store.get(1, [5])
    expected = dict(read_checkpoint(checkpoint))
    torch.testing.assert_close(res.down[res.slots[0]], expected["model.layers.1.mlp.experts.5.down_proj.weight"],
                               rtol=0, atol=0)
    assert store.stats().disk_reads == 1 and store.stats().host_bytes == 0
    assert all(type(h).__name__ == "safe_open" for h in store.disk._handles.values())


def test_host_budget_without_disk_source_is_an_error() -> None:
    store = TieredExpertStore(hidden_size=H, intermediate_size=I, dtype=torch.float32, num_gpu_slots=1,
                              host_budget_bytes=EXPERT_BYTES)
    store.load_expert(0, 0, "gate", torch.zeros(I, H))
    with pytest.raises(Exception, match="neither the host weight budget nor a disk source"):
        store.load_expert(0, 1, "gate", torch.zeros(I, H))


def test_close_releases_host_tier() -> None:
    store = toy_store(num_gpu_slots=2, pin_memory=True)  # pinning falls back to pageable without CUDA
    store.get(0, [0, 1])
    before = store.stats()
    assert before.host_bytes == 4 * EXPERT_BYTES and before.host_slots >= 4
    assert before.pinned_bytes in (0, before.host_bytes)
    host_ref, gpu_ref = weakref.ref(store.host.gate_up), weakref.ref(store.gpu.gate_up)
    store.close()
    gc.collect()
    assert host_ref() is None and gpu_ref() is None
    after = store.stats()
    assert (after.host_bytes, after.pinned_bytes, after.host_slots, after.gpu_slots) == (0, 0, 0, 0)
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.get(0, [0])


def test_cost_model_choice() -> None:
    from r1deploy.weights.tiered_store import CostModel

    slow_cpu = toy_store(cpu_compute="auto", cost_model=CostModel(25e9, 1e3, 100e9))
    fast_cpu = toy_store(cpu_compute="auto", cost_model=CostModel(1e3, 1e15, 1e15))
    assert not slow_cpu.compute_on_host_choice(0, 1, 1)
    assert fast_cpu.compute_on_host_choice(0, 1, 1)
    fast_cpu.get(0, [1])
    assert not fast_cpu.compute_on_host_choice(0, 1, 1)  # resident: no reason to compute elsewhere
    assert CostModel.measure("cpu", nbytes=1 << 20, dim=64).pcie_bytes_per_s > 0
