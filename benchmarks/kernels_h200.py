"""Check each Triton kernel against its PyTorch reference at R1-Distill-Qwen-7B shapes, then time it.

Times are triton.testing.do_bench medians (CUDA events, after warm-up). Memory-bound kernels report
GB/s (fewest bytes: each input read once, each output written once) against the copy ceiling, which
this script also measures; attention prefill reports TFLOP/s against the measured bf16 matmul rate.

    python3 benchmarks/kernels_h200.py --out $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from r1deploy.attention.torch_backend import decode_attention as decode_attention_ref
from r1deploy.attention.torch_backend import varlen_attention
from r1deploy.attention.torch_backend import write_kv as write_kv_cache_ref
from r1deploy.kernels.activation import silu_and_mul, silu_and_mul_ref
from r1deploy.kernels.decode_attention import decode_attention
from r1deploy.kernels.kv_cache import write_kv_cache
from r1deploy.kernels.prefill_attention import prefill_attention
from r1deploy.kernels.rmsnorm import rms_norm
from r1deploy.kernels.rotary import rotary_embedding, rotary_embedding_ref
from r1deploy.layers.norm import rms_norm_torch as rms_norm_ref

HEADS, KV_HEADS, HEAD_DIM, BLOCK, HIDDEN, INTER = 28, 4, 128, 16, 3584, 18944  # R1-Distill-Qwen-7B
MAX_MODEL_LEN = 4096  # decode tables are this wide, as a CUDA graph's static table would be
COPY_CEILING_GBS, MATMUL_CEILING_TFLOPS = 4230.0, 788.0  # measured on this card earlier (KINDS.md)
BF16 = torch.bfloat16
DEV = "cuda"


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return err if math.isfinite(err) else float("inf")


def row(name: str, shape: str, ms: float, bytes_moved: float, err: float, tol: float,
        flops: float = 0.0, torch_ms: float | None = None) -> dict:
    gbs = bytes_moved / ms / 1e6
    r = {"kernel": name, "shape": shape, "median_ms": round(ms, 5), "GB_s": round(gbs, 1),
         "pct_copy_ceiling": round(100 * gbs / COPY_CEILING_GBS, 1), "rel_err": err, "tol": tol, "ok": err < tol}
    if flops:
        r["TFLOP_s"] = round(flops / ms / 1e9, 1)
        r["pct_matmul_ceiling"] = round(100 * flops / ms / 1e9 / MATMUL_CEILING_TFLOPS, 1)
    if torch_ms is not None:
        r["torch_ref_ms"] = round(torch_ms, 5)
    return r


def paged(seq_lens: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    need = [math.ceil(n / BLOCK) for n in seq_lens]
    cache = torch.randn(2, sum(need) + 1, BLOCK, KV_HEADS, HEAD_DIM, device=DEV, dtype=BF16)
    order = torch.randperm(sum(need) + 1)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = order[used : used + n].int()
        used += n
    return cache, tables.to(DEV)


def bench_copy() -> dict:
    src = torch.randn(2**29, device=DEV, dtype=BF16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return {"kernel": "copy (ceiling check)", "shape": "1 GiB bf16", "median_ms": round(ms, 5),
            "GB_s": round(2 * src.numel() * 2 / ms / 1e6, 1)}


def bench_decode(batch: int, seq: int) -> dict:
    lens_list = [seq] * batch
    cache, tables = paged(lens_list, MAX_MODEL_LEN // BLOCK)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEV, dtype=BF16)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEV)
    scale = HEAD_DIM**-0.5
    out = decode_attention(q, cache, tables, lens, scale)
    err = rel_err(out, decode_attention_ref(q.float(), cache.float(), tables, lens, scale))
    run = lambda: decode_attention(q, cache, tables, lens, scale)
    eager_ms = median_ms(run)
    # Decode runs as CUDA-graph replays in the engine; eager timing would include Triton's launch cost.
    ms = float(do_bench_cudagraph(run, rep=100, return_mode="median"))
    bytes_moved = 2 * batch * seq * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2
    r = row("decode_attention", f"B={batch} seq={seq} table={MAX_MODEL_LEN} graph", ms, bytes_moved, err, 1e-2)
    r["eager_ms"] = round(eager_ms, 5)
    return r


def bench_prefill(query_lens: list[int], cached: list[int]) -> dict:
    seq_lens = [q + c for q, c in zip(query_lens, cached, strict=True)]
    cache, tables = paged(seq_lens, max(math.ceil(n / BLOCK) for n in seq_lens))
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, device=DEV, dtype=BF16)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    scale = HEAD_DIM**-0.5
    run = lambda: prefill_attention(q, cache, tables, starts, lens, max(query_lens), scale)
    err = rel_err(run(), varlen_attention(q.float(), cache.float(), tables, query_lens, seq_lens, scale))
    ms = median_ms(run)
    visible = sum(ql * (ql + 1) / 2 + ql * c for ql, c in zip(query_lens, cached, strict=True))
    flops = 4 * HEADS * HEAD_DIM * visible  # QK^T and PV, causal part only
    bytes_moved = 2 * q.numel() * 2 + 2 * sum(seq_lens) * KV_HEADS * HEAD_DIM * 2
    torch_ms = None
    if len(query_lens) == 1 and cached == [0]:  # the same work through SDPA on contiguous K/V, for scale
        qt = q.transpose(0, 1)[None]  # [1, H, L, D]
        kt = torch.randn(1, KV_HEADS, query_lens[0], HEAD_DIM, device=DEV, dtype=BF16)
        torch_ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, kt, is_causal=True, scale=scale, enable_gqa=True))
    return row("prefill_attention", f"query_lens={query_lens} cached={cached}", ms, bytes_moved, err, 1e-2,
               flops=flops, torch_ms=torch_ms)


def bench_write_kv(tokens: int) -> dict:
    cache = torch.randn(2, tokens // BLOCK + 8, BLOCK, KV_HEADS, HEAD_DIM, device=DEV, dtype=BF16)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEV, dtype=BF16)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(tokens, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(cache.shape[1] * BLOCK, device=DEV)[:tokens]
    expected = cache.clone()
    write_kv_cache(cache, k, v, slots)
    write_kv_cache_ref(expected, k, v, slots)
    err = 0.0 if torch.equal(cache, expected) else float("inf")
    ms = median_ms(lambda: write_kv_cache(cache, k, v, slots))
    torch_ms = median_ms(lambda: write_kv_cache_ref(expected, k, v, slots))
    bytes_moved = 2 * 2 * tokens * KV_HEADS * HEAD_DIM * 2 + tokens * 8
    return row("write_kv_cache", f"T={tokens}", ms, bytes_moved, err, 1e-9, torch_ms=torch_ms)


def bench_rms_norm(tokens: int) -> dict:
    x, res = (torch.randn(tokens, HIDDEN, device=DEV, dtype=BF16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(HIDDEN, device=DEV)).to(BF16)
    out, new_res = rms_norm(x, w, 1e-6, res)
    ref, ref_res = rms_norm_ref(x.double(), w.double(), 1e-6, res.double())
    err = max(rel_err(out, ref), rel_err(new_res, ref_res))
    ms = median_ms(lambda: rms_norm(x, w, 1e-6, res))
    torch_ms = median_ms(lambda: rms_norm_ref(x, w, 1e-6, res))
    return row("rms_norm+residual", f"T={tokens} hidden={HIDDEN}", ms, 4 * x.numel() * 2, err, 1e-2,
               torch_ms=torch_ms)


def bench_rotary(tokens: int) -> dict:
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEV, dtype=BF16)
    x = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    freqs = torch.randint(0, 4096, (tokens, 1), device=DEV).float() * torch.rand(HEAD_DIM // 2, device=DEV)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    out = rotary_embedding(x, cos, sin)
    err = rel_err(out, rotary_embedding_ref(x.double(), cos.double(), sin.double()))
    ms = median_ms(lambda: rotary_embedding(x, cos, sin))
    torch_ms = median_ms(lambda: rotary_embedding_ref(x, cos, sin))
    bytes_moved = 2 * x.numel() * 2 + 2 * cos.numel() * 2
    return row("rotary (q)", f"T={tokens} heads={HEADS}", ms, bytes_moved, err, 1e-2, torch_ms=torch_ms)


def bench_silu(tokens: int) -> dict:
    x = torch.randn(tokens, 2 * INTER, device=DEV, dtype=BF16)
    out = silu_and_mul(x)
    err = rel_err(out, silu_and_mul_ref(x.double()))
    ms = median_ms(lambda: silu_and_mul(x))
    torch_ms = median_ms(lambda: silu_and_mul_ref(x))
    return row("silu_and_mul", f"T={tokens} I={INTER}", ms, 3 * tokens * INTER * 2, err, 1e-2, torch_ms=torch_ms)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [bench_copy()]
    for b, s in [(1, 4096), (1, 512), (32, 2048), (64, 1024), (256, 1024)]:
        rows.append(bench_decode(b, s))
    rows.append(bench_prefill([2048], [0]))
    rows.append(bench_prefill([1024] * 4, [1024, 0, 512, 2048]))
    rows += [bench_write_kv(16384), bench_rms_norm(4096), bench_rms_norm(32), bench_rotary(4096),
             bench_silu(4096), bench_silu(32)]
    meta = {"command": "python3 benchmarks/kernels_h200.py --out $OUT/kernels.json",
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "ceilings": {"copy_GB_s": COPY_CEILING_GBS, "bf16_matmul_TFLOP_s": MATMUL_CEILING_TFLOPS},
            "timing": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms), CUDA events; decode: "
                      "do_bench_cudagraph median of graph replays (eager median in eager_ms)"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"{'kernel':22} {'shape':44} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} {'torch ms':>9} {'rel_err':>9}")
    for r in rows:
        print(f"{r['kernel']:22} {r['shape']:44} {r['median_ms']:9.4f} {r['GB_s']:8.0f} "
              f"{r.get('pct_copy_ceiling', ''):>6} {r.get('TFLOP_s', ''):>8} {r.get('torch_ref_ms', ''):>9} "
              f"{r.get('rel_err', float('nan')):9.2e}")
    if not all(r.get("ok", True) for r in rows):
        raise SystemExit("a kernel disagrees with its reference")


if __name__ == "__main__":
    main()
