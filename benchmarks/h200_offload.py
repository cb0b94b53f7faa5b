"""DeepSeek-R1 MoE layers at full width with the routed experts offloaded to pinned host memory (issue 9).

A DeepSeek-R1-shaped model (the `r1` preset's config.json with its FP8 block quantization_config; `--bf16`
drops it) cut to one dense layer + N MoE layers (default 16: ~180 GB of FP8 experts, more than one H200
holds), random weights (load_format="dummy"). Offloaded: every routed expert in pinned host memory (FP8 +
block scales, TieredExpertStore, `--offload experts`), a GPU slot budget of `--gpu-budget-layers` layers'
worth of experts (default 4 of N), LRU, prefetch from the next layer's router. Resident: the same shape with
everything on the GPU, with 1 MoE layer and with the most MoE layers (<= N) that fit, K, so the per-MoE-layer
cost is (t_K - t_1) / (K - 1) and the rest of a step (embedding, dense layer, lm_head) is t_1 minus one layer.

Per case and batch size (1 and 32, prompt 128, 64 / 16 new tokens, greedy, EOS ignored): prefill time,
decode tok/s over the decode steps only, median step time, and over the decode steps the store's hits,
misses, hit rate, bytes moved, evictions, prefetches and stall time. The offloaded engine steps eagerly
(a store decides copies on the host, so the model declines CUDA graphs); the resident one is timed with
graphs (the engine's default) and, at batch 1, eager too, for a like-for-like per-layer comparison. Beside
each: the planner's expert-offload prediction (r1deploy.plan.offload.plan_offload, what `r1deploy plan
--offload experts --gpu-weight-budget GB` prints). Writes JSON after every case; prints a table at the end.

    python3 benchmarks/h200_offload.py --out $OUT/offload.json          # H200 with >= 240 GiB host RAM, ~5 min
    python3 benchmarks/h200_offload.py --smoke --out /tmp/offload.json  # tiny config on the CPU, seconds
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from h200_quant import header  # the benchmarks folder is not a package

from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import EngineConfig, OffloadConfig
from r1deploy.presets import resolve_config_path
from r1deploy.sampling_params import SamplingParams

GiB = 1 << 30
HOST_SHARE = 0.75  # the expert host tier may take this share of the host RAM available at start
GPU_SHARE = 0.65  # resident weights may take this share of the GPU (R1 MoE steps peak at ~15 GiB of activations)
SMOKE_CONFIG = {  # DeepSeek-V3 layout at toy width: runs on the CPU in seconds
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "float32",
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 5, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 16, "n_group": 4,
    "topk_group": 2, "num_experts_per_tok": 4, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}


def r1_config(moe_layers: int, fp8: bool = True) -> dict[str, Any]:
    """The r1 preset at full width: 1 dense + moe_layers MoE layers; FP8 block weights unless fp8=False."""
    raw = json.loads(resolve_config_path("r1").read_text())
    if not fp8:
        raw.pop("quantization_config", None)
    raw.update(num_hidden_layers=1 + moe_layers, first_k_dense_replace=1, num_nextn_predict_layers=0,
               torch_dtype="bfloat16")
    return raw


def smoke_config(moe_layers: int, fp8: bool = True) -> dict[str, Any]:
    """FP8 at toy width: 16 x 16 scale blocks (the toy dims are below R1's 128)."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    return dict(SMOKE_CONFIG, num_hidden_layers=1 + moe_layers, **({"quantization_config": quant} if fp8 else {}))


def expert_bytes(raw: dict[str, Any], dtype: torch.dtype) -> int:
    """One routed expert's gate + up + down in the host tier: bf16 (dtype), or FP8 + fp32 block scales."""
    h, i = raw["hidden_size"], raw["moe_intermediate_size"]
    block = (raw.get("quantization_config") or {}).get("weight_block_size")
    if not block:
        return 3 * h * i * dtype.itemsize
    tiles = 2 * math.ceil(i / block[0]) * math.ceil(h / block[1]) + math.ceil(h / block[0]) * math.ceil(i / block[1])
    return 3 * h * i + 4 * tiles


def write_config_dir(root: Path, name: str, raw: dict[str, Any]) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_memory() -> dict[str, float]:
    import psutil

    vm = psutil.virtual_memory()
    return {"host_rss_GiB": psutil.Process().memory_info().rss / GiB, "host_available_GiB": vm.available / GiB,
            "host_total_GiB": vm.total / GiB}


def stats_dict(store: Any) -> dict[str, Any]:
    st = store.stats()
    keys = ("hits", "misses", "host_hits", "bytes_to_device", "evictions", "prefetches", "prefetch_hits",
            "prefetch_dropped", "cpu_computes", "stall_s")
    return {**{k: getattr(st, k) for k in keys}, "hit_rate": st.hit_rate}


def decode_phase(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, store: Any = None) -> dict[str, Any]:
    """Queue every prompt, step until each has its first token (prefill), then time the decode steps alone.
    The store's counters cover the decode steps only."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    requests = [engine.make_request(p, params) for p in prompts]
    for r in requests:
        engine.enqueue(r)
    sync()
    t0 = time.perf_counter()
    while not all(r.output_token_ids for r in requests):
        engine.step(final_only=True)
    sync()
    t1 = time.perf_counter()
    if store is not None:
        store.reset_stats()
    step_times = []
    while engine.has_unfinished_requests():
        s0 = time.perf_counter()
        engine.step(final_only=True)
        step_times.append(time.perf_counter() - s0)
    sync()
    t2 = time.perf_counter()
    decoded = sum(len(r.output_token_ids) for r in requests) - len(requests)
    out = {"batch": len(prompts), "prompt_len": len(prompts[0]), "new_tokens": new_tokens,
           "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": len(step_times),
           "decode_tok_s": decoded / (t2 - t1) if t2 > t1 else None,
           "median_step_ms": 1e3 * statistics.median(step_times) if step_times else None,
           "end_to_end_tok_s": (decoded + len(requests)) / (t2 - t0)}
    if store is not None:
        st = stats_dict(store)
        steps = max(len(step_times), 1)
        st.update(misses_per_step=st["misses"] / steps, bytes_per_step=st["bytes_to_device"] / steps,
                  stall_ms_per_step=1e3 * st["stall_s"] / steps,
                  pcie_GBps_during_decode=st["bytes_to_device"] / (t2 - t1) / 1e9 if t2 > t1 else None)
        out["store"] = st
    return out


def prompts_for(rng: random.Random, vocab: int, batch: int, length: int) -> list[list[int]]:
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(batch)]


def run_case(engine: LLMEngine, batches: list[tuple[int, int]], prompt_len: int, store: Any = None,
             eager_too: bool = False) -> dict[str, Any]:
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    results: dict[str, Any] = {}
    for bs, new in batches:
        decode_phase(engine, prompts_for(rng, vocab, bs, prompt_len), 3, store)  # warm-up (Triton shapes, slots)
        results[f"bs{bs}"] = decode_phase(engine, prompts_for(rng, vocab, bs, prompt_len), new, store)
        r = results[f"bs{bs}"]
        print(f"  bs {bs}: decode {r['decode_tok_s']:.1f} tok/s, step {r['median_step_ms']:.1f} ms, "
              f"prefill {r['prefill_s']:.2f} s" + (f", hit rate {r['store']['hit_rate']:.3f}, "
                                                    f"{r['store']['misses_per_step']:.1f} misses/step"
                                                    if store is not None else ""), flush=True)
        if eager_too and bs == 1 and engine.runner.graphs is not None:
            graphs, engine.runner.graphs = engine.runner.graphs, None  # the offloaded engine's eager steps
            try:
                results[f"bs{bs}_eager"] = decode_phase(engine, prompts_for(rng, vocab, bs, prompt_len), new)
            finally:
                engine.runner.graphs = graphs
            print(f"  bs {bs} eager: step {results[f'bs{bs}_eager']['median_step_ms']:.1f} ms", flush=True)
    return results


def _host_register_works() -> bool:
    from r1deploy.weights import tiered_store

    probe = torch.empty(1 << 20, dtype=torch.uint8)
    if not tiered_store._host_register(probe):
        return False
    tiered_store._host_unregister(probe)
    return True


def release() -> None:
    """After the caller dropped its last reference to an engine: the engine sits in reference cycles, so
    its weights are freed only by a collection, which must come before the next engine sizes its KV pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def planner(config_path: Path, batches: list[tuple[int, int]], prompt_len: int, budget_gb: float,
            fp8: bool) -> dict[str, Any]:
    """plan_offload for this config on one H200 at each batch size (FP8 or bf16 weights, uniform routing)."""
    from r1deploy.plan.catalog import Catalog
    from r1deploy.plan.offload import plan_offload
    from r1deploy.plan.planner import build_settings

    gpu = Catalog.load().get("h200")
    out = {}
    for bs, new in batches:
        s = build_settings(str(config_path), weights="fp8" if fp8 else "bf16", concurrency=bs, input_len=prompt_len, output_len=new)
        p = plan_offload(s, gpu, budget_gb)
        out[f"bs{bs}"] = {k: getattr(p, k) for k in (
            "decode_tokens_per_s", "hit_rate", "misses_per_step", "touched_per_layer", "expert_slots",
            "experts_total", "miss_path", "copy_s_per_expert", "gpu_step_s", "miss_s", "step_s",
            "pcie_bytes_per_token", "pcie_bytes_per_s_one_direction", "host_pinned_bytes", "feasible", "problem")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--moe-layers", type=int, default=16,
                        help="MoE layers of the offloaded model (R1 experts: 11.3 GB each in FP8, 22.5 GB in bf16)")
    parser.add_argument("--gpu-budget-layers", type=float, default=4.0,
                        help="GPU expert slots, in MoE layers' worth of experts")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (drop the FP8 quantization_config)")
    parser.add_argument("--only", default="", help="comma list: resident,offload (default both)")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on the CPU (checks the script)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only
    smoke = args.smoke
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    prompt_len = 16 if smoke else 128
    # Few decode steps at batch 32: offloaded, each step touches most experts of every layer (GBs over PCIe).
    batches = [(1, 8), (4, 4)] if smoke else [(1, 64), (32, 16)]
    make = functools.partial(smoke_config if smoke else r1_config, fp8=not args.bf16)
    result: dict[str, Any] = header(sys.argv)
    result.update(smoke=smoke, device=device, dtype=str(dtype).removeprefix("torch."), fp8_weights=not args.bf16,
                  prompt_len=prompt_len,
                  batches={f"bs{b}": n for b, n in batches}, **{f"start_{k}": v for k, v in host_memory().items()})

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    # Size N against the host: the host tier holds every routed expert of the N layers, page-locked in place
    # (cudaHostRegister) or, where that fails, by torch's pinned allocator, which rounds each of the two
    # stacks (gate_up 2/3, down 1/3) up to a power of two.
    n = args.moe_layers
    probe = make(1)
    per_layer = probe["n_routed_experts"] * expert_bytes(probe, dtype)
    available = host_memory()["host_available_GiB"] * GiB
    exact = device != "cuda" or _host_register_works()
    result["host_pool_registered_in_place"] = exact

    def host_need(k: int) -> float:
        if exact:
            return k * per_layer
        return sum(1 << (math.ceil(math.log2(k * per_layer * share))) for share in (2 / 3, 1 / 3))

    while n > 1 and host_need(n) > HOST_SHARE * available:
        n -= 1
    if n != args.moe_layers:
        result["note"] = (f"--moe-layers {args.moe_layers} needs {host_need(args.moe_layers) / GiB:.0f} GiB of host "
                          f"memory for experts; {available / GiB:.0f} GiB available: ran {n}")
        print(result["note"], flush=True)
    result.update(moe_layers=n, expert_bytes=expert_bytes(probe, dtype), experts_per_layer=probe["n_routed_experts"],
                  expert_bytes_per_layer=per_layer)
    budget_gb = args.gpu_budget_layers * per_layer / 1e9 + 1e-6
    result["gpu_weight_budget_gb"] = budget_gb
    engine_config = {"max_model_len": prompt_len + max(b[1] for b in batches) + 16,
                     "max_num_seqs": max(b[0] for b in batches),
                     "max_num_batched_tokens": min(max(prompt_len * max(b[0] for b in batches), 256), 2048)}

    with tempfile.TemporaryDirectory(prefix="h200_offload_") as tmp:
        root = Path(tmp)
        # Resident: 1 MoE layer, and the most (<= N) whose weights fit the GPU (per-layer cost from the difference).
        if want("resident"):
            gpu_total = torch.cuda.mem_get_info()[1] if device == "cuda" else float("inf")
            non_expert = 8e9 if not smoke else 0  # embedding + lm_head 3.7 GB, dense layer 1.2 GB, 0.5 GB per MoE layer
            fitting = max((k for k in range(1, n + 1) if k * per_layer + non_expert < GPU_SHARE * gpu_total), default=1)
            layers = sorted({1, fitting})
            result["resident"] = {}
            for k in layers:
                path = write_config_dir(root, f"resident_{k}", make(k))
                print(f"resident: 1 dense + {k} MoE layers on the {device}", flush=True)
                start = time.perf_counter()
                try:
                    engine = LLMEngine(str(path), config=EngineConfig(**engine_config), device=device,
                                       dtype=dtype, load_format="dummy")
                except RuntimeError as exc:  # too deep for this GPU after all: recorded, the offloaded case goes on
                    result["resident"][f"moe{k}"] = {"moe_layers": k, "error": str(exc)}
                    print(f"  failed: {exc}", flush=True)
                    release()
                    save()
                    continue
                case = {"moe_layers": k, "startup_s": time.perf_counter() - start,
                        "cuda_graphs": engine.runner.graphs is not None}
                case.update(run_case(engine, batches, prompt_len, eager_too=True))
                case["planner_all_resident"] = planner(path / "config.json", batches, prompt_len,
                                                       k * per_layer / 1e9 + 1, fp8=not args.bf16)
                result["resident"][f"moe{k}"] = case
                engine.shutdown()
                del engine
                release()
                save()

        if want("offload"):
            from r1deploy.bench.target import load_offloaded_dummy

            path = write_config_dir(root, f"offload_{n}", make(n))
            offload = OffloadConfig(gpu_weight_budget_gb=budget_gb)
            print(f"offload: 1 dense + {n} MoE layers, experts in pinned host memory, "
                  f"{args.gpu_budget_layers:g} layer(s) of GPU slots", flush=True)
            start = time.perf_counter()
            loaded = load_offloaded_dummy(str(path), device, str(dtype).removeprefix("torch."), offload)
            load_s = time.perf_counter() - start
            engine = LLMEngine(str(path), config=EngineConfig(**engine_config, offload=offload), device=device,
                               loaded=loaded)
            store = engine.loaded.model.expert_store
            st = store.stats()
            case = {"moe_layers": n, "load_s": load_s, "startup_s": time.perf_counter() - start,
                    "cuda_graphs": engine.runner.graphs is not None, "gpu_slots": st.gpu_slots,
                    "host_slots": st.host_slots, "host_pool_GiB": st.host_bytes / GiB,
                    "pinned_GiB": st.pinned_bytes / GiB, **host_memory()}
            if device == "cuda":
                case["gpu_allocated_GiB"] = torch.cuda.memory_allocated() / GiB
            result["offload"] = case
            save()
            case.update(run_case(engine, batches, prompt_len, store=store))
            case["planner"] = planner(path / "config.json", batches, prompt_len, budget_gb, fp8=not args.bf16)
            case["peak_host_rss_GiB"] = host_memory()["host_rss_GiB"]
            engine.shutdown()
            del engine, loaded, store
            release()
            save()

    summarize(result, batches)
    save()
    print_table(result, batches)


def summarize(result: dict[str, Any], batches: list[tuple[int, int]]) -> None:
    """Per-MoE-layer step time: resident from the 1- and N-layer difference; offloaded against that base."""
    res, off = result.get("resident") or {}, result.get("offload")
    n = result["moe_layers"]
    k = max((case["moe_layers"] for case in res.values() if "error" not in case), default=1)  # the deepest run
    per_layer: dict[str, Any] = {}
    for bs, _ in batches:
        for mode in ("", "_eager"):
            key = f"bs{bs}{mode}"
            one = (res.get("moe1") or {}).get(key)
            many = (res.get(f"moe{k}") or {}).get(key) if k > 1 else None
            if not one:
                continue
            row: dict[str, Any] = {}
            if many:
                layer_ms = (many["median_step_ms"] - one["median_step_ms"]) / (k - 1)
                row.update(resident_layer_ms=layer_ms, base_ms=one["median_step_ms"] - layer_ms)
            o = (off or {}).get(f"bs{bs}")
            if o and many:
                row["offload_layer_ms"] = (o["median_step_ms"] - row["base_ms"]) / n
                if row["resident_layer_ms"] > 0:
                    row["offload_over_resident_per_layer"] = row["offload_layer_ms"] / row["resident_layer_ms"]
            elif o:  # one resident case only: its whole step against the offloaded step per MoE layer
                row.update(offload_step_ms_per_moe_layer=o["median_step_ms"] / n,
                           resident_step_ms_1_moe_layer=one["median_step_ms"])
            per_layer[key] = row
    result["per_moe_layer"] = per_layer


def print_table(result: dict[str, Any], batches: list[tuple[int, int]]) -> None:
    def f(v: Any, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    print(f"\n{result['gpu']}, torch {result['torch']}, 1 dense + {result['moe_layers']} MoE layers")
    print(f"{'case':<26}{'bs':>4}{'decode tok/s':>14}{'step ms':>10}{'hit rate':>10}{'miss/step':>11}"
          f"{'GB/step':>9}{'stall ms/step':>15}{'planned tok/s':>15}{'planned hit':>13}")
    for name, case in (result.get("resident") or {}).items():
        for bs, _ in batches:
            for mode in ("", "_eager"):
                r = case.get(f"bs{bs}{mode}")
                if r:
                    plan = (case.get("planner_all_resident") or {}).get(f"bs{bs}", {})
                    print(f"{'resident ' + name + (' eager' if mode else ''):<26}{bs:>4}{f(r['decode_tok_s']):>14}"
                          f"{f(r['median_step_ms'], '.2f'):>10}{'1.000':>10}{'0':>11}{'0':>9}{'0':>15}"
                          f"{f(plan.get('decode_tokens_per_s')):>15}{f(plan.get('hit_rate'), '.3f'):>13}")
    off = result.get("offload")
    if off:
        for bs, _ in batches:
            r = off.get(f"bs{bs}")
            if not r:
                continue
            s, plan = r["store"], (off.get("planner") or {}).get(f"bs{bs}", {})
            print(f"{'offload moe' + str(result['moe_layers']):<26}{bs:>4}{f(r['decode_tok_s']):>14}"
                  f"{f(r['median_step_ms'], '.2f'):>10}{f(s['hit_rate'], '.3f'):>10}{f(s['misses_per_step']):>11}"
                  f"{f(s['bytes_per_step'] / 1e9, '.2f'):>9}{f(s['stall_ms_per_step'], '.2f'):>15}"
                  f"{f(plan.get('decode_tokens_per_s')):>15}{f(plan.get('hit_rate'), '.3f'):>13}")
    for key, row in (result.get("per_moe_layer") or {}).items():
        print(f"per MoE layer {key}: " + ", ".join(f"{k} {f(v, '.3f')}" for k, v in row.items()))


if __name__ == "__main__":
    main()
