"""DeepSeek-R1 at full width, reduced depth, on one GPU: per-layer step times, extrapolated to 61 layers,
and the two kernels that R1 adds (block-scaled FP8 GEMM, absorbed MLA decode) against the card's ceilings.

Sections (`--only kernels,layers`):
- kernels: FP8 GEMM TFLOP/s at R1's projection shapes against torch's bf16 matmul at the same shapes and
  the measured 788 TFLOP/s ceiling; MLA decode GB/s (latent cache bytes read) against the 4.23 TB/s copy
  ceiling. Each kernel is checked against its plain-PyTorch reference first.
- layers: models built from the real R1 config.json with fewer layers and random weights (FP8 where the
  config's quantization_config says so, unless --bf16): (a) `--dense` dense + `--moe` MoE layers,
  (b) 1 dense layer, (c) 3 dense layers. Decode step time (CUDA-graph replay, every sequence at context
  --context) at batch 1, 32 and 256, and eager prefill of one 2,048-token prompt. Solving
  t = base + dense * t_dense + moe * t_moe over (a)-(c) gives per-layer times; the 61-layer R1 step is
  base + 3 * t_dense + 58 * t_moe, with the planner's prediction beside it.

    python3 benchmarks/h200_deepseek.py --out $OUT/r1_layers.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import tempfile
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig
from r1deploy.plan.planner import plan_deployment
from r1deploy.presets import resolve_config_path

COPY_TBPS, MATMUL_TFLOPS = 4.23, 788.0  # measured on this card (device-to-device copy, 8192^3 bf16 matmul)
BF16 = torch.bfloat16
BATCHES = (1, 32, 256)
R1_LAYERS, R1_DENSE = 61, 3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def median_ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


# --- kernels ------------------------------------------------------------------------------------------

def bench_fp8_gemm(m: int, n: int, k: int) -> dict:
    from r1deploy.kernels.fp8_gemm import act_quant, fp8_gemm, fp8_gemm_ref
    from r1deploy.quant.fp8_block import quantize_fp8_block

    x = torch.randn(m, k, device="cuda", dtype=BF16)
    w, w_scale = quantize_fp8_block(torch.randn(n, k, device="cuda") * 0.02)
    a, a_scale = act_quant(x)
    out = fp8_gemm(a, a_scale, w, w_scale)
    rows = slice(0, min(m, 256))  # the reference materialises [M, N, K/128]: check a slice of rows
    err = rel_err(out[rows], fp8_gemm_ref(a[rows], a_scale[rows], w, w_scale))
    ms = median_ms(lambda: fp8_gemm(a, a_scale, w, w_scale))
    w_bf16 = torch.randn(n, k, device="cuda", dtype=BF16)
    bf16_ms = median_ms(lambda: x @ w_bf16.T)
    flops = 2 * m * n * k
    return {"kernel": "fp8_gemm (W8A8 block-scaled)", "M": m, "N": n, "K": k, "median_ms": ms,
            "TFLOP_s": flops / ms / 1e9, "bf16_torch_ms": bf16_ms, "bf16_torch_TFLOP_s": flops / bf16_ms / 1e9,
            "x_bf16_ceiling": flops / ms / 1e9 / MATMUL_TFLOPS, "x_bf16_same_shape": bf16_ms / ms,
            "weight_GB_s": (n * k) / ms / 1e6, "rel_err_vs_ref": err, "ok": err < 1e-2}


def bench_scaled_mm(m: int, n: int, k: int) -> dict:
    """cuBLAS's block-scaled FP8 GEMM through torch (F.scaled_mm, 1x128 activation and 128x128 weight
    scales), where this torch build has it: a candidate backend for the same format, checked against ours."""
    import torch.nn.functional as F

    from r1deploy.kernels.fp8_gemm import act_quant, fp8_gemm
    from r1deploy.quant.fp8_block import quantize_fp8_block

    x = torch.randn(m, k, device="cuda", dtype=BF16)
    w, w_scale = quantize_fp8_block(torch.randn(n, k, device="cuda") * 0.02)
    a, a_scale = act_quant(x)
    ours = fp8_gemm(a, a_scale, w, w_scale)
    row: dict = {"kernel": "F.scaled_mm blockwise (cuBLAS)", "M": m, "N": n, "K": k}
    layouts = {"a_scale col-major": (a_scale.t().contiguous().t(), w_scale),
               "a_scale row-major": (a_scale, w_scale),
               "both col-major": (a_scale.t().contiguous().t(), w_scale.t().contiguous().t())}
    for name, (sa, sb) in layouts.items():
        try:
            def call(sa=sa, sb=sb):
                return F.scaled_mm(a, w.t(), sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                                   output_dtype=BF16)
            err = rel_err(call(), ours)
            ms = median_ms(call)
            row.update(layout=name, median_ms=ms, TFLOP_s=2 * m * n * k / ms / 1e9, rel_err_vs_ours=err,
                       x_bf16_ceiling=2 * m * n * k / ms / 1e9 / MATMUL_TFLOPS, ok=err < 1e-2)
            return row
        except Exception as e:  # noqa: BLE001 - record why this torch/cuBLAS refuses the layout
            row[f"error ({name})"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


MLA_VARIANTS = [dict(block_n=bn, num_warps=w, num_stages=st) for bn in (16, 32, 64) for w in (4, 8) for st in (1, 2)]
# Wider head tiles: 128 heads at 16 rows each re-read every latent tile 8 times and run small mma tiles;
# 64 rows is a wgmma-sized tile (the fp32 accumulator [64, 512] needs 8 warps).
MLA_VARIANTS += [dict(block_h=bh, block_n=bn, num_warps=8, num_stages=st) for bh in (32, 64) for bn in (16, 32)
                 for st in (1, 2)]


def sweep_mla_decode(batch: int, context: int) -> dict:
    """The MLA split kernel's tile shapes at one size: the default and the fastest variant."""
    from r1deploy.kernels.mla_decode import mla_decode_attention

    heads, latent, rope, block = 128, 512, 64, 16
    need = math.ceil(context / block)
    cache = torch.randn(batch * need + 1, block, latent + rope, device="cuda", dtype=BF16)
    tables = torch.randperm(batch * need + 1, device="cuda")[: batch * need].view(batch, need).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, latent + rope, device="cuda", dtype=BF16)
    read = batch * context * (latent + rope) * 2
    times = {}
    for variant in [{}] + MLA_VARIANTS:
        for splits in (None, 2 * (mla_default_splits(batch) or 1)):
            try:
                ms = median_ms(lambda v=variant, s=splits: mla_decode_attention(q, cache, tables, seq_lens, latent,
                                                                               0.1, num_splits=s, **v))
            except Exception as e:  # noqa: BLE001 - a tile shape that does not compile (shared memory)
                print(f"  variant {variant} splits {splits}: {type(e).__name__}", flush=True)
                continue
            times[json.dumps({**variant, "num_splits": splits})] = ms
    best = min(times, key=times.get)
    default = json.dumps({"num_splits": None})
    return {"kernel": "mla_decode sweep", "batch": batch, "context": context,
            "default_GB_s": read / times[default] / 1e6, "best": best, "best_GB_s": read / times[best] / 1e6,
            "best_pct_copy_ceiling": 100 * read / times[best] / 1e6 / (COPY_TBPS * 1e3)}


def mla_default_splits(batch: int) -> int:
    from r1deploy.kernels.mla_decode import default_num_splits

    return default_num_splits(batch, 128 // 16, torch.device("cuda"))


def bench_mla_decode(batch: int, context: int, heads: int = 128, latent: int = 512, rope: int = 64) -> dict:
    from r1deploy.attention.mla_torch import latent_attention
    from r1deploy.kernels.mla_decode import mla_decode_attention

    block, width = 16, 4096 // 16 if context <= 4096 else math.ceil(context / 16)
    need = math.ceil(context / block)
    cache = torch.randn(batch * need + 1, block, latent + rope, device="cuda", dtype=BF16)
    tables = torch.randperm(batch * need + 1, device="cuda")[: batch * need].view(batch, need).int()
    tables = torch.nn.functional.pad(tables, (0, width - need))
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, latent + rope, device="cuda", dtype=BF16)
    scale = 1 / math.sqrt(192)
    out = mla_decode_attention(q, cache, tables, seq_lens, latent, scale)
    check = slice(0, min(batch, 4))
    err = rel_err(out[check], latent_attention(q[check].float(), cache.float(), tables[check],
                                                         seq_lens[check], latent, scale))
    ms = median_ms(lambda: mla_decode_attention(q, cache, tables, seq_lens, latent, scale))
    read = batch * context * (latent + rope) * 2
    return {"kernel": "mla_decode", "batch": batch, "context": context, "heads": heads, "median_ms": ms,
            "GB_s": read / ms / 1e6, "pct_copy_ceiling": 100 * read / ms / 1e6 / (COPY_TBPS * 1e3),
            "rel_err_vs_ref": err, "ok": err < 1e-2}


def run_kernels(result: dict, sweep: bool) -> None:
    rows = []
    # R1 shapes: dense gate_up (7168 -> 2 x 18432), dense down (18432 -> 7168), q_b (1536 -> 24576), o (16384 -> 7168)
    for m in (16, 256, 4096, 8192):
        for n, k in ((36864, 7168), (7168, 18432), (24576, 1536), (7168, 16384)):
            rows.append(bench_fp8_gemm(m, n, k))
            print(f"fp8_gemm M={m} N={n} K={k}: {rows[-1]['TFLOP_s']:.0f} TFLOP/s "
                  f"(bf16 torch {rows[-1]['bf16_torch_TFLOP_s']:.0f}), err {rows[-1]['rel_err_vs_ref']:.1e}",
                  flush=True)
    for m in (4096, 8192):
        rows.append(bench_scaled_mm(m, 36864, 7168))
        print(json.dumps(rows[-1]), flush=True)
    for batch, context in ((1, 4096), (32, 1024), (32, 4096), (128, 2048), (256, 1024)):
        rows.append(bench_mla_decode(batch, context))
        print(f"mla_decode B={batch} ctx={context}: {rows[-1]['GB_s']:.0f} GB/s "
              f"({rows[-1]['pct_copy_ceiling']:.0f}% of copy), err {rows[-1]['rel_err_vs_ref']:.1e}", flush=True)
    if sweep:
        for batch, context in ((1, 4096), (32, 4096), (128, 2048)):
            rows.append(sweep_mla_decode(batch, context))
            print(json.dumps(rows[-1]), flush=True)
    result["kernels"] = rows
    large = [r for r in rows if "TFLOP_s" in r and r["M"] >= 4096]
    result["fp8_gemm_best_large_M_x_bf16_ceiling"] = max(r["x_bf16_ceiling"] for r in large)
    mla = [r for r in rows if r["kernel"] == "mla_decode" and r["batch"] >= 32]
    result["mla_decode_best_pct_copy_ceiling"] = max(r["pct_copy_ceiling"] for r in mla)


# --- reduced-depth models -----------------------------------------------------------------------------

def reduced_config(dense: int, moe: int, bf16: bool, directory: Path) -> Path:
    raw = json.loads(resolve_config_path("r1").read_text())
    raw.update(num_hidden_layers=dense + moe, first_k_dense_replace=dense, num_nextn_predict_layers=0)
    if bf16:
        raw.pop("quantization_config", None)
    path = directory / f"r1_{dense}d{moe}m{'_bf16' if bf16 else ''}"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return path / "config.json"


def decode_step_ms(engine: LLMEngine, batch: int, context: int) -> float:
    """One decode step of `batch` sequences at `context` tokens each: the captured graph's replay time."""
    runner = engine.runner
    block = engine.config.block_size
    need = math.ceil(context / block)
    tables = [list(range(i * need + 1, (i + 1) * need + 1)) for i in range(batch)]  # block 0 left alone
    step = ForwardBatch.build([[7 + i] for i in range(batch)], [context - 1] * batch, tables, block, "cpu",
                              pin_memory=True)
    runner.execute(step)  # copies the step into the graph's static inputs (and replays)
    bucket = next(b for b in runner.graphs.buckets if b >= batch)
    graph = runner.graphs.graphs[(bucket, 1)].graph  # graphs are keyed by (batch bucket, query length)
    return median_ms(graph.replay)


def prefill_ms(engine: LLMEngine, tokens: int) -> float:
    block = engine.config.block_size
    step = ForwardBatch.build([[11] * tokens], [0], [list(range(1, math.ceil(tokens / block) + 1))], block
                              ).to("cuda")
    return median_ms(lambda: engine.runner.execute(step))


def measure_model(dense: int, moe: int, bf16: bool, context: int, directory: Path) -> dict:
    path = reduced_config(dense, moe, bf16, directory)
    need_blocks = max(BATCHES) * math.ceil(context / 16) + 64
    config = EngineConfig(max_model_len=max(context + 64, 4096), max_num_seqs=max(BATCHES),
                          max_num_batched_tokens=4096, num_gpu_blocks_override=need_blocks)
    start = datetime.datetime.now()
    engine = LLMEngine(str(path), config=config, device="cuda", load_format="dummy")
    torch.cuda.synchronize()
    startup = (datetime.datetime.now() - start).total_seconds()
    model = engine.loaded.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {"dense_layers": dense, "moe_layers": moe, "weights": "bf16" if bf16 else "fp8 (config)",
           "weight_dtypes": sorted({str(p.dtype) for p in model.parameters()}), "weights_GB": weight_bytes / 1e9,
           "startup_s": startup, "cuda_graphs": engine.runner.graphs is not None}
    for batch in BATCHES:
        row[f"decode_bs{batch}_step_ms"] = decode_step_ms(engine, batch, context)
    row["prefill_2048_ms"] = prefill_ms(engine, 2048)
    row["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(row), flush=True)
    engine.shutdown()
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def per_layer(rows: list[dict], key: str) -> dict:
    """Least squares over the models: t = base + dense * t_dense + moe * t_moe."""
    design = torch.tensor([[1.0, r["dense_layers"], r["moe_layers"]] for r in rows], dtype=torch.float64)
    times = torch.tensor([[r[key]] for r in rows], dtype=torch.float64)
    base, t_dense, t_moe = torch.linalg.lstsq(design, times).solution.flatten().tolist()
    return {"base_ms": base, "dense_layer_ms": t_dense, "moe_layer_ms": t_moe,
            "r1_61_layers_ms": base + R1_DENSE * t_dense + (R1_LAYERS - R1_DENSE) * t_moe}


def run_layers(result: dict, dense: int, moe: int, bf16: bool, context: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure_model(d, m, bf16, context, Path(tmp)) for d, m in ((1, 0), (R1_DENSE, 0), (dense, moe))]
    result["models"] = rows
    fits = {}
    for key in [f"decode_bs{b}_step_ms" for b in BATCHES] + ["prefill_2048_ms"]:
        fits[key] = per_layer(rows, key)
    result["per_layer"] = fits
    for batch in BATCHES:
        step_ms = fits[f"decode_bs{batch}_step_ms"]["r1_61_layers_ms"]
        predicted = plan_deployment("r1", "h200", num_gpus=8, concurrency=batch, input_len=context, output_len=256)
        fits[f"decode_bs{batch}_step_ms"]["r1_extrapolated_tok_s"] = batch * 1e3 / step_ms
        fits[f"decode_bs{batch}_step_ms"]["planner_8xh200_tok_s"] = predicted["performance"]["output_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma list: kernels,layers")
    parser.add_argument("--dense", type=int, default=3)
    parser.add_argument("--moe", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence at the timed decode step")
    parser.add_argument("--bf16", action="store_true", help="drop the config's FP8 quantization_config")
    parser.add_argument("--sweep", action="store_true", help="also time the MLA kernel's tile-shape variants")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "ceilings": {"copy_TB_s": COPY_TBPS, "bf16_matmul_TFLOP_s": MATMUL_TFLOPS}}
    if not only or "kernels" in only:
        run_kernels(result, args.sweep)
    if not only or "layers" in only:
        run_layers(result, args.dense, args.moe, args.bf16, args.context)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for key, fit in result.get("per_layer", {}).items():
        print(f"{key:>20}: dense {fit['dense_layer_ms']:.3f} ms/layer, moe {fit['moe_layer_ms']:.3f} ms/layer, "
              f"61-layer R1 {fit['r1_61_layers_ms']:.2f} ms")
    if "kernels" in result:
        print(f"fp8 GEMM best at large M: {result['fp8_gemm_best_large_M_x_bf16_ceiling']:.2f}x the bf16 ceiling; "
              f"MLA decode best {result['mla_decode_best_pct_copy_ceiling']:.0f}% of copy")
    print("median step times from CUDA events (triton do_bench); decode steps are graph replays")


if __name__ == "__main__":
    main()
