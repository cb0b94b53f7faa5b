"""Is the FP8 KV cache's error on the random-weight R1-Distill-Qwen-7B a kernel bug or the random deep model's chaos?

h200_quant.py's fp8kv check measured, on an H200, logits relative error 0.28 and teacher-forced argmax agreement
0.45 for an FP8 (e4m3, scale 1.0) KV cache against the bf16 one, on the 7B shape with init_dummy_weights'
Normal(0, 0.02) weights; on the CPU, SmolLM2 (trained and random) gives 4-6% / >95%. This probe tells the two
explanations apart in one GPU run. One model (build_model + init_dummy_weights, seed 0), a random prompt
(--prompt-len tokens) then --steps decode steps teacher-forced with the bf16-KV model's own greedy tokens; every
variant is compared with that bf16-KV run (logits relative error ||a - b|| / ||b|| over all positions, the prefill
position alone and the decode positions alone; argmax agreement; does the first greedy token agree):

  depth   the model cut to its first L layers (the same layers, embedding, final norm and lm_head: one model whose
          layer list is truncated), L in 1, 2, 4, 8, 16, ... up to the full depth; at each depth:
            fp8          FP8 cache (the engine's path: Triton write + Triton prefill/decode attention on CUDA);
            fp8_fake     bf16 cache holding FP8-rounded K/V (rounded in PyTorch as they are written): the same
                         numbers as fp8 through the bf16 kernels. fp8 vs fp8_fake must be ~0 (bitwise on CUDA,
                         up to instruction-level differences) if the FP8 kernels are right;
            perturb_4/6  bf16 cache with K and V multiplied by 1 + 2^-4 (2^-6) * U(-1, 1) as they are written: a
                         random perturbation of FP8's size (e4m3 rounds to within 2^-4 relative) and 4x smaller;
            torch_bf16   the attention in plain PyTorch on the same device (the Torch attention backend, the
                         kernels' reference, made the default here), bf16 cache: the kernels' own noise floor;
            torch_fp8    that PyTorch path on an FP8 cache, compared with torch_bf16 (FP8's effect without any
                         Triton attention kernel) and with fp8 (the kernels against PyTorch on the same cache);
            fp32         the model in fp32 (weights cast exactly from bf16, fp32 cache, fp32 activations):
                         the bf16 arithmetic's own error (run last, the model converted in place).
          If perturb_4 and fp32 are about as far from bf16 as fp8 is, and fp8 ~ fp8_fake ~ torch_fp8, the 0.28 is
          the random deep model amplifying small perturbations, not a bug.
  kernels the Triton decode and prefill attention (full and chunked: the last 64 queries of each sequence) at the
          real shape (28 heads, 4 KV heads, head_dim 128, block 16, a static 256-block table as CUDA graphs use)
          on FP8 caches written by the Triton write kernel, against a float64 PyTorch reference computed from the
          same FP8 cache bytes; sequence lengths 17, 300, 2048 in one batch; K/V/Q random with the model's std,
          and the real q/k/v of the first and last layer captured from a 2048-token prefill. The same on a bf16
          cache as the baseline, the Triton write kernel's bytes against the Torch backend's write, and the float64
          reference on the FP8 cache against the float64 reference on the bf16 cache (FP8's intrinsic effect on
          one attention output).
  amax    per layer: max |q|, |k|, |v|, the fraction of |k|, |v| above 448 (saturated at scale 1.0) and below
          2^-6 (e4m3 subnormals, coarse relative precision), and FP8's relative RMS rounding error of K and V,
          over the bf16 run's prompt + decode steps and the 2048-token prefill.

Each part is time-bounded (small sizes) and guarded: an exception is recorded in the JSON and the next part runs;
the JSON is saved after every part.

    python3 benchmarks/h200_fp8_kv_probe.py --out $OUT/h200_fp8_kv_probe.json       # H200, ~2-3 min after start-up
    python3 benchmarks/h200_fp8_kv_probe.py --device cpu --tiny --out /tmp/probe.json   # tiny variant, CPU, ~15 s
"""

from __future__ import annotations

import os
import sys


def _argv_device(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return None


# On the CPU the Triton kernels (kernel part) run in Triton's interpreter, which must be chosen before triton loads.
if _argv_device(sys.argv) == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import random
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # r1deploy from this checkout if not installed
from h200_quant import BLOCK, greedy_with_cache, header, release, sync

from r1deploy.attention import selector, torch_backend
from r1deploy.attention.torch_backend import TorchAttentionBackend
from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE, FP8_KV_MAX
from r1deploy.models.loader import build_model
from r1deploy.presets import resolve_config_path
from r1deploy.weights.dummy import init_dummy_weights

REPO = Path(__file__).resolve().parent.parent
DEPTHS = (1, 2, 4, 8, 16, 28)
FP8_MIN_NORMAL = 2.0**-6
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 4, "vocab_size": 1024, "max_position_embeddings": 4096}


def patch_interpreter() -> bool:
    """Triton's interpreter has known bugs (bf16 dot, fp32 -> bf16 / e4m3 casts); tests/conftest.py patches them
    when TRITON_INTERPRET=1. Reuse that patch (loaded under its own name, so nothing else sees a conftest)."""
    path = REPO / "tests" / "conftest.py"
    if os.environ.get("TRITON_INTERPRET") != "1" or not path.exists():
        return False
    spec = importlib.util.spec_from_file_location("_r1deploy_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return True


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def error_record(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


# ---- variants of the K/V path (patched into the attention backends for one run) ---------------------------------


def fake_fp8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x rounded as an FP8 cache stores and reads it back (x / scale saturated, e4m3 round-to-nearest-even, * scale)."""
    return ((x.float() / scale).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE).float() * scale).to(x.dtype)


def fake_quant_write(original: Callable) -> Callable:
    def write(kv_cache, k, v, slots, k_scale=1.0, v_scale=1.0):
        original(kv_cache, fake_fp8(k, k_scale), fake_fp8(v, v_scale), slots, k_scale, v_scale)
    return write


def perturbing_write(original: Callable, eps: float, seed: int, device: str) -> Callable:
    gen = torch.Generator(device=device).manual_seed(seed)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32) * 2 - 1
        return (x.float() * (1 + eps * u)).to(x.dtype)

    def write(kv_cache, k, v, slots, k_scale=1.0, v_scale=1.0):
        original(kv_cache, noisy(k), noisy(v), slots, k_scale, v_scale)
    return write


def write_modules(device: str) -> list[Any]:
    """The modules whose cache-write function the default backend on `device` calls (patched by the variants)."""
    if torch.device(device).type != "cuda":
        return [torch_backend]
    from r1deploy.attention import triton_backend

    return [triton_backend]


def _write_name(module: Any) -> str:
    return "write_kv" if module is torch_backend else "write_kv_cache"


@contextlib.contextmanager
def variant(name: str, device: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for module in write_modules(device):
            write = _write_name(module)
            original = getattr(module, write)
            if name == "fp8_fake":
                stack.enter_context(patched(module, write, fake_quant_write(original)))
            elif name.startswith("perturb_"):
                exponent = int(name.split("_")[1])
                stack.enter_context(patched(module, write, perturbing_write(original, 2.0**-exponent, 7, device)))
        if name.startswith("torch_"):  # models run without engine metadata take the default backend's
            stack.enter_context(patched(selector, "default_attention_backend", lambda _device: "torch"))
        yield


# ---- capture of q / k / v and their statistics ------------------------------------------------------------------


class Capture:
    """Wraps the attention backends' forward: per-layer statistics of q, k, v and (for `keep` layers) the tensors."""

    def __init__(self, model: torch.nn.Module, keep: tuple[int, ...] = ()) -> None:
        self.keep = set(keep)
        self.layer = -1
        self.stats: dict[int, dict[str, float]] = {}
        self.tensors: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.hooks = [layer.self_attn.register_forward_pre_hook(self._enter(i))
                      for i, layer in enumerate(model.model.layers)]
        self.backends = [TorchAttentionBackend]
        if torch.cuda.is_available():
            from r1deploy.attention.triton_backend import TritonAttentionBackend

            self.backends.append(TritonAttentionBackend)
        self.originals = [cls.forward for cls in self.backends]

    def _enter(self, index: int) -> Callable:
        def hook(module, args):
            self.layer = index
        return hook

    def _record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        s = self.stats.setdefault(self.layer, {})
        for name, x in (("q", q), ("k", k), ("v", v)):
            x = x.float()
            a = x.abs()
            s[f"{name}_amax"] = max(s.get(f"{name}_amax", 0.0), float(a.max()))
            s[f"{name}_sumsq"] = s.get(f"{name}_sumsq", 0.0) + float((x * x).sum())
            s[f"{name}_n"] = s.get(f"{name}_n", 0) + x.numel()
            if name == "q":
                continue
            s[f"{name}_n_saturated"] = s.get(f"{name}_n_saturated", 0) + int((a > FP8_KV_MAX).sum())
            s[f"{name}_n_subnormal"] = s.get(f"{name}_n_subnormal", 0) + int(((a < FP8_MIN_NORMAL) & (a > 0)).sum())
            err = fake_fp8(x) - x
            s[f"{name}_fp8_errsq"] = s.get(f"{name}_fp8_errsq", 0.0) + float((err * err).sum())
        if self.layer in self.keep:
            t = self.tensors.setdefault(self.layer, {"q": [], "k": [], "v": []})
            for name, x in (("q", q), ("k", k), ("v", v)):
                t[name].append(x.detach().clone())

    def __enter__(self) -> Self:
        def wrap(original: Callable) -> Callable:
            def forward(backend, q, k, v, kv_cache, metadata, scale, k_scale=1.0, v_scale=1.0):
                self._record(q, k, v)
                return original(backend, q, k, v, kv_cache, metadata, scale, k_scale, v_scale)
            return forward
        for cls, original in zip(self.backends, self.originals, strict=True):
            cls.forward = wrap(original)
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, original in zip(self.backends, self.originals, strict=True):
            cls.forward = original
        for h in self.hooks:
            h.remove()

    def summary(self) -> dict[str, Any]:
        rows = {}
        for layer, s in sorted(self.stats.items()):
            row = {f"{n}_amax": s[f"{n}_amax"] for n in "qkv"}
            row.update({f"{n}_std": math.sqrt(s[f"{n}_sumsq"] / s[f"{n}_n"]) for n in "qkv"})
            for n in "kv":
                row[f"{n}_frac_saturated"] = s[f"{n}_n_saturated"] / s[f"{n}_n"]
                row[f"{n}_frac_subnormal"] = s[f"{n}_n_subnormal"] / s[f"{n}_n"]
                row[f"{n}_fp8_rel_rms_err"] = math.sqrt(s[f"{n}_fp8_errsq"] / max(s[f"{n}_sumsq"], 1e-30))
            rows[layer] = row
        return rows


# ---- part 1 and 2: depth scan with every variant -----------------------------------------------------------------


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    got, want = got.double(), want.double()
    rel = lambda a, b: float((a - b).norm() / b.norm())
    agree = (got.argmax(-1) == want.argmax(-1)).double()
    return {"rel": rel(got, want), "rel_prefill": rel(got[:1], want[:1]),
            "rel_decode": rel(got[1:], want[1:]) if got.shape[0] > 1 else float("nan"),
            "agree": float(agree.mean()), "first_token_agree": bool(agree[0])}


@contextlib.contextmanager
def truncated(model: torch.nn.Module, config: Any, depth: int) -> Iterator[Any]:
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(layers)[:depth])
    try:
        yield dataclasses.replace(config, num_hidden_layers=depth)
    finally:
        model.model.layers = layers


def run_variant(model, config, depth, name, prompt, steps, device, kv_dtype, forced):
    with truncated(model, config, depth) as cfg, variant(name, device):
        _, logits = greedy_with_cache(model, cfg, prompt, steps, device, kv_dtype, forced=forced)
    return logits


def depth_scan(model, config, depths, prompt, steps, device, dtype, result, save, refs, capture_full):
    """Every bf16-model variant at every depth; refs[depth] = (tokens, bf16 logits) for the fp32 pass later."""
    scan = result.setdefault("depth_scan", {})
    for depth in depths:
        start = time.perf_counter()
        row = scan[str(depth)] = {}
        try:
            with truncated(model, config, depth) as cfg:
                if depth == depths[-1] and capture_full:
                    with Capture(model) as cap:
                        tokens, ref = greedy_with_cache(model, cfg, prompt, steps, device, dtype)
                    result["amax_prompt_run"] = cap.summary()
                else:
                    tokens, ref = greedy_with_cache(model, cfg, prompt, steps, device, dtype)
            refs[depth] = (tokens, ref)
            row["ref_greedy_tokens_head"] = tokens[:8]
            logits = {}
            # On the CPU the model already runs the PyTorch path: torch_bf16 must be exactly 0 there and
            # torch_fp8 equal to fp8 (a check of the patching itself).
            names = [("fp8", FP8_KV_DTYPE), ("fp8_fake", dtype), ("perturb_4", dtype), ("perturb_6", dtype),
                     ("torch_bf16", dtype), ("torch_fp8", FP8_KV_DTYPE)]
            for name, kv_dtype in names:  # one failing variant costs only its own entries
                try:
                    logits[name] = run_variant(model, config, depth, name, prompt, steps, device, kv_dtype,
                                               tokens[:-1])
                    row[name] = compare(logits[name], ref)
                except Exception as exc:  # noqa: BLE001
                    row[name] = error_record(exc)
            for a, b in (("fp8", "fp8_fake"), ("torch_fp8", "torch_bf16"), ("fp8", "torch_fp8")):
                if a in logits and b in logits:
                    row[f"{a}_vs_{b}"] = compare(logits[a], logits[b])
            del logits
        except Exception as exc:  # noqa: BLE001
            row.update(error_record(exc))
        row["seconds"] = time.perf_counter() - start
        print(f"depth {depth}: {short_row(row)} ({row['seconds']:.1f} s)", flush=True)
        save()
        release()


def fp32_scan(model, config, depths, prompt, steps, device, result, save, refs):
    """The model converted to fp32 in place (exact from bf16), fp32 cache, against each depth's bf16 reference."""
    model.float()
    scan = result.setdefault("depth_scan", {})
    for depth in depths:
        if depth not in refs:
            continue
        start = time.perf_counter()
        row = scan.setdefault(str(depth), {})
        tokens, ref = refs[depth]
        try:
            logits = run_variant(model, config, depth, "fp32", prompt, steps, device, torch.float32, tokens[:-1])
            row["fp32"] = {**compare(logits, ref), "attention": "engine (Triton on CUDA)"}
        except Exception as exc:  # noqa: BLE001  e.g. the fp32 attention tiles out of shared memory
            row["fp32_engine_error"] = error_record(exc)
            try:  # the same fp32 model with the plain-PyTorch attention
                logits = run_variant(model, config, depth, "torch_fp32", prompt, steps, device, torch.float32,
                                     tokens[:-1])
                row["fp32"] = {**compare(logits, ref), "attention": "plain PyTorch (engine path failed)"}
            except Exception as exc2:  # noqa: BLE001
                row["fp32"] = error_record(exc2)
        print(f"depth {depth} fp32: {fmt(row.get('fp32'))} ({time.perf_counter() - start:.1f} s)", flush=True)
        save()
        release()


# ---- part 3: kernels at the real shape ---------------------------------------------------------------------------


def paged_tables(lens: list[int], block: int, width: int, gen: torch.Generator, device: str
                 ) -> tuple[torch.Tensor, int]:
    needed = [math.ceil(n / block) for n in lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = order[used : used + n].int()
        used += n
    return tables.to(device), num_blocks


def write_cache(ks: list[torch.Tensor], vs: list[torch.Tensor], tables: torch.Tensor, num_blocks: int, block: int,
                kv_dtype: torch.dtype, device: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sequences' K/V [n, KV, D] into a fresh cache with the Triton write kernel; its bytes vs the Torch backend's."""
    from r1deploy.attention.torch_backend import write_kv as write_kv_cache_ref
    from r1deploy.kernels.kv_cache import write_kv_cache

    kv_heads, head_dim = ks[0].shape[1:]
    slots = []
    for i, k in enumerate(ks):
        row = tables[i].tolist()
        slots += [row[p // block] * block + p % block for p in range(k.shape[0])]
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    k, v = torch.cat(ks), torch.cat(vs)
    cache = torch.zeros(2, num_blocks, block, kv_heads, head_dim, dtype=kv_dtype, device=device)
    ref = torch.zeros_like(cache)
    write_kv_cache(cache, k, v, slot_mapping)
    write_kv_cache_ref(ref, k, v, slot_mapping)
    a, b = cache.view(torch.uint8) if kv_dtype == FP8_KV_DTYPE else cache, ref.view(torch.uint8) \
        if kv_dtype == FP8_KV_DTYPE else ref
    mismatched = int((a != b).sum())
    diff = float((cache.float() - ref.float()).abs().max())
    return cache, {"write_vs_ref_mismatched_elements": mismatched, "write_vs_ref_max_abs_diff": diff}


def ref_attention(q: torch.Tensor, cache64: torch.Tensor, table: torch.Tensor, n: int, q_pos: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """float64: q [L, H, D] at positions q_pos over keys 0..n-1 of one sequence, causal. cache64 is float64."""
    block = cache64.shape[2]
    blocks = table[: math.ceil(n / block)].long()
    keys = cache64[0][blocks].flatten(0, 1)[:n]  # [S, KV, D]
    values = cache64[1][blocks].flatten(0, 1)[:n]
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [S, H, D]
    scores = torch.einsum("lhd,shd->hls", q.double(), keys) * scale
    visible = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), values)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.double(), ref.double()
    rel = float((out - ref).norm() / ref.norm())
    return {"rel": rel if math.isfinite(rel) else float("inf"),
            "max_abs_over_absmax": float((out - ref).abs().max() / ref.abs().max())}


def kernel_case(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor], block: int, width: int,
                device: str, seed: int) -> dict[str, Any]:
    """qs[i] [n_i, H, D] the queries of sequence i at positions 0..n_i-1 (their last is the decode query)."""
    from r1deploy.kernels.decode_attention import decode_attention
    from r1deploy.kernels.prefill_attention import prefill_attention

    lens = [k.shape[0] for k in ks]
    head_dim = ks[0].shape[-1]
    scale = head_dim**-0.5
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = paged_tables(lens, block, width, gen, device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    out: dict[str, Any] = {"seq_lens": lens}
    refs64 = {}
    for label, kv_dtype in (("fp8", FP8_KV_DTYPE), ("bf16", torch.bfloat16)):
        cache, write = write_cache(ks, vs, tables, num_blocks, block, kv_dtype, device)
        case = out[label] = dict(write)
        cache64 = cache.float().double()  # the same cache contents, widened exactly
        # decode: one query per sequence, the last position
        q_dec = torch.stack([q[-1] for q in qs]).to(torch.bfloat16)
        got = decode_attention(q_dec, cache, tables, seq_lens, scale)
        want = [ref_attention(q_dec[i : i + 1], cache64, tables[i], n, torch.tensor([n - 1], device=device), scale)[0]
                for i, n in enumerate(lens)]
        refs64[label] = want
        case["decode"] = {str(n): errors(got[i], want[i]) for i, n in enumerate(lens)}
        # full prefill: every sequence's queries from position 0, one varlen launch
        q_pre = torch.cat(qs).to(torch.bfloat16)
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        got = prefill_attention(q_pre, cache, tables, starts, seq_lens, max(lens), scale)
        case["prefill"] = {}
        for i, n in enumerate(lens):
            s = int(starts[i])
            want_i = ref_attention(q_pre[s : s + n], cache64, tables[i], n, torch.arange(n, device=device), scale)
            case["prefill"][str(n)] = errors(got[s : s + n], want_i)
        # chunked prefill: the last 64 (or fewer) queries of each sequence over its cached prefix
        chunk = [min(64, n) for n in lens]
        q_chk = torch.cat([q[-c:] for q, c in zip(qs, chunk, strict=True)]).to(torch.bfloat16)
        starts = torch.tensor([0, *torch.tensor(chunk).cumsum(0).tolist()], dtype=torch.int32, device=device)
        got = prefill_attention(q_chk, cache, tables, starts, seq_lens, max(chunk), scale)
        case["prefill_chunked"] = {}
        for i, (n, c) in enumerate(zip(lens, chunk, strict=True)):
            s = int(starts[i])
            want_i = ref_attention(q_chk[s : s + c], cache64, tables[i], n, torch.arange(n - c, n, device=device),
                                   scale)
            case["prefill_chunked"][str(n)] = errors(got[s : s + c], want_i)
        case["worst_rel"] = max(e["rel"] for kind in ("decode", "prefill", "prefill_chunked")
                                for e in case[kind].values())
        del cache, cache64
    out["fp8_ref_vs_bf16_ref_decode"] = {str(n): errors(a, b) for n, a, b in zip(lens, refs64["fp8"], refs64["bf16"],
                                                                                 strict=True)}
    return out


def kernel_check(shape: dict[str, int], lens: list[int], width: int, device: str, captured: dict[int, Any],
                 std: dict[str, float], result: dict[str, Any], save: Callable) -> None:
    part = result.setdefault("kernels", {"shape": shape, "table_width_blocks": width})
    heads, kv_heads, head_dim, block = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], shape["block_size"]
    gen = torch.Generator(device=device).manual_seed(11)
    sources: dict[str, Callable[[], tuple[list, list, list]]] = {}

    def randn(*size: int, s: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * s).to(torch.bfloat16)

    sources["random_std_matched"] = lambda: (
        [randn(n, heads, head_dim, s=std["q"]) for n in lens], [randn(n, kv_heads, head_dim, s=std["k"]) for n in lens],
        [randn(n, kv_heads, head_dim, s=std["v"]) for n in lens])
    for layer, t in captured.items():
        sources[f"real_layer_{layer}"] = lambda t=t: ([t["q"][:n] for n in lens], [t["k"][:n] for n in lens],
                                                     [t["v"][:n] for n in lens])
    part["std_used_for_random"] = std
    for name, make in sources.items():
        start = time.perf_counter()
        try:
            qs, ks, vs = make()
            part[name] = kernel_case(qs, ks, vs, block, width, device, seed=5)
            sync()
        except Exception as exc:  # noqa: BLE001
            part[name] = error_record(exc)
        part[name]["seconds"] = time.perf_counter() - start
        r = part[name]
        if "fp8" in r:
            print(f"kernels {name}: worst rel. error fp8 cache {r['fp8']['worst_rel']:.2e}, bf16 cache "
                  f"{r['bf16']['worst_rel']:.2e}; write kernel vs ref mismatches fp8 "
                  f"{r['fp8']['write_vs_ref_mismatched_elements']}; ({r['seconds']:.1f} s)", flush=True)
        else:
            print(f"kernels {name}: {r.get('error')}", flush=True)
        save()
        release()


def capture_long(model: torch.nn.Module, config: Any, length: int, layers: tuple[int, ...], device: str
                 ) -> tuple[dict[int, Any], dict[str, Any]]:
    """One prefill of `length` random tokens (bf16 cache): q/k/v of `layers`, and every layer's statistics."""
    rng = random.Random(21)
    prompt = [rng.randrange(config.vocab_size) for _ in range(length)]
    blocks = -(-length // BLOCK)
    caches = [torch.zeros(model.kv_cache_spec.shape(blocks, BLOCK), dtype=next(model.parameters()).dtype,
                          device=device) for _ in range(config.num_hidden_layers)]
    batch = ForwardBatch.build([prompt], [0], [list(range(blocks))], BLOCK, device)
    with Capture(model, keep=layers) as cap, torch.inference_mode():
        model(batch, caches)
    del caches
    tensors = {layer: {n: torch.cat(x) for n, x in t.items()} for layer, t in cap.tensors.items()}
    return tensors, cap.summary()


# ---- driver --------------------------------------------------------------------------------------------------------


def fmt(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    if "error" in c:
        return "ERROR"
    return f"{c['rel']:.2e}/{c['agree']:.2f}{'' if c['first_token_agree'] else '*'}"


def short_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"ERROR {row['error']}"
    return ", ".join(f"{k} {fmt(row.get(k))}" for k in ("fp8", "fp8_fake", "fp8_vs_fp8_fake", "perturb_4",
                                                         "perturb_6", "torch_bf16", "torch_fp8_vs_torch_bf16")
                     if k in row)


SHORT = {"fp8_vs_fp8_fake": "fp8~fp8_fake", "perturb_4": "perturb 2^-4", "perturb_6": "perturb 2^-6",
         "torch_fp8_vs_torch_bf16": "torch fp8~bf16", "fp8_vs_torch_fp8": "fp8~torch_fp8"}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['gpu']}, torch {result['torch']}, triton {result['triton']}, {result['shape']}, "
          f"{result['config']['num_hidden_layers']} layers; prompt {result['sizes']['prompt_len']} + "
          f"{result['sizes']['steps']} teacher-forced steps")
    print("logits rel. error / argmax agreement vs the bf16-KV bf16 model (* = first greedy token differs); "
          "a~b: a against b instead")
    cols = ["fp8", "fp8_fake", "fp8_vs_fp8_fake", "perturb_4", "perturb_6", "torch_bf16", "torch_fp8_vs_torch_bf16",
            "fp8_vs_torch_fp8", "fp32"]
    scan = result.get("depth_scan", {})
    present = [c for c in cols if any(c in row for row in scan.values())]
    print("depth " + "".join(f"{SHORT.get(c, c):>16}" for c in present))
    for depth, row in scan.items():
        if "error" in row:
            print(f"{depth:>5} ERROR {row['error']}")
            continue
        print(f"{depth:>5} " + "".join(f"{fmt(row.get(c)):>16}" for c in present))
    k = result.get("kernels", {})
    for name, r in k.items():
        if isinstance(r, dict) and ("fp8" in r or "error" in r):
            if "error" in r:
                print(f"kernels {name}: ERROR {r['error']}")
                continue
            intrinsic = max(e["rel"] for e in r["fp8_ref_vs_bf16_ref_decode"].values())
            print(f"kernels {name} (lens {r['seq_lens']}): worst rel. error vs float64, fp8 cache "
                  f"{r['fp8']['worst_rel']:.2e}, bf16 cache {r['bf16']['worst_rel']:.2e}; FP8 write kernel byte "
                  f"mismatches {r['fp8']['write_vs_ref_mismatched_elements']}; FP8's own effect on the decode output "
                  f"(float64 ref, fp8 vs bf16 cache) {intrinsic:.2e}")
    amax = result.get("amax_prompt_run") or result.get("amax_long_prefill")
    if isinstance(amax, dict) and amax and "error" not in amax:
        ka = [r["k_amax"] for r in amax.values()]
        va = [r["v_amax"] for r in amax.values()]
        ke = [r["k_fp8_rel_rms_err"] for r in amax.values()]
        ve = [r["v_fp8_rel_rms_err"] for r in amax.values()]
        print(f"per-layer amax |k| max {max(ka):.3g} (min {min(ka):.3g}), |v| max {max(va):.3g} (min {min(va):.3g}); "
              f"saturation at 448: {'YES' if max(ka + va) > FP8_KV_MAX else 'no'}; FP8 rel. RMS rounding error "
              f"k {min(ke):.3f}-{max(ke):.3f}, v {min(ve):.3f}-{max(ve):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="r1-distill-qwen-7b")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help=f"shrink the config for CPU testing: {TINY}")
    parser.add_argument("--layers", type=int, default=0, help="override num_hidden_layers")
    parser.add_argument("--prompt-len", type=int, default=0, help="default 128 (--tiny: 48)")
    parser.add_argument("--steps", type=int, default=0, help="teacher-forced decode steps; default 32 (--tiny: 8)")
    parser.add_argument("--kernel-lens", default="", help="comma list; default 17,300,2048 (--tiny: 5,17,40)")
    parser.add_argument("--parts", default="depth,kernels,fp32", help="comma list of depth,kernels,fp32")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "h200_fp8_kv_probe.json"))
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu (with --tiny)")
    parts = set(filter(None, args.parts.split(",")))
    interpreter = patch_interpreter() if device == "cpu" else False
    dtype = torch.bfloat16

    raw = json.loads(resolve_config_path(args.shape).read_text())
    if args.tiny:
        raw.update(TINY)
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    num_layers = raw["num_hidden_layers"]
    prompt_len = args.prompt_len or (48 if args.tiny else 128)
    steps = args.steps or (8 if args.tiny else 32)
    lens = [int(x) for x in args.kernel_lens.split(",")] if args.kernel_lens else (
        [5, 17, 40] if args.tiny else [17, 300, 2048])
    depths = sorted({d for d in DEPTHS if d < num_layers} | {num_layers})
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    shape = {"num_heads": raw["num_attention_heads"], "num_kv_heads": raw["num_key_value_heads"],
             "head_dim": head_dim, "block_size": BLOCK}
    width = max(math.ceil(max(lens) / BLOCK), 4096 // BLOCK if device == "cuda" else 0)  # a graph's static table

    result: dict[str, Any] = {**header(sys.argv), "shape": args.shape + (" (tiny)" if args.tiny else ""),
                              "device": device, "dtype": "bfloat16", "triton_interpreter": interpreter,
                              "config": {k: raw[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                             "num_key_value_heads", "num_hidden_layers", "vocab_size")},
                              "sizes": {"prompt_len": prompt_len, "steps": steps, "depths": depths,
                                        "kernel_seq_lens": lens, "block_size": BLOCK},
                              "weights": "init_dummy_weights(seed 0): Normal(0, 0.02), zero biases, unit norms",
                              "kv_scales": "1.0 (k_scale = v_scale = 1.0, the engine's default)"}
    out = Path(args.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    start = time.perf_counter()
    save()
    torch.manual_seed(0)
    model, config = build_model(raw, dtype, torch.device(device))
    init_dummy_weights(model)
    sync()
    result["build_s"] = time.perf_counter() - start
    rng = random.Random(3)
    prompt = [rng.randrange(config.vocab_size) for _ in range(prompt_len)]
    refs: dict[int, tuple[list[int], torch.Tensor]] = {}

    if "depth" in parts:
        t = time.perf_counter()
        depth_scan(model, config, depths, prompt, steps, device, dtype, result, save, refs, capture_full=True)
        result["depth_scan_s"] = time.perf_counter() - t
        save()

    if "kernels" in parts:
        t = time.perf_counter()
        captured: dict[int, Any] = {}
        try:
            captured, summary = capture_long(model, config, max(lens), (0, num_layers - 1), device)
            result["amax_long_prefill"] = summary
        except Exception as exc:  # noqa: BLE001
            result["amax_long_prefill"] = error_record(exc)
        save()
        std = {"q": 1.0, "k": 1.0, "v": 1.0}
        stats = result.get("amax_long_prefill")
        if isinstance(stats, dict) and 0 in stats:
            std = {n: stats[0][f"{n}_std"] for n in "qkv"}
        kernel_check(shape, lens, width, device, captured, std, result, save)
        del captured
        result["kernels_s"] = time.perf_counter() - t
        save()
        release()

    if "fp32" in parts and refs:
        t = time.perf_counter()
        try:
            fp32_scan(model, config, depths, prompt, steps, device, result, save, refs)
        except Exception as exc:  # noqa: BLE001
            result["fp32_error"] = error_record(exc)
        result["fp32_s"] = time.perf_counter() - t

    result["verdict_inputs"] = verdict(result)
    result["wall_s"] = time.perf_counter() - start
    save()
    print_table(result)
    print(f"\nverdict inputs: {json.dumps(result['verdict_inputs'])}")
    print(f"wrote {out} in {result['wall_s']:.1f} s")


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the bug-or-chaos call rests on, at full depth (no threshold is decided here)."""
    scan = result.get("depth_scan", {})
    if not scan:
        return {}
    full = scan[max(scan, key=int)]
    pick = lambda key: full.get(key, {}).get("rel") if isinstance(full.get(key), dict) else None
    kernels = result.get("kernels", {})
    worst = {name: r["fp8"]["worst_rel"] for name, r in kernels.items() if isinstance(r, dict) and "fp8" in r}
    return {"full_depth_rel": {k: pick(k) for k in ("fp8", "fp8_fake", "fp8_vs_fp8_fake", "perturb_4", "perturb_6",
                                                    "torch_bf16", "torch_fp8_vs_torch_bf16", "fp8_vs_torch_fp8",
                                                    "fp32")},
            "kernel_worst_rel_fp8_cache": worst,
            "reading": "bug if fp8_vs_fp8_fake or fp8_vs_torch_fp8 is large next to torch_bf16 (the kernels' own "
                       "noise), or a kernel's worst rel. error on the fp8 cache is >> its bf16-cache baseline; "
                       "chaos if those are small and perturb_4 / fp32 / torch_bf16 are comparable to fp8 at full "
                       "depth while fp8 is small at depth 1-2"}


if __name__ == "__main__":
    main()
