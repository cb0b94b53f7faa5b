"""The Triton attention backends against the Torch ones (the one reference), through the backend protocol:
decode, speculative verify (1+k query tokens per sequence on the decode path) and mixed prefill steps, over
ordinary and FP8 caches; plus the decode kernels' query-length axis directly. Small shapes: without a GPU
they run in Triton's interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_inputs import DEVICE, SMALL, paged_cache, rel_err

from r1deploy.attention import mla_torch, torch_backend
from r1deploy.attention.selector import make_attention_backend
from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.kernels.decode_attention import decode_attention
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE, quantize_kv
from r1deploy.kernels.mla_decode import mla_absorbed_decode

MLA = {"heads": 4, "dc": 32, "dr": 8, "dn": 16, "dv": 12}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_decode_kernel_query_axis() -> None:
    """Three query rows per sequence, each seeing one more token than the row before; sequence 2 is shorter
    than its query (a graph's padding row: its early rows see nothing and come out as zeros). FP8 caches
    through the query axis: test_gqa_backends_agree."""
    query_len, seq_lens = 3, [37, 5, 1, 8]
    cache, tables = paged_cache(seq_lens, SMALL["num_kv_heads"], SMALL["head_dim"], SMALL["block_size"],
                                torch.float32, table_width=12)
    q = torch.randn(len(seq_lens) * query_len, SMALL["num_heads"], SMALL["head_dim"], generator=_gen(1)).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = SMALL["head_dim"] ** -0.5
    out = decode_attention(q, cache, tables, lens, scale, partition_size=16, query_len=query_len)
    ref = torch_backend.decode_attention(q.double(), cache.double(), tables, lens, scale, query_len=query_len)
    assert rel_err(out, ref) < 1e-5
    assert bool((out[6:8] == 0).all()) and bool(out[8].abs().sum() > 0)  # sequence 2: rows 0, 1 see nothing


def test_torch_decode_query_axis_matches_varlen() -> None:
    """The Torch backend's two paths agree on a verify step: q rows per sequence through the decode path
    and through the per-sequence varlen path (bottom-right causal)."""
    query_len, seq_lens = 4, [9, 30, 4]
    cache, tables = paged_cache(seq_lens, SMALL["num_kv_heads"], SMALL["head_dim"], SMALL["block_size"],
                                torch.float64)
    q = torch.randn(len(seq_lens) * query_len, SMALL["num_heads"], SMALL["head_dim"], dtype=torch.float64,
                    generator=_gen(2)).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    decode = torch_backend.decode_attention(q, cache, tables, lens, 0.3, query_len=query_len)
    varlen = torch_backend.varlen_attention(q, cache, tables, [query_len] * 3, seq_lens, 0.3)
    assert rel_err(decode, varlen) < 1e-12


@pytest.mark.parametrize("query_len", [1, 3])
def test_mla_decode_kernel_query_axis(query_len: int) -> None:
    seq_lens = [37, 2, 13]
    block_size = 4
    num_blocks = 32
    cache = torch.randn(num_blocks, block_size, MLA["dc"] + MLA["dr"], generator=_gen(3)).to(DEVICE)
    tables = torch.randperm(num_blocks, generator=_gen(4))[:30].view(3, 10).int().to(DEVICE)
    rows, heads = len(seq_lens) * query_len, MLA["heads"]
    q_nope = torch.randn(rows, heads, MLA["dn"], generator=_gen(5)).to(DEVICE)
    q_pe = torch.randn(rows, heads, MLA["dr"], generator=_gen(6)).to(DEVICE)
    kv_b = (torch.randn(heads * (MLA["dn"] + MLA["dv"]), MLA["dc"], generator=_gen(7)) * MLA["dc"] ** -0.5).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = mla_absorbed_decode(q_nope, q_pe, cache, tables, lens, kv_b, 0.2, num_splits=3, query_len=query_len)
    ref = mla_torch.absorbed_decode(q_nope.double(), q_pe.double(), cache.double(), tables, lens, 40,
                                    kv_b.double(), 0.2, query_len=query_len)
    assert rel_err(out, ref) < 1e-5


# --- the backends through the protocol -----------------------------------------------------------------

# (new tokens per sequence, tokens already cached): a decode step, a verify step of 1+2 tokens, a mixed
# step (a chunk over a cached prefix, a fresh prompt, a decode token).
STEPS = {"decode": ([1, 1, 1], [20, 3, 9]), "verify": ([3, 3, 3], [20, 3, 9]), "mixed": ([6, 9, 1], [12, 0, 7])}


def _batch(step: str, seed: int) -> ForwardBatch:
    query_lens, cached = STEPS[step]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(3)]
    chunks = [torch.randint(0, 50, (n,), generator=_gen(seed + i)).tolist() for i, n in enumerate(query_lens)]
    return ForwardBatch.build(chunks, cached, tables, 4, DEVICE)


@pytest.mark.parametrize("cache_dtype", [torch.float32, FP8_KV_DTYPE], ids=["fp32", "fp8"])
@pytest.mark.parametrize("step", list(STEPS))
def test_gqa_backends_agree(step: str, cache_dtype: torch.dtype) -> None:
    batch = _batch(step, 10)
    heads, kv_heads, dim = SMALL["num_heads"], SMALL["num_kv_heads"], SMALL["head_dim"]
    base = torch.randn(2, 24, 4, kv_heads, dim, generator=_gen(11)).to(DEVICE)
    base = quantize_kv(base * 2, 0.5, cache_dtype)
    t = batch.num_tokens
    q = torch.randn(t, heads, dim, generator=_gen(12)).to(DEVICE)
    k, v = (torch.randn(t, kv_heads, dim, generator=_gen(13 + i)).to(DEVICE) for i in range(2))
    outs, caches = [], []
    for name in ("torch", "triton"):
        backend = make_attention_backend(name, "gqa")
        metadata = backend.build_metadata(batch)
        assert metadata.decode_query_len == {"decode": 1, "verify": 3, "mixed": 0}[step]
        cache = base.clone()
        outs.append(backend.forward(q, k, v, cache, metadata, dim**-0.5, k_scale=0.5, v_scale=0.5))
        caches.append(cache)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    assert rel_err(outs[1], outs[0]) < 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float32, FP8_KV_DTYPE], ids=["fp32", "fp8"])
@pytest.mark.parametrize("step", list(STEPS))
def test_mla_backends_agree(step: str, cache_dtype: torch.dtype) -> None:
    batch = _batch(step, 20)
    heads, dc, dr, dn, dv = MLA["heads"], MLA["dc"], MLA["dr"], MLA["dn"], MLA["dv"]
    base = quantize_kv(torch.randn(24, 4, dc + dr, generator=_gen(21)).to(DEVICE), 0.25, cache_dtype)
    t = batch.num_tokens
    q_nope = torch.randn(t, heads, dn, generator=_gen(22)).to(DEVICE)
    q_pe = torch.randn(t, heads, dr, generator=_gen(23)).to(DEVICE)
    latent, k_pe = torch.randn(t, dc, generator=_gen(24)).to(DEVICE), torch.randn(t, dr, generator=_gen(25)).to(DEVICE)
    kv_b = (torch.randn(heads * (dn + dv), dc, generator=_gen(26)) * dc**-0.5).to(DEVICE)
    outs, caches = [], []
    for name in ("torch", "triton"):
        backend = make_attention_backend(name, "mla")
        metadata = backend.build_metadata(batch)
        assert metadata.decode_query_len == {"decode": 1, "verify": 3, "mixed": 1}[step]
        assert len(metadata.prefills) == (2 if step == "mixed" else 0)
        cache = base.clone()
        outs.append(backend.forward(q_nope, q_pe, latent, k_pe, cache, metadata, kv_b, 0.2, kv_scale=0.25))
        caches.append(cache)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    assert rel_err(outs[1], outs[0]) < 1e-5


# --- whole models: the same steps through either backend -------------------------------------------------

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": False}
TINY_DEEPSEEK = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 64, "hidden_size": 32,
                 "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
                 "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 16,
                 "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
                 "n_routed_experts": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2,
                 "n_shared_experts": 1, "max_position_embeddings": 128, "rope_theta": 10000.0}


@pytest.mark.parametrize(("raw", "cache_dtype"), [(TINY_LLAMA, torch.float32), (TINY_DEEPSEEK, FP8_KV_DTYPE)],
                         ids=["llama-fp32", "deepseek-fp8"])
@torch.inference_mode()
def test_model_logits_agree_across_backends(raw: dict, cache_dtype: torch.dtype) -> None:
    """A mixed prefill, a verify step of 3 tokens per sequence and a decode step: the engine's metadata from
    either backend gives the same logits and caches (the first layer's bytes for bytes: its K/V do not depend
    on any attention output)."""
    from r1deploy.models.loader import build_model

    torch.manual_seed(0)
    model, config = build_model(raw, torch.float32, torch.device(DEVICE))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * param.shape[-1] ** -0.5)
    shape = model.kv_cache_spec.shape(16, 4)
    tables = [list(range(8)), list(range(8, 16))]
    steps = [([[3, 5, 7, 9, 11], [2, 4]], [0, 0]), ([[13, 15, 17], [6, 8, 10]], [5, 2]),
             ([[19], [12]], [8, 5])]
    results = {}
    for name in ("torch", "triton"):
        backend = make_attention_backend(name, model.attention_kind)
        caches = [torch.zeros(shape, device=DEVICE).to(cache_dtype) for _ in range(config.num_hidden_layers)]
        logits = []
        for chunks, cached in steps:
            batch = ForwardBatch.build(chunks, cached, tables, 4, DEVICE)
            batch = dataclasses.replace(batch, attn_metadata=backend.build_metadata(batch))
            logits.append(model.compute_logits(model(batch, caches)))
        results[name] = (torch.cat(logits), caches)
    (ref, ref_caches), (out, out_caches) = results["torch"], results["triton"]
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(ref_caches[0].view(torch.uint8), out_caches[0].view(torch.uint8))
    for a, b in zip(ref_caches, out_caches, strict=True):
        assert rel_err(b.float(), a.float()) < (1e-2 if cache_dtype == FP8_KV_DTYPE else 1e-5)
