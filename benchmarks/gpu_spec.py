"""Speculative decoding on one GPU, random weights at real shapes, the oracle drafter at chosen acceptance
(issue 18's "Measure" table). Random weights accept almost no real drafts, so the oracle proposes the target's own
greedy continuation (from a plain run first) corrupted per position; the engine's real end-to-end speed at that
acceptance is measured. Every workload: plain greedy first (the reference), speculative greedy must equal it token
for token (correctness, recorded), then output tok/s both ways on the same engine (r1deploy/bench/spec_bench.py).

  (a) R1-Distill-Qwen-7B shape, batch 1, oracle k=3 at 0.8                     target >= 1.8x
  (b) R1 full width, FP8, reduced depth (--dense 3 --moe 4), batch 1:
      k=1 at 0.85 (>= 1.6x) and k=3 at 0.85/0.7/0.55 (>= 2.0x), the MTP head's propose() timed as the oracle's
      inner drafter when r1deploy.spec.mtp exists and the model has its MTP layer (else "mtp head not timed")
  (c) the same R1 model, batch 32, k=1 at 0.85                                 target: no slower (>= 1.0x)
  (d) verify-step cost: one step of 1+k tokens per sequence over a 1-token step at batch 1, 8, 32 (both models)

    python3 benchmarks/gpu_spec.py --out $OUT/gpu_spec.json        # one H100/H200, < 6 minutes
    python3 benchmarks/gpu_spec.py --cpu-smoke --out /tmp/spec.json # tiny shapes on the CPU (tests the script)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from r1deploy.bench.spec_bench import oracle_speedup, use_proposer, verify_step_cost
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine_config import SPECULATIVE_METHODS, EngineConfig, SpeculativeConfig
from r1deploy.presets import resolve_config_path

K3 = (0.85, 0.7, 0.55)
BATCHES = (1, 8, 32)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
TINY_MLA = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
            "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
            "num_experts_per_tok": 2}


def write_config(raw: dict, directory: Path, name: str) -> str:
    path = directory / name
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return str(path)


def dense_model(smoke: bool, directory: Path) -> str:
    if not smoke:
        return "r1-distill-qwen-7b"
    raw = json.loads(resolve_config_path("r1-distill-qwen-7b").read_text())
    return write_config({**raw, **TINY, "torch_dtype": "float32"}, directory, "dense_tiny")


def r1_model(smoke: bool, dense: int, moe: int, mtp: bool, directory: Path) -> str:
    """R1's config at full width (FP8 as its quantization_config says) with dense + moe layers; --cpu-smoke: tiny
    widths, float32. mtp: keep one MTP layer (num_nextn_predict_layers) for the MTP head."""
    raw = json.loads(resolve_config_path("r1").read_text())
    raw.update(num_hidden_layers=dense + moe, first_k_dense_replace=dense, num_nextn_predict_layers=int(mtp))
    if smoke:
        raw.pop("quantization_config", None)
        raw.update(TINY_MLA, torch_dtype="float32")
    return write_config(raw, directory, f"r1_{dense}d{moe}m{'_mtp' if mtp else ''}")


def build(model: str, device: str, max_model_len: int, speculative: SpeculativeConfig | None = None) -> LLMEngine:
    """CUDA graphs for query lengths 1 (decode), 2 (k=1) and 4 (k=3); prefix caching off, so repeated prompts are
    computed the same way every run (a cached prefix is a different bf16 computation)."""
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=32, max_num_batched_tokens=4096,
                          enable_prefix_caching=False, graph_query_lens=(1, 2, 4), speculative=speculative)
    return LLMEngine(model, config=config, device=device, load_format="dummy")


def mtp_engine(model_dir: str, device: str, max_model_len: int) -> tuple[LLMEngine | None, Any, str]:
    """The R1 engine with the MTP head as the oracle's inner drafter, when this build has one."""
    if "mtp" not in SPECULATIVE_METHODS or importlib.util.find_spec("r1deploy.spec.mtp") is None:
        return None, None, "mtp head not timed: r1deploy.spec.mtp is not in this build"
    try:
        engine = build(model_dir, device, max_model_len,
                       SpeculativeConfig("oracle", 3, acceptance=(1.0,), references={}, inner="mtp"))
    except Exception as exc:  # noqa: BLE001 - recorded; the oracle alone is still measured
        return None, None, f"mtp head not timed: {type(exc).__name__}: {exc}"
    inner = engine.proposer.inner  # type: ignore[union-attr]
    use_proposer(engine, None)
    return engine, inner, "mtp head timed: its propose() runs before each oracle proposal, its drafts discarded"


def release() -> None:
    """After an engine's function returned: its weights, KV pool and graphs go before the next model loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts(engine: LLMEngine, batch: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.model_config.vocab_size, (batch, length), generator=generator).tolist()


def sizes(smoke: bool) -> dict[str, Any]:
    return ({"prompt_len": 16, "new_tokens": 24, "new_tokens_b32": 12, "steps": 4} if smoke
            else {"prompt_len": 128, "new_tokens": 256, "new_tokens_b32": 128, "steps": 16})


def dense_workloads(args: argparse.Namespace, result: dict, directory: Path) -> None:
    """(a) and (d) on the R1-Distill-Qwen-7B shape."""
    size, device = sizes(args.cpu_smoke), "cpu" if args.cpu_smoke else "cuda"
    started = time.perf_counter()
    engine = build(dense_model(args.cpu_smoke, directory), device, 1024)
    result["startup_s"]["dense"] = time.perf_counter() - started
    result["workloads"].append({"workload": "a: 7B shape, batch 1, k=3 at 0.8", "target_speedup": 1.8,
                                **oracle_speedup(engine, prompts(engine, 1, size["prompt_len"], 0),
                                                 size["new_tokens"], 3, (0.8,) * 3)})
    print(json.dumps(result["workloads"][-1]), flush=True)
    result["verify_step_cost"] += [{"model": "7B shape", **row} for row in verify_step_cost(
        engine, 3, BATCHES, prompt_len=size["prompt_len"], steps=size["steps"])]
    engine.shutdown()


def r1_workloads(args: argparse.Namespace, result: dict, directory: Path) -> None:
    """(b), (c) and (d) on R1 at full width, reduced depth, with the MTP head as the inner drafter if it exists."""
    size, device = sizes(args.cpu_smoke), "cpu" if args.cpu_smoke else "cuda"
    started = time.perf_counter()
    engine, inner, result["mtp"] = (None, None, "mtp head not timed: --no-mtp") if args.no_mtp else \
        mtp_engine(r1_model(args.cpu_smoke, args.dense, args.moe, True, directory), device, 1024)
    if engine is None:
        release()  # whatever a failed MTP build left
        engine = build(r1_model(args.cpu_smoke, args.dense, args.moe, False, directory), device, 1024)
    result["startup_s"]["r1"] = time.perf_counter() - started
    result["r1_weight_dtypes"] = sorted({str(p.dtype) for p in engine.loaded.model.parameters()})
    r1 = f"R1 {args.dense} dense + {args.moe} MoE layers"
    for name, batch, k, acceptance, target, tokens in (
            ("b: batch 1, k=1 at 0.85", 1, 1, (0.85,), 1.6, size["new_tokens"]),
            ("b: batch 1, k=3 at 0.85/0.7/0.55", 1, 3, K3, 2.0, size["new_tokens"]),
            ("c: batch 32, k=1 at 0.85", 32, 1, (0.85,), 1.0, size["new_tokens_b32"])):
        result["workloads"].append({"workload": f"{name} ({r1})", "target_speedup": target,
                                    **oracle_speedup(engine, prompts(engine, batch, size["prompt_len"], batch),
                                                     tokens, k, acceptance, inner=inner)})
        print(json.dumps(result["workloads"][-1]), flush=True)
    for k in (1, 3):
        result["verify_step_cost"] += [{"model": r1, **row} for row in verify_step_cost(
            engine, k, BATCHES, prompt_len=size["prompt_len"], steps=size["steps"])]
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dense", type=int, default=3, help="R1 model: dense layers")
    parser.add_argument("--moe", type=int, default=4, help="R1 model: MoE layers")
    parser.add_argument("--no-mtp", action="store_true", help="do not time the MTP head as the inner drafter")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_spec.py: no CUDA device; run on a GPU or pass --cpu-smoke")
    result: dict = {"command": "python3 benchmarks/gpu_spec.py " + " ".join(sys.argv[1:]),
                    "device": "cpu (smoke: tiny shapes)" if args.cpu_smoke else torch.cuda.get_device_name(),
                    "host": platform.node(), "torch": torch.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "weights": "random (load_format dummy)", "startup_s": {}, "workloads": [], "verify_step_cost": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dense_workloads(args, result, Path(tmp))
        release()
        r1_workloads(args, result, Path(tmp))
        release()
    result["wall_s"] = time.perf_counter() - started
    for row in result["workloads"]:
        row["meets_target"] = row["tokens_equal"] and row["speedup"] >= row["target_speedup"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'workload':<58} {'equal':>5} {'plain tok/s':>11} {'spec tok/s':>10} {'x':>6} {'target':>6} "
          f"{'accept/pos':>16} {'len':>5}")
    for row in result["workloads"]:
        rates = "/".join(f"{r:.2f}" for r in row["spec"]["acceptance_per_position"])
        print(f"{row['workload'][:58]:<58} {row['tokens_equal']!s:>5} {row['plain_tok_s']:>11.1f} "
              f"{row['spec_tok_s']:>10.1f} {row['speedup']:>6.2f} {row['target_speedup']:>6.1f} {rates:>16} "
              f"{row['spec']['mean_accepted_length']:>5.2f}")
    for row in result["verify_step_cost"]:
        print(f"verify step 1+{row['k']} vs 1, {row['model']}, batch {row['batch']:>2}: "
              f"{row['verify_step_ms']:.2f} / {row['plain_step_ms']:.2f} ms = x{row['verify_over_plain']:.2f}")
    print(f"{result['mtp']}; wall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
