"""`--offload layers` on CPU: a tiny Llama and a tiny DeepSeek-V3 with 1 resident layer and a 2-slot ring give the
resident model's greedy tokens and logits exactly (same dtype) through the engine; the counters count what moved;
the host tier is released at engine shutdown; the ring, the budget split and the disk tier; the CLI flags."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from deepseek_support import TINY_V3, PagedDriver, randomize_
from tiny_models import TINY, make_hf_model

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine_config import EngineConfig, OffloadConfig
from r1deploy.models.loader import load_model
from r1deploy.sampling_params import SamplingParams
from r1deploy.weights.layer_stream import LayerStream, layer_nbytes, resident_prefix
from r1deploy.weights.tiered_store import TierStats

PROMPTS = [[5, 9, 13, 40, 41, 3], list(range(10, 30)), [3, 4]]
NEW_TOKENS = 5
LAYERS = 4


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": LAYERS}, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = 0.1 * torch.randn_like(param)
            param.copy_(1 + noise if name.endswith("norm.weight") else noise)
    path = tmp_path_factory.mktemp("llama_layers")
    hf.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = tmp_path_factory.mktemp("deepseek_layers")
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY_V3, "num_hidden_layers": LAYERS + 1},
                                                attn_implementation="eager")).float().eval()
    randomize_(hf, seed=0)
    hf.save_pretrained(path, safe_serialization=True)
    return path


def one_resident_budget_gb(path: Path) -> float:
    """Non-layer weights + layer 0 + two slots of the largest other layer, in GB."""
    model = load_model(str(path), dtype="float32").model
    sizes = [layer_nbytes(layer) for layer in model.model.layers]
    in_layers = {id(p) for layer in model.model.layers for p in layer.parameters()}
    other = sum(p.nbytes for p in model.parameters() if id(p) not in in_layers)
    budget = other + sizes[0] + 2 * max(sizes[1:])
    assert resident_prefix(sizes, other, budget, 2) == 1
    return budget / 1e9


def generate(path: Path, offload: OffloadConfig | None, **config: object):
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(str(path), config=EngineConfig(offload=offload, **config), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, params)
    return [list(o.token_ids) for o in outs], [o.outputs[0].logprobs for o in outs], llm.engine


@torch.inference_mode()
def logits_steps(loaded) -> list[torch.Tensor]:
    """Logits of a batched prefill and two decode steps straight through the loaded model (hooks included)."""
    from r1deploy.core.forward_batch import ForwardBatch

    model, config = loaded.model, loaded.config
    kv = [torch.zeros(model.kv_cache_spec.shape(16, 4)) for _ in range(config.num_hidden_layers)]
    seqs, tables = [[5, 9, 13, 40], [7, 7, 7], [11]], [[0, 1], [2, 3], [4, 5]]
    chunks, cached, out = seqs, [0, 0, 0], []
    for step in range(3):
        batch = ForwardBatch.build(chunks, cached, tables, 4)
        out.append(model.compute_logits(model(batch, kv)))
        cached = [c + len(x) for c, x in zip(cached, chunks, strict=True)]
        chunks = [[20 + step + i] for i in range(len(seqs))]
    return out


@pytest.mark.parametrize("which", ["llama", "deepseek"])
def test_streamed_equals_resident_through_engine(which: str, llama_dir: Path, deepseek_dir: Path) -> None:
    path = llama_dir if which == "llama" else deepseek_dir
    tokens, logprobs, resident = generate(path, None)
    offload = OffloadConfig(one_resident_budget_gb(path), target="layers")
    got_tokens, got_logprobs, engine = generate(path, offload)
    assert got_tokens == tokens
    assert got_logprobs == logprobs  # exact: same dtype, same arithmetic
    model = engine.loaded.model
    stream = model.offload_store
    assert isinstance(stream, LayerStream) and model.capabilities.cuda_graphs is False
    assert resident.loaded.model.capabilities.cuda_graphs is True and resident.loaded.model.offload_store is None
    num_layers = len(model.model.layers)
    stats = stream.stats()
    assert isinstance(stats, TierStats)  # what /metrics and the bench report read
    assert (stats.resident_layers, stats.streamed_layers, stats.gpu_slots) == (1, num_layers - 1, 2)
    # Every streamed layer use is a prefetch hit or a copy at use; every copy moves one layer's bytes.
    sizes = [layer_nbytes(layer) for layer in stream.layers]
    assert stats.layers_streamed == stats.misses + stats.prefetches
    assert stats.hits > 0 and stats.misses >= 1 and stats.prefetch_hits == stats.hits
    assert stats.bytes_to_device >= stats.layers_streamed * min(sizes)
    assert stats.bytes_to_device <= stats.layers_streamed * max(sizes)
    assert stats.evictions == stats.layers_streamed - 2  # the first two copies filled empty slots
    assert stats.disk_reads == 0 and stats.host_slots == num_layers - 1 and stats.host_bytes == sum(sizes)
    for a, b in zip(logits_steps(engine.loaded), logits_steps(resident.loaded), strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    # Parameters point back at the host copy between layers: the state dict is the resident model's.
    ref = resident.loaded.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref[name]), name
    resident.shutdown()
    engine.shutdown()


def test_engine_shutdown_releases_host_memory(llama_dir: Path) -> None:
    offload = OffloadConfig(one_resident_budget_gb(llama_dir), target="layers")
    _, _, engine = generate(llama_dir, offload)
    stream = engine.loaded.model.offload_store
    before = stream.stats()
    assert before.host_bytes > 0 and before.pinned_bytes in (0, before.host_bytes)  # pinned where CUDA is up
    host_refs = [weakref.ref(t) for t in stream._host]
    slot_refs = [weakref.ref(t) for t in stream._slots]
    engine.shutdown()
    gc.collect()
    assert all(r() is None for r in host_refs + slot_refs)
    after = stream.stats()
    assert (after.host_bytes, after.pinned_bytes, after.host_slots, after.gpu_slots) == (0, 0, 0, 0)
    stream.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        stream._before(0)


def _tiny_llama():
    from r1deploy.models.loader import build_model

    hf = make_hf_model("llama")
    raw = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 5}
    model, config = build_model(raw, torch.float32, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model, config


@pytest.mark.parametrize("kwargs", [
    {"num_slots": 2},
    {"num_slots": 3},  # two layers ahead
    {"num_slots": 2, "prefetch_depth": 0},  # no prefetch: every use copies
    {"num_slots": 2, "host_budget_bytes": 0},  # every streamed layer memory-mapped from the spill file
])
def test_ring_variants_equal_resident(kwargs: dict, tmp_path: Path) -> None:
    from r1deploy.models.loader import LoadedModel

    model, config = _tiny_llama()
    want = logits_steps(LoadedModel(model, config, None, (2,), "tiny"))
    stream = LayerStream(list(model.model.layers), "cpu", num_resident=1, spill_dir=tmp_path, **kwargs)
    got = logits_steps(LoadedModel(model, config, None, (2,), "tiny"))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    s = stream.stats()
    uses = 3 * 4  # three forwards x four streamed layers
    assert s.hits + s.misses == uses
    if kwargs.get("prefetch_depth") == 0:
        assert s.misses == uses and s.prefetches == 0
    else:
        assert s.misses == 1  # only the very first streamed layer: the ring wraps over steps
        assert s.prefetches == s.layers_streamed - 1 and s.stall_s > 0
    if kwargs.get("host_budget_bytes") == 0:
        assert s.disk_layers == 4 and s.disk_reads == s.layers_streamed and s.host_bytes == 0
        assert s.bytes_from_disk == s.bytes_to_device and any(tmp_path.iterdir())
    stream.reset_stats()
    assert stream.stats().layers_streamed == 0
    stream.close()
    if kwargs.get("host_budget_bytes") == 0:
        assert not any(tmp_path.iterdir())  # the spill files go with the stream


def test_order_change_restarts_the_ring() -> None:
    """A forward that skips layers (or one that raised halfway) must not consume the wrong prefetched slot."""
    model, _ = _tiny_llama()
    layers = list(model.model.layers)
    stream = LayerStream(layers, "cpu", num_resident=1)
    want_w = [p.clone() for p in layers[3].parameters()]
    stream._before(0)  # streamed layer 0 = model layer 1; prefetches streamed layer 1
    stream._before(2)  # out of order: a miss, not streamed layer 1's slot
    assert [torch.equal(p, w) for p, w in zip(layers[3].parameters(), want_w, strict=True)] == [True] * len(want_w)
    assert stream.stats().misses == 2
    stream.close()


def test_budget_split() -> None:
    assert resident_prefix([10, 10, 10], 5, 100) == 3  # everything fits: nothing streams
    assert resident_prefix([10, 10, 10, 10], 5, 35) == 1  # 5 + 10 + 2 x 10
    assert resident_prefix([10, 10, 10, 10], 5, 34) == 0  # 5 + 2 x 10
    assert resident_prefix([2, 2, 10, 10, 10], 0, 24) == 2  # small leading (dense) layers stay, slots sized to the rest
    with pytest.raises(ValueError, match="budget"):
        resident_prefix([10, 10, 10], 5, 24)
    model, _ = _tiny_llama()
    assert LayerStream.attach(model, "cpu", gpu_budget_bytes=10**12) is None  # fits: no stream, graphs stay on
    assert model.offload_store is None and model.capabilities.cuda_graphs is True


def test_load_model_streams_dummy_weights(llama_dir: Path) -> None:
    offload = OffloadConfig(one_resident_budget_gb(llama_dir), target="layers")
    loaded = load_model(str(llama_dir), dtype="float32", load_format="dummy", offload=offload)
    stream = loaded.model.offload_store
    assert isinstance(stream, LayerStream) and stream.num_resident == 1
    stream.close()


def test_budget_too_small_is_one_line(llama_dir: Path) -> None:
    from r1deploy.errors import UsageError

    with pytest.raises(UsageError, match="--offload layers: the GPU weight budget"):
        load_model(str(llama_dir), dtype="float32", load_format="dummy",
                   offload=OffloadConfig(one_resident_budget_gb(llama_dir) / 3, target="layers"))


def test_offload_config_target() -> None:
    assert OffloadConfig(1.0).target == "experts"
    with pytest.raises(ValueError, match="target"):
        OffloadConfig(1.0, target="attention")
    with pytest.raises(ValueError, match="num_slots"):
        OffloadConfig(1.0, target="layers", num_slots=1)


def test_serve_flags_build_layer_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from r1deploy.server import cli as serve_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serve_cli.register(sub)
    args = parser.parse_args(["serve", "m", "--offload", "layers", "--gpu-weight-budget", "60",
                              "--host-weight-budget", "100"])
    assert args.offload == "layers"
    config = serve_cli.offload_config(args)
    assert (config.target, config.gpu_weight_budget_gb, config.host_weight_budget_gb) == ("layers", 60.0, 100.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--offload", "attention"])


def test_bench_flags_build_layer_offload() -> None:
    import argparse

    from r1deploy.bench import benchmark
    from r1deploy.bench import cli as bench_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench_cli.register(sub)
    args = parser.parse_args(["bench", "--model", "x", "--offload", "layers", "--gpu-weight-budget", "60"])
    config = benchmark._offload_config(args)
    assert (config.target, config.gpu_weight_budget_gb) == ("layers", 60.0)


def test_deepseek_experts_move_with_their_layer(deepseek_dir: Path) -> None:
    offload = OffloadConfig(one_resident_budget_gb(deepseek_dir), target="layers")
    loaded = load_model(str(deepseek_dir), dtype="float32", offload=offload)
    stream = loaded.model.offload_store
    moe = loaded.model.model.layers[2].mlp
    assert any(p is moe.experts.gate_up_proj for p in stream._params[1])  # streamed with layer 2
    assert moe.experts.gate_up_proj.data_ptr() in range(stream._host[1].data_ptr(),
                                                        stream._host[1].data_ptr() + stream._host[1].nbytes)
    driver = PagedDriver(loaded.model)
    driver.step([[1, 2, 3]], [0], [[]])
    assert stream.stats().layers_streamed >= 2
    stream.close()
