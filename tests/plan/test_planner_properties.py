"""Monotonicity: more batch, context or concurrency never needs less memory or time."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from r1deploy.plan.catalog import Catalog
from r1deploy.plan.memory import activation_bytes, kv_bytes_per_token_per_gpu, plan_memory
from r1deploy.plan.model_spec import load_model
from r1deploy.plan.parallel import Layout
from r1deploy.plan.precision import Precision
from r1deploy.plan.roofline import Efficiency, decode_stage, prefill_stage, stage_cost
from r1deploy.presets import preset_names

MODELS = {n: load_model(n) for n in preset_names()}
H200 = Catalog.load().get("h200")
names = st.sampled_from(sorted(MODELS))
layouts = st.sampled_from([Layout(8, 8, 1, 1, False, 8), Layout(8, 4, 2, 1, False, 8), Layout(4, 4, 1, 1, False, 8)])
fast = settings(max_examples=60, deadline=None)


@fast
@given(names, layouts, st.integers(1, 65536), st.integers(1, 65536))
def test_activations_grow_with_batched_tokens(name: str, layout: Layout, a: int, b: int) -> None:
    m = MODELS[name]
    lo, hi = sorted((a, b))
    assert activation_bytes(m, layout, lo) <= activation_bytes(m, layout, hi)


@fast
@given(names, st.sampled_from(["bf16", "fp8"]), st.sampled_from([1, 2, 4, 8]))
def test_fp8_kv_and_more_tp_never_need_more_kv_per_gpu(name: str, kv: str, tp: int) -> None:
    m = MODELS[name]
    if m.num_heads % tp:
        return
    lay = Layout(tp, tp, 1, 1, False, 8)
    bf16 = kv_bytes_per_token_per_gpu(m, Precision("bf16", "bf16"), lay)
    assert kv_bytes_per_token_per_gpu(m, Precision("bf16", kv), lay) <= bf16
    assert bf16 <= kv_bytes_per_token_per_gpu(m, Precision("bf16", "bf16"), Layout(1, 1, 1, 1, False, 8))


@fast
@given(names, st.floats(0.3, 1.0), st.floats(0.3, 1.0))
def test_kv_capacity_grows_with_memory_utilization(name: str, a: float, b: float) -> None:
    m = MODELS[name]
    lay = Layout(8, 8 if m.num_heads % 8 == 0 else 4, 1, 1, False, 8)
    lay = Layout(lay.tp, lay.tp, 1, 1, False, 8)
    lo, hi = sorted((a, b))
    p = Precision(m.checkpoint_weights, "bf16")
    assert plan_memory(m, p, lay, H200, lo).kv_capacity_tokens <= plan_memory(m, p, lay, H200, hi).kv_capacity_tokens


@fast
@given(names, st.integers(1, 512), st.integers(1, 512), st.integers(1, 32768), st.integers(1, 32768))
def test_decode_step_grows_with_batch_and_context(name: str, b1: int, b2: int, c1: int, c2: int) -> None:
    m = MODELS[name]
    tp = 8 if m.num_heads % 8 == 0 else 4
    cost = stage_cost(m, Precision(m.checkpoint_weights, "bf16"), Layout(tp, tp, 1, 1, False, 8), H200, Efficiency())
    (blo, bhi), (clo, chi) = sorted((b1, b2)), sorted((c1, c2))
    small, big = decode_stage(cost, blo, clo), decode_stage(cost, bhi, chi)
    assert small.bytes <= big.bytes and small.flops <= big.flops and small.total_s <= big.total_s
    assert prefill_stage(cost, clo).total_s <= prefill_stage(cost, chi).total_s
