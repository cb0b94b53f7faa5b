"""AWQ INT4 weights and the FP8 KV cache at the R1-Distill-Qwen-7B shape, random weights, one GPU (issue 9).

awq: the 7B model with random bf16 weights (weights.dummy's Normal(0, 0.02)), quantised in memory to an
AutoAWQ GEMM checkpoint (group 128, AutoAWQ's min/max zero-point rounding, packed by
r1deploy.quant.awq.pack_awq, HF tensor names: q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj
.qweight/.qzeros/.scales). The engine picks AWQ from config.json's quantization_config (ModelConfig ->
quant_config_from_hf -> AWQLinearMethod per linear); dummy weights cannot fill int32 qweights, so the AWQ
model is built from the preset config plus that quantization_config (models.loader.build_model) and filled
by load_weights, then wrapped in an LLMEngine (LLMEngine(loaded=...)), CUDA graphs on as by default.
Correctness first, two comparisons on a 128-token prompt (relative error, argmax agreement):
  * the gate: AWQ vs its dequantised twin, a plain model whose linears hold exactly the dequantised AWQ
    weights (W = (q - z) * s): equal up to rounding if our AWQ path (packing, qzeros, shard offsets, bias,
    groups, kernels) is right; plus each AWQ linear of the first and last layer against x @ W_deq in fp32
    through both kernels (the fused one at 8 tokens, dequantise + GEMM at 128);
  * the quantisation error: AWQ vs the bf16 model. Random N(0, 0.02) weights are 4-bit's worst case (~10%
    error per linear) and at 7B width each layer's output is ~100x the embedding, so the residual stream is
    made of quantised layer outputs and the error compounds: ~0.33 after one layer, ~1 at the logits after
    28 layers (argmax agreement near 0). That is the quantisation of an untrained model, not a bug; a trained
    checkpoint's AWQ error is far smaller. Judge correctness by the twin, never by this number.
Then batch-1 decode (prompt 128, 256 new tokens, greedy, EOS ignored) for bf16 and AWQ, and the
greedy-token agreement of those two 256-token outputs.

fp8kv: one dummy-weight model, two engines around it: kv_cache_dtype "auto" (bf16) and "fp8": KV capacity in
tokens, and the W1 offline workload (256 requests, prompts uniform in [100, 1024] by random.Random(0), 512
new tokens, greedy, EOS ignored; helpers from benchmarks/h200_dense.py). Correctness first: a 128-token
prefill and 64 greedy decode steps on a bf16 cache, the same tokens teacher-forced through an FP8 cache
(logits relative error, argmax agreement), and the FP8 cache's own 64 greedy tokens against bf16's.

    python3 benchmarks/h200_quant.py --out $OUT/quant_7b.json                  # H200, ~3-4 minutes
    python3 benchmarks/h200_quant.py --smoke --out /tmp/quant.json             # tiny Qwen2 on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from h200_dense import random_prompts, timed_generate

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine_config import EngineConfig
from r1deploy.kernels.awq_gemm import awq_gemm_ref
from r1deploy.models.loader import LoadedModel, build_model
from r1deploy.presets import resolve_config_path
from r1deploy.quant.awq import pack_awq
from r1deploy.weights import load_weights
from r1deploy.weights.dummy import init_dummy_weights

GROUP_SIZE = 128
BLOCK = 16
SMOKE_CONFIG = {  # Qwen2 layout at toy width (AWQ needs in_features % 128 == 0)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
}
QUANTISED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
             "o_proj": ("o_proj",), "down_proj": ("down_proj",)}


def header(argv: list[str]) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"command": " ".join([Path(sys.executable).name, *argv]),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def wrap(model: torch.nn.Module, config: Any, name: str, engine_config: EngineConfig, device: str) -> LLM:
    """An LLM around a model built here (as h200_dense wraps its engine)."""
    loaded = LoadedModel(model, config, None, config.eos_token_ids, name)
    llm = LLM.__new__(LLM)
    llm.engine = LLMEngine(name, config=engine_config, device=device, loaded=loaded)
    return llm


# ---- AWQ ---------------------------------------------------------------------------------------------


def awq_quantize(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """weight [out, in] -> AutoAWQ GEMM tensors (pseudo_quantize_tensor + WQLinear_GEMM.from_linear):
    qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]."""
    out_f, in_f = weight.shape
    w = weight.float().reshape(-1, group_size)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).view(out_f, in_f // group_size)
    zeros = (-torch.round(min_val / scales.reshape(-1, 1))).clamp(0, 15).view(out_f, in_f // group_size)
    scales16 = scales.half()
    s_full = scales16.float().repeat_interleave(group_size, dim=1)
    z_full = zeros.repeat_interleave(group_size, dim=1)
    del w, max_val, min_val
    intweight = torch.clamp(torch.round(weight.float() / s_full) + z_full, 0, 15).to(torch.int32)
    return {"qweight": pack_awq(intweight.t().contiguous()), "qzeros": pack_awq(zeros.to(torch.int32).t().contiguous()),
            "scales": scales16.t().contiguous()}


def awq_checkpoint(model: torch.nn.Module, config: Any, group_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of an AutoAWQ checkpoint of `model` (merged projections split back by shard)."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    splits = {"qkv_proj": (q, kv, kv), "gate_up_proj": (inter, inter)}
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        prefix, _, merged = module.rpartition(".")
        if merged not in QUANTISED:
            yield name, param.detach()
            continue
        parts = param.detach().split(splits[merged], dim=0) if merged in splits else (param.detach(),)
        for hf, part in zip(QUANTISED[merged], parts, strict=True):
            if kind == "bias":
                yield f"{prefix}.{hf}.bias", part
            else:
                for suffix, tensor in awq_quantize(part, group_size).items():
                    yield f"{prefix}.{hf}.{suffix}", tensor


def dequantised_twin(raw: dict[str, Any], awq: torch.nn.Module, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A plain (unquantised) model whose linears hold the AWQ model's dequantised weights (in dtype, rounded once
    from the exact value as the kernels round) and which shares every other tensor with `awq`."""
    twin, _ = build_model(raw, dtype, torch.device(device))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, module in awq.named_modules():
            if getattr(module, "quant_method", None) is not None:
                params[f"{name}.weight"].data = module.quant_method.dequantized_weight(module, dtype)  # [out, in]
        for name, param in awq.named_parameters():
            if name in params:
                params[name].data = param.data
    return twin


@torch.inference_mode()
def linear_errors(awq: torch.nn.Module, twin: torch.nn.Module, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Max relative error of each AWQ linear (first and last layer) against fp32 x @ W_deq + b, for 1 token
    (the GEMV kernel on CUDA), 8 (the tensor-core tile kernel) and 128 (dequantise + GEMM)."""
    gen = torch.Generator().manual_seed(4)
    worst: dict[str, float] = {}
    last = len(awq.model.layers) - 1
    for layer in (0, last):
        for sub in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{sub}"
            a, t = awq.get_submodule(name), twin.get_submodule(name)
            for m in (1, 8, 128):
                x = torch.randn(m, t.in_features, generator=gen).to(device, dtype)
                want = x.float() @ t.weight.float().t() + (t.bias.float() if t.bias is not None else 0)
                err = float((a(x).float() - want).norm() / want.norm())
                key = f"tokens_{m}"
                worst[key] = max(worst.get(key, 0.0), err)
    return worst


def prompt_logits(model: torch.nn.Module, config: Any, prompt: list[int], device: str,
                  kv_dtype: torch.dtype) -> torch.Tensor:
    blocks = -(-len(prompt) // BLOCK)
    caches = [torch.zeros(model.kv_cache_spec.shape(blocks, BLOCK), dtype=kv_dtype, device=device)
              for _ in range(config.num_hidden_layers)]
    batch = ForwardBatch.build([prompt], [0], [list(range(blocks))], BLOCK, device)
    with torch.inference_mode():
        return model.compute_logits(model(batch, caches)).float()


def decode_tok_s(llm: LLM, vocab: int, prompt_len: int, new: int, rng: random.Random) -> tuple[float, float, list]:
    runs = [timed_generate(llm, random_prompts(rng, vocab, [prompt_len]), new) for _ in range(3)]
    seconds = statistics.median(r[0] for r in runs[1:])
    out = runs[-1][1][0]
    itl = [b - a for a, b in zip(out.metrics.token_times, out.metrics.token_times[1:])]
    return new / seconds, statistics.median(itl) * 1e3 if itl else float("nan"), list(out.token_ids)


def greedy_tokens(llm: LLM, prompt: list[int], new: int) -> list[int]:
    return list(timed_generate(llm, [prompt], new)[1][0].token_ids)


def agreement(a: list[int], b: list[int]) -> dict[str, float]:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"positionwise": sum(x == y for x, y in zip(a, b)) / max(len(a), 1), "prefix": first}


def sweep_awq_decode(raw: dict[str, Any], dtype: torch.dtype, result: dict[str, Any]) -> None:
    """The batch-1 AWQ kernels at this shape's four projections (qkv with its bias, o, gate_up, down) under
    each decode tuning, against torch's bf16 F.linear at the same shapes, all timed as CUDA-graph replays
    (as the engine runs decode); the fastest tuning becomes the kernels' default for the engine runs that
    follow (recorded; a committed default comes from this sweep)."""
    from triton.testing import do_bench_cudagraph

    from r1deploy.kernels import awq_gemm as kernels

    h, inter = raw["hidden_size"], raw["intermediate_size"]
    heads, kv_heads = raw["num_attention_heads"], raw["num_key_value_heads"]
    head = h // heads
    shapes = {"qkv": (h, (heads + 2 * kv_heads) * head), "o": (h, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {}
    for name, (k, n) in shapes.items():
        packed = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=gen, device="cuda",
                               dtype=torch.int64).to(torch.int32)
        zeros = torch.randint(0, 16, (n, k // GROUP_SIZE), generator=gen, device="cuda", dtype=torch.uint8)
        scales = torch.rand(n, k // GROUP_SIZE, device="cuda", generator=gen).half() * 0.01
        bias = torch.randn(n, device="cuda", dtype=dtype) if name == "qkv" else None
        tensors[name] = (torch.randn(1, k, device="cuda", dtype=dtype), (packed, zeros, scales), bias,
                         torch.randn(n, k, device="cuda", dtype=dtype))
    bench = lambda fn: 1e3 * do_bench_cudagraph(fn, rep=20)
    bf16_us = {name: bench(lambda t=t: torch.nn.functional.linear(t[0], t[3], t[2])) for name, t in tensors.items()}

    def measure(tuning: Any) -> dict[str, Any]:
        """A tuning whose kernel fails or is wrong (beyond bf16 rounding) is recorded, never chosen."""
        times = {}
        for name, (x, weights, bias, _) in tensors.items():
            ref = awq_gemm_ref(x.float(), *weights, GROUP_SIZE, None if bias is None else bias.float())
            call = lambda x=x, weights=weights, bias=bias: kernels.awq_gemm(x, *weights, GROUP_SIZE, bias,
                                                                             tuning=tuning)
            try:
                for _ in range(3):  # repeated launches too: the semaphore's counters must reset
                    err = float((call().float() - ref).norm() / ref.norm())
                    if not err <= 1e-2:
                        raise AssertionError(f"{name}: rel. error {err:.3e}")
                times[name] = bench(call)
            except Exception as e:  # noqa: BLE001 - the sweep goes on; the error is in the JSON
                print(f"awq sweep: {tuning} failed: {e}", flush=True)
                return {"tuning": dataclasses.asdict(tuning), "error": repr(e)[:500], "layer_us": float("inf")}
        return {"tuning": dataclasses.asdict(tuning), "us": times, "layer_us": sum(times.values())}

    rows = [measure(kernels.AwqDecodeTuning(gemv_max_tokens=0))]  # the tensor-core tile kernel at one token
    rows += [measure(kernels.AwqDecodeTuning(gemv_block_n=bn, gemv_num_warps=w, programs_per_sm=pps))
             for bn in (64, 128, 256) for w in (2, 4, 8) for pps in (4, 8, 16)]
    best = min(rows[1:], key=lambda r: r["layer_us"])
    rows.append(measure(kernels.AwqDecodeTuning(**dict(best["tuning"], semaphore=False))))  # + a reduction kernel
    best = min(rows, key=lambda r: r["layer_us"])
    kernels.DECODE_TUNING = kernels.AwqDecodeTuning(**best["tuning"])
    bf16_layer = sum(bf16_us.values())
    weight_bytes = {name: t[1][0].numel() * 4 + t[1][1].numel() + t[1][2].numel() * 2 for name, t in tensors.items()}
    result["awq_decode_sweep"] = {"shapes_k_n": shapes, "timing": "triton.testing.do_bench_cudagraph",
                                  "bf16_us": bf16_us, "bf16_layer_us": bf16_layer, "candidates": rows, "best": best,
                                  "best_weight_TB_s": {name: weight_bytes[name] / best["us"][name] / 1e6
                                                       for name in shapes},
                                  "best_speedup_over_bf16_per_layer": bf16_layer / best["layer_us"]}
    result["awq_decode_sweep"]["token_rows"] = awq_paths_by_token_rows(tensors, kernels, bench)
    print(f"awq sweep: bf16 layer {bf16_layer:.1f} us {bf16_us}; best AWQ layer {best['layer_us']:.1f} us "
          f"({bf16_layer / best['layer_us']:.2f}x) {best['us']} with {best['tuning']}; tile kernel at M=1: "
          f"{rows[0]['layer_us']:.1f} us; without the semaphore {rows[-1]['layer_us']:.1f} us", flush=True)


def awq_paths_by_token_rows(tensors: dict[str, Any], kernels: Any, bench: Any) -> dict[str, Any]:
    """Per layer (the four projections) at 2..32 token rows: the GEMV kernel (one program row per token),
    the tensor-core tile kernel (two tile shapes), dequantise + cuBLAS, and bf16: where each path should
    take over (AwqDecodeTuning.gemv_max_tokens, quant/awq.FUSED_MAX_TOKENS)."""
    from r1deploy.kernels.awq_gemm import awq_dequantize

    table = {}
    for m in (2, 4, 8, 16, 32):
        base = dataclasses.asdict(kernels.DECODE_TUNING)
        paths = {"gemv": dict(base, gemv_max_tokens=32),
                 "tile_m16_n64": dict(base, gemv_max_tokens=0, tile_block_m=16),
                 "tile_m16_n128": dict(base, gemv_max_tokens=0, tile_block_m=16, tile_block_n=128),
                 "tile_m32_n64": dict(base, gemv_max_tokens=0, tile_block_m=32)}
        row = {}
        for label, fields in paths.items():
            tuning = kernels.AwqDecodeTuning(**fields)
            total = 0.0
            for name, (x1, weights, bias, _) in tensors.items():
                x = x1.expand(m, -1).contiguous()
                try:
                    total += bench(lambda x=x, weights=weights, bias=bias, tuning=tuning:
                                   kernels.awq_gemm(x, *weights, GROUP_SIZE, bias, tuning=tuning))
                except Exception as e:  # noqa: BLE001 - recorded, the table goes on
                    total = float("nan")
                    row[label + "_error"] = repr(e)[:300]
                    break
            row[label] = total
        row["dequant_cublas"] = sum(bench(lambda x=x1.expand(m, -1).contiguous(), weights=weights, bias=bias:
                                          torch.nn.functional.linear(x, awq_dequantize(*weights, GROUP_SIZE, x.dtype),
                                                                     bias))
                                    for x1, weights, bias, _ in tensors.values())
        row["bf16"] = sum(bench(lambda x=x1.expand(m, -1).contiguous(), w=w, bias=bias:
                                torch.nn.functional.linear(x, w, bias)) for x1, _, bias, w in tensors.values())
        table[m] = row
        print(f"awq paths at {m} token rows (us per layer): " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                                        if isinstance(v, float)), flush=True)
    return table


def run_awq(raw: dict[str, Any], name: str, device: str, dtype: torch.dtype, sizes: dict[str, int],
            result: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ref, config = build_model(raw, dtype, torch.device(device))
    init_dummy_weights(ref)  # what load_format="dummy" gives
    awq_raw = dict(raw, quantization_config={"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE,
                                              "zero_point": True, "version": "gemm"})
    start = time.perf_counter()
    awq, awq_config = build_model(awq_raw, dtype, torch.device(device))
    load_weights(awq, awq_checkpoint(ref, config, GROUP_SIZE))
    sync()
    r = result["awq"] = {"group_size": GROUP_SIZE, "quantise_and_load_s": time.perf_counter() - start}
    bytes_of = lambda m: sum(t.numel() * t.element_size() for t in m.parameters())
    r.update(bf16_weights_GB=bytes_of(ref) / 1e9, awq_weights_GB=bytes_of(awq) / 1e9)
    qkv = awq.model.layers[0].self_attn.qkv_proj
    r["awq_layer_has_qweight"] = getattr(qkv, "weight_packed", None) is not None and qkv.quant_method is not None

    rng = random.Random(0)
    prompt = [rng.randrange(config.vocab_size) for _ in range(sizes["check_len"])]
    rel = lambda a, b: float((a - b).norm() / b.norm())
    agree = lambda a, b: float((a.argmax(-1) == b.argmax(-1)).float().mean())
    twin = dequantised_twin(raw, awq, dtype, device)
    r["linear_rel_error_vs_dequantised"] = linear_errors(awq, twin, device, dtype)
    deq = prompt_logits(twin, config, prompt, device, dtype)
    del twin
    release()
    want = prompt_logits(ref, config, prompt, device, dtype)
    got = prompt_logits(awq, awq_config, prompt, device, dtype)
    r["logits_rel_error_vs_dequantised"] = rel(got, deq)  # the correctness gate: our AWQ path
    r["argmax_agreement_vs_dequantised"] = agree(got, deq)
    r["logits_rel_error_vs_bf16"] = rel(got, want)  # the quantisation error (with our path's, tiny)
    r["argmax_agreement_vs_bf16"] = agree(got, want)
    r["dequantised_logits_rel_error_vs_bf16"] = rel(deq, want)  # the quantisation error alone
    print(f"awq: vs dequantised twin (correctness): logits rel. error {r['logits_rel_error_vs_dequantised']:.3e}, "
          f"argmax agreement {r['argmax_agreement_vs_dequantised']:.3f}, per-linear max rel. error "
          f"{r['linear_rel_error_vs_dequantised']}", flush=True)
    print(f"awq: vs bf16 (4-bit quantisation error of random weights): logits rel. error "
          f"{r['logits_rel_error_vs_bf16']:.3e} (twin vs bf16 {r['dequantised_logits_rel_error_vs_bf16']:.3e}), "
          f"argmax agreement {r['argmax_agreement_vs_bf16']:.3f}", flush=True)
    del want, got, deq

    engine_config = EngineConfig(max_model_len=sizes["prompt"] + sizes["new"] + 64, max_num_seqs=8,
                                 max_num_batched_tokens=2048)
    r["engine_max_num_seqs"] = engine_config.max_num_seqs  # the batch-16 runs are two waves of 8
    tokens = {}
    for label, model, cfg in (("bf16", ref, config), ("awq", awq, awq_config)):
        llm = wrap(model, cfg, f"{name}-{label}", engine_config, device)
        timed_generate(llm, random_prompts(random.Random(1), cfg.vocab_size, [64] * 2), 8)  # warm-up
        tok_s, step_ms, _ = decode_tok_s(llm, cfg.vocab_size, sizes["prompt"], sizes["new"], random.Random(2))
        tokens[label] = greedy_tokens(llm, prompt[: sizes["prompt"]], sizes["new"])
        r[f"{label}_decode_bs1_tok_s"] = tok_s
        r[f"{label}_decode_bs1_median_step_ms"] = step_ms
        r[f"{label}_cuda_graphs"] = llm.engine.runner.graphs is not None
        print(f"awq: {label} batch-1 decode {tok_s:.1f} tok/s (step {step_ms:.2f} ms)", flush=True)
        for batch in (4, 16):  # the tensor-core tile kernel's range (2..32 token rows); 16 runs as 8 + 8
            timed_generate(llm, random_prompts(random.Random(3), cfg.vocab_size, [sizes["prompt"]] * batch), 8)
            seconds, outs = timed_generate(llm, random_prompts(random.Random(4), cfg.vocab_size,
                                                               [sizes["prompt"]] * batch), sizes["new"])
            r[f"{label}_decode_bs{batch}_out_tok_s"] = sum(len(o.token_ids) for o in outs) / seconds
            print(f"awq: {label} batch-{batch} decode {r[f'{label}_decode_bs{batch}_out_tok_s']:.0f} out tok/s",
                  flush=True)
        llm.engine.shutdown()
        del llm
        release()
    r["speedup_awq_over_bf16"] = r["awq_decode_bs1_tok_s"] / r["bf16_decode_bs1_tok_s"]
    r["speedup_awq_over_bf16_bs4_bs16"] = [r[f"awq_decode_bs{b}_out_tok_s"] / r[f"bf16_decode_bs{b}_out_tok_s"]
                                           for b in (4, 16)]
    r["target_speedup"] = 2.5
    r["greedy_agreement_256"] = agreement(tokens["bf16"], tokens["awq"])
    del ref, awq
    release()


# ---- FP8 KV ------------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_with_cache(model: torch.nn.Module, config: Any, prompt: list[int], steps: int, device: str,
                      kv_dtype: torch.dtype, forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Prefill then `steps` decode steps on a fresh paged cache of kv_dtype: (greedy tokens, logits [steps+1, V]).
    forced: feed these tokens instead of the model's own (teacher forcing)."""
    total = len(prompt) + steps + 1
    blocks = -(-total // BLOCK)
    table = list(range(blocks))
    caches = [torch.zeros(model.kv_cache_spec.shape(blocks, BLOCK), dtype=kv_dtype, device=device)
              for _ in range(config.num_hidden_layers)]
    batch = ForwardBatch.build([prompt], [0], [table], BLOCK, device)
    logits = [model.compute_logits(model(batch, caches)[-1:]).float()]
    tokens = [int(logits[-1].argmax(-1))]
    for i in range(steps):
        feed = forced[i] if forced is not None else tokens[-1]
        batch = ForwardBatch.build([[feed]], [len(prompt) + i], [table], BLOCK, device)
        logits.append(model.compute_logits(model(batch, caches)).float())
        tokens.append(int(logits[-1].argmax(-1)))
    return tokens, torch.cat(logits)


def run_fp8kv(shape: str, device: str, dtype: torch.dtype, sizes: dict[str, int], result: dict[str, Any],
              raw: dict[str, Any] | None = None) -> None:
    from r1deploy.kernels.kv_quant import FP8_KV_DTYPE

    r = result["fp8kv"] = {}
    if raw is None:
        raw = json.loads(resolve_config_path(shape).read_text())
    model, config = build_model(raw, dtype, torch.device(device))
    init_dummy_weights(model)
    rng = random.Random(3)
    prompt = [rng.randrange(config.vocab_size) for _ in range(sizes["check_len"])]
    steps = sizes["check_steps"]
    ref_tokens, ref_logits = greedy_with_cache(model, config, prompt, steps, device, dtype)
    _, forced_logits = greedy_with_cache(model, config, prompt, steps, device, FP8_KV_DTYPE, forced=ref_tokens)
    fp8_tokens, _ = greedy_with_cache(model, config, prompt, steps, device, FP8_KV_DTYPE)
    r["logits_rel_error_vs_bf16_kv"] = float((forced_logits - ref_logits).norm() / ref_logits.norm())
    r["argmax_agreement_teacher_forced"] = float((forced_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    r[f"greedy_agreement_{steps}"] = agreement(ref_tokens[1:], fp8_tokens[1:])
    print(f"fp8kv: logits rel. error vs bf16 KV {r['logits_rel_error_vs_bf16_kv']:.3e}, teacher-forced argmax "
          f"agreement {r['argmax_agreement_teacher_forced']:.3f}, greedy {r[f'greedy_agreement_{steps}']}", flush=True)
    del ref_logits, forced_logits
    release()

    vocab = config.vocab_size
    w1 = random.Random(0)
    lengths = [w1.randint(sizes["w1_min"], sizes["w1_max"]) for _ in range(sizes["w1_requests"])]
    prompts = random_prompts(w1, vocab, lengths)  # the same draws, in the same order, as h200_dense's W1
    r["w1"] = {"requests": len(prompts), "in_tokens": sum(lengths), "new_tokens": sizes["w1_new"]}
    for kv in ("auto", "fp8"):
        engine_config = EngineConfig(max_model_len=sizes["max_model_len"], max_num_seqs=256,
                                     max_num_batched_tokens=8192, kv_cache_dtype=kv)
        start = time.perf_counter()
        llm = wrap(model, config, f"{shape}-kv-{kv}", engine_config, device)
        runner = llm.engine.runner
        case = r[kv] = {"startup_s": time.perf_counter() - start, "kv_dtype": str(runner.kv_dtype),
                        "kv_capacity_tokens": llm.engine.kv_capacity_tokens,
                        "kv_pool_budget_GB": runner.pool.budget_bytes / 1e9,
                        "kv_bytes_per_block": runner.pool.bytes_per_block,
                        "cuda_graphs": runner.graphs is not None}
        timed_generate(llm, random_prompts(random.Random(1), vocab, [64] * 4), 8)  # warm-up
        seconds, outputs = timed_generate(llm, prompts, sizes["w1_new"])
        case.update(offline_s=seconds, offline_out_tok_s=sum(len(o.token_ids) for o in outputs) / seconds,
                    offline_preemptions=llm.engine.scheduler.num_preemptions)
        print(f"fp8kv: kv {kv}: capacity {case['kv_capacity_tokens']:,} tokens, W1 {case['offline_out_tok_s']:.0f} "
              f"out tok/s in {seconds:.1f} s, {case['offline_preemptions']} preemptions", flush=True)
        llm.engine.shutdown()
        del llm, outputs
        release()
    r["kv_capacity_ratio"] = r["fp8"]["kv_capacity_tokens"] / r["auto"]["kv_capacity_tokens"]
    r["throughput_ratio"] = r["fp8"]["offline_out_tok_s"] / r["auto"]["offline_out_tok_s"]
    # Capacity per byte of pool, independent of how much memory each engine found free.
    r["kv_bytes_per_token_ratio"] = r["auto"]["kv_bytes_per_block"] / r["fp8"]["kv_bytes_per_block"]
    del model
    release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="r1-distill-qwen-7b")
    parser.add_argument("--only", default="", help="comma list: awq,fp8kv (default both)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="a tiny Qwen2 config on the CPU (checks the script)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only
    smoke = args.smoke
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if not torch.cuda.is_available():  # h200_dense.timed_generate synchronises unconditionally
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    if smoke:
        raw = dict(SMOKE_CONFIG)
        sizes = {"check_len": 32, "prompt": 16, "new": 8, "check_steps": 8, "w1_requests": 6, "w1_min": 10,
                 "w1_max": 40, "w1_new": 6, "max_model_len": 256}
    else:
        raw = json.loads(resolve_config_path(args.shape).read_text())
        sizes = {"check_len": 128, "prompt": 128, "new": 256, "check_steps": 64, "w1_requests": 256, "w1_min": 100,
                 "w1_max": 1024, "w1_new": 512, "max_model_len": 4096}
    result: dict[str, Any] = {**header(sys.argv), "shape": "smoke" if smoke else args.shape, "device": device,
                              "dtype": str(dtype).removeprefix("torch."), "sizes": sizes}

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    start = time.perf_counter()
    if want("awq") and device == "cuda":
        sweep_awq_decode(raw, dtype, result)
        save()
    if want("awq"):
        run_awq(raw, result["shape"], device, dtype, sizes, result)
        save()
    if want("fp8kv"):
        run_fp8kv(args.shape, device, dtype, sizes, result, raw=raw)
        save()
    result["wall_s"] = time.perf_counter() - start
    save()
    print_table(result)


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['gpu']}, torch {result['torch']}, triton {result['triton']}, shape {result['shape']}")
    a = result.get("awq")
    if a:
        print(f"{'AWQ INT4 vs bf16 (batch-1 decode)':<40}{'bf16':>12}{'awq':>12}{'awq/bf16':>10}{'target':>8}")
        print(f"{'  tok/s':<40}{a['bf16_decode_bs1_tok_s']:>12.1f}{a['awq_decode_bs1_tok_s']:>12.1f}"
              f"{a['speedup_awq_over_bf16']:>10.2f}{'>=2.5':>8}")
        print(f"{'  weights GB':<40}{a['bf16_weights_GB']:>12.2f}{a['awq_weights_GB']:>12.2f}")
        g = a["greedy_agreement_256"]
        print(f"  vs dequantised twin (correctness): logits rel. error {a['logits_rel_error_vs_dequantised']:.3e}, "
              f"argmax agreement {a['argmax_agreement_vs_dequantised']:.3f}, per-linear "
              f"{a['linear_rel_error_vs_dequantised']}")
        print(f"  vs bf16 (quantisation error): logits rel. error {a['logits_rel_error_vs_bf16']:.3e}, argmax agreement "
              f"{a['argmax_agreement_vs_bf16']:.3f}, greedy agreement {g['positionwise']:.3f} (first diff {g['prefix']})")
    f = result.get("fp8kv")
    if f and "fp8" in f:
        print(f"{'FP8 KV vs bf16 KV (W1)':<40}{'bf16 KV':>12}{'fp8 KV':>12}{'fp8/bf16':>10}{'target':>8}")
        print(f"{'  KV capacity (tokens)':<40}{f['auto']['kv_capacity_tokens']:>12,}{f['fp8']['kv_capacity_tokens']:>12,}"
              f"{f['kv_capacity_ratio']:>10.2f}{'2x':>8}")
        print(f"{'  W1 output tok/s':<40}{f['auto']['offline_out_tok_s']:>12.0f}{f['fp8']['offline_out_tok_s']:>12.0f}"
              f"{f['throughput_ratio']:>10.2f}{'>=1':>8}")
        key = next(k for k in f if k.startswith("greedy_agreement_"))
        print(f"  logits rel. error {f['logits_rel_error_vs_bf16_kv']:.3e}, teacher-forced argmax agreement "
              f"{f['argmax_agreement_teacher_forced']:.3f}, {key}: {f[key]}")


if __name__ == "__main__":
    main()
