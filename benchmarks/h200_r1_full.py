"""DeepSeek-R1 671B on 8x H200: random FP8 weights at the real shapes, the whole run in one script.

The `r1` preset's config.json (61 layers, 256 routed experts, MLA, the real vocabulary, its FP8 block
quantization_config; ~685 GB) with load_format="dummy": every rank makes its shard's random weights on its GPU,
no checkpoint is written or read. TP = --tp (default: every visible GPU), the routed experts split E/N per rank
(EP = TP), --dp-attention optional. `--layers K` cuts the model to K layers (3 dense + K-3 MoE, as R1's first
three; 1 + K-1 when K <= 3) for a scaled-down dry run on fewer GPUs.

Sections, each written to --out as soon as it is measured:
  startup   seconds to a ready engine (worker spawn, random weights, KV pool, CUDA graphs), KV capacity in tokens
  decode    `r1deploy bench`'s in-process closed loop at each --concurrency C (C requests, C in flight,
            --input-len / --output-len tokens, EOS ignored), cut at --max-seconds: no request starts after it and
            those still running are aborted; their tokens so far count in output tok/s (read from the engine's
            queues), not in the latency percentiles, which cover finished requests only
  seed      `deepseek-benchmark --model r1 --batch 32 --seq 2048 --repeat 100` in-process: after one warm-up
            round, --repeat rounds of --batch concurrent --seq-token prompts (--seed-output-len, default the
            bench's 128) and the seed SLO verdict; cut at --seed-max-seconds (the rounds that finished are reported)
Beside each: the planner (r1deploy.plan.planner.plan_deployment) at this run's model and layout, the planner for
the full R1 on 8x H200 (TP8 EP8), and the published numbers below. Prints a table at the end.

    bash scripts/r1_x8.sh                                                     # the full run, 8x H200
    PYTHONPATH=$PWD python3 benchmarks/h200_r1_full.py --layers 17 --tp 2 --concurrency 1,32,256 \
        --input-len 256 --output-len 128 --max-seconds 45 --repeat 5 --seed-max-seconds 60 --out $OUT/r1_dry.json
    PYTHONPATH=$PWD python3 benchmarks/h200_r1_full.py --smoke --out /tmp/r1_smoke.json   # CPU, gloo, TP 2, tiny
"""

import os

# Before torch or NCCL start (here and in the TP workers, which inherit the environment): shared hosts must not
# use NVLink multicast (NVLS) or multicast symmetric memory.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from h200_offload import SMOKE_CONFIG, write_config_dir
from h200_quant import header

from r1deploy.bench.arrivals import Concurrency, Rounds, Schedule
from r1deploy.bench.benchmark import (
    DEFAULT_OUTPUT_LEN,
    Measured,
    Setup,
    engine_target,
    finish,
    make_specs,
    measure,
)
from r1deploy.bench.cli import register
from r1deploy.bench.runner import warm_up
from r1deploy.bench.slo import all_pass, targets_for
from r1deploy.plan.planner import plan_deployment
from r1deploy.presets import resolve_config_path

GiB = 1 << 30
R1_DENSE_LAYERS = 3  # R1's first_k_dense_replace
# As quoted in the issue (8x H200, FP8): output tokens/s per user (batch 1) or in total (concurrency 1024).
# --smoke: the code paths of the real run in seconds on a CPU.
SMOKE = {"tp": 2, "concurrency": "1,4", "input_len": 16, "output_len": 8, "max_seconds": 60.0, "batch": 4, "seq": 32,
         "seed_output_len": 8, "repeat": 2, "seed_max_seconds": 60.0}
PUBLISHED = [
    {"system": "TensorRT-LLM", "concurrency": 1, "tok_s_per_user": 158.0, "conditions": "8x H200 FP8, with MTP"},
    {"system": "SGLang", "concurrency": 1, "tok_s_per_user": 30.0, "conditions": "8x H200 FP8, no MTP (about)"},
    {"system": "TensorRT-LLM", "concurrency": 1024, "output_tok_s": 11489.0,
     "conditions": "8x H200 FP8, 1K in / 2K out"},
]


def model_config(layers: int | None, smoke: bool) -> dict[str, Any]:
    """The r1 preset (FP8 quantization_config kept), cut to `layers` layers; or the tiny smoke DeepSeek-V3."""
    if smoke:
        return dict(SMOKE_CONFIG)
    raw = json.loads(resolve_config_path("r1").read_text())
    if layers is not None:
        raw.update(num_hidden_layers=layers, first_k_dense_replace=R1_DENSE_LAYERS if layers > R1_DENSE_LAYERS else 1)
    return raw


def bench_args(model_dir: Path, args: argparse.Namespace, **overrides: Any) -> argparse.Namespace:
    """`r1deploy bench`'s own flags and defaults for the in-process engine, then this section's values."""
    parser = argparse.ArgumentParser(prog="r1deploy")
    register(parser.add_subparsers(dest="command"))
    argv = ["bench", "--model", str(model_dir), "--load-format", "dummy", "--tp", str(args.tp), "--no-progress"]
    argv += ["--dp-attention"] if args.dp_attention else []
    argv += ["--device", "cpu", "--dtype", "float32"] if args.smoke else []
    parsed = parser.parse_args(argv)
    for name, value in overrides.items():
        setattr(parsed, name, value)
    return parsed


def planned(model: str, tp: int, dp_attention: bool, concurrency: int, input_len: int, output_len: int) -> dict:
    """The planner's prediction at this layout (experts split over the TP ranks: EP = TP), or why there is none."""
    try:
        plan = plan_deployment(model, "h200", num_gpus=tp, tp=tp, ep=tp, dp_attention=dp_attention,
                               concurrency=concurrency, input_len=input_len, output_len=output_len)
    except Exception as exc:  # noqa: BLE001 - advisory: e.g. "KV cache holds N tokens", the run still goes on
        return {"error": str(exc)}
    perf = plan["performance"]
    return {"layout": plan["deployment"]["layout"], "output_tok_s": perf["output_tokens_per_s"],
            "tok_s_per_user": perf["tokens_per_s_per_user"], "tpot_ms": perf["tpot_s"] * 1e3,
            "ttft_ms": perf["ttft_s"] * 1e3, "kv_capacity_tokens": plan["memory"]["kv_capacity_tokens"]}


def tokens_in_flight(engine: Any) -> int:
    """Output tokens of the requests still queued or running. Read from the engine thread's lists without a
    lock: a copy of a list or deque is one step under the GIL, and a token more or less does not matter here."""
    return sum(len(r.output_token_ids) for r in (*engine.scheduler.running, *engine.scheduler.waiting))


async def bounded(target: Setup, specs: list, schedule: Schedule, args: argparse.Namespace, targets: tuple,
                  seconds: float) -> tuple[Measured, int]:
    """measure() cut at `seconds`: sending stops then and the requests still running are aborted (the task's
    cancellation aborts them in the engine). Returns the measurement of what finished and the tokens of the cut."""
    records: list = []
    t0 = time.monotonic()
    task = asyncio.create_task(measure(target, specs, schedule, args, targets, records, stop_at=t0 + seconds))
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        return task.result(), 0
    cut_tokens = tokens_in_flight(target.backend.engine)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return finish(target, records, t0, time.monotonic() - t0, targets), cut_tokens


def latencies(m: Measured) -> dict[str, Any]:
    s = m.summary
    mean_tpot = s.latency("tpot", "mean")
    return {"completed": s.completed, "failed": s.failed, "duration_s": s.duration_s,
            "tok_s_per_user": 1e3 / mean_tpot if mean_tpot else None, "mean_tpot_ms": mean_tpot,
            "p99_tpot_ms": s.latency("tpot", "p99"), "mean_ttft_ms": s.latency("ttft", "mean"),
            "p99_ttft_ms": s.latency("ttft", "p99"), "summary": s.flat()}


async def decode_level(target: Setup, model_dir: Path, args: argparse.Namespace, concurrency: int) -> dict:
    level = bench_args(model_dir, args, concurrency=concurrency, num_requests=concurrency, input_len=args.input_len,
                       output_len=args.output_len, slo_profile="none")
    targets = targets_for("none", {})
    specs = make_specs(level, target.maker, concurrency, random.Random(concurrency))
    engine = target.backend.engine
    preempted = engine.scheduler.num_preemptions
    m, cut_tokens = await bounded(target, specs, Concurrency(concurrency, concurrency), level, targets,
                                  args.max_seconds)
    out_tokens = m.summary.total_output_tokens + cut_tokens
    return {"concurrency": concurrency, "requests": concurrency, "input_len": args.input_len,
            "output_len": args.output_len, "max_seconds": args.max_seconds, "cut": m.summary.completed < concurrency,
            "output_tokens": out_tokens, "output_tokens_of_cut_requests": cut_tokens,
            "output_tok_s": out_tokens / max(m.summary.duration_s, 1e-9),
            "preemptions": engine.scheduler.num_preemptions - preempted, **latencies(m)}


async def seed_section(target: Setup, model_dir: Path, args: argparse.Namespace) -> dict:
    seed = bench_args(model_dir, args, batch=args.batch, repeat=args.repeat, input_len=args.seq,
                      output_len=args.seed_output_len, slo_profile="seed")
    targets = targets_for("seed", {})
    schedule = Rounds(args.batch, args.repeat)
    specs = make_specs(seed, target.maker, args.batch * (1 + args.repeat), random.Random(0))
    await warm_up(target.backend, specs[:args.batch], args.batch)  # the seed command's one warm-up round
    m, _ = await bounded(target, specs[args.batch:], schedule, seed, targets, args.seed_max_seconds)
    done_per_round = Counter(r.round for r in m.records if r.success)
    return {"command": f"deepseek-benchmark --model r1 --batch {args.batch} --seq {args.seq} --repeat {args.repeat}",
            "output_len": args.seed_output_len, "max_seconds": args.seed_max_seconds,
            "rounds_completed": sum(n == args.batch for n in done_per_round.values()),
            "output_tok_s": m.summary.output_throughput, **latencies(m),
            "checks": [{"target": c.target.describe(), "value": c.value, "status": c.status, "note": c.note}
                       for c in m.checks],
            "verdict": "PASS" if all_pass(m.checks) else "FAIL"}


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # a copy of the tree without .git


async def run(args: argparse.Namespace, model_dir: Path, result: dict, save) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    context = max(args.input_len + args.output_len, args.seq + args.seed_output_len)
    started = time.perf_counter()
    target = engine_target(bench_args(model_dir, args, input_len=args.input_len, output_len=args.output_len),
                           context, max(*concurrencies, args.batch))
    engine = target.backend.engine
    result["startup"] = {"startup_s": time.perf_counter() - started, "target": target.description,
                         "block_size": engine.config.block_size, "kv_blocks_per_rank": engine.runner.pool.num_blocks,
                         "kv_capacity_tokens": engine.kv_capacity_tokens,
                         "kv_capacity_tokens_total": engine.kv_capacity_tokens_total,
                         "cuda_graphs": engine.runner.graphs is not None}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        result["startup"]["gpu0_used_GiB_after_load"] = (total - free) / GiB
    save()
    try:
        warm = bench_args(model_dir, args, input_len=args.input_len, output_len=8)
        await warm_up(target.backend, make_specs(warm, target.maker, 2, random.Random(1)), 2)  # Triton compiles
        for c in concurrencies:
            row = await decode_level(target, model_dir, args, c)
            row["planner_here"] = planned(str(model_dir), args.tp, args.dp_attention, c, args.input_len, args.output_len)
            row["planner_r1_8xh200"] = planned("r1", 8, args.dp_attention, c, args.input_len, args.output_len)
            row["published"] = [p for p in PUBLISHED if p["concurrency"] == c]
            result["decode"].append(row)
            save()
        result["seed"] = await seed_section(target, model_dir, args)
        result["seed"]["planner_here"] = planned(str(model_dir), args.tp, args.dp_attention, args.batch, args.seq,
                                                 args.seed_output_len)
        result["seed"]["planner_r1_8xh200"] = planned("r1", 8, args.dp_attention, args.batch, args.seq,
                                                      args.seed_output_len)
        save()
    finally:
        await target.backend.close()  # stops the engine thread and the TP workers


def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict) -> str:
    s = result.get("startup", {})
    startup = (f"startup {fmt(s.get('startup_s'))} s; KV capacity {fmt(s.get('kv_capacity_tokens'), ',')} tokens "
               f"per rank, {fmt(s.get('kv_capacity_tokens_total'), ',')} in all; {s.get('target', '')}")
    columns = (f"{'conc':>5} {'done':>9} {'out tok/s':>10} {'tok/s/user':>10} {'P99 TPOT':>9} {'P99 TTFT':>9}"
               f" {'plan here':>10} {'plan R1 8x':>10}  published")
    lines = [startup, columns]
    for r in result.get("decode", []):
        here, r1 = r["planner_here"], r["planner_r1_8xh200"]
        published = "; ".join(f"{p['system']} {p.get('tok_s_per_user') or p.get('output_tok_s'):,.0f} "
                              f"{'tok/s/user' if 'tok_s_per_user' in p else 'tok/s'}" for p in r["published"])
        lines.append(f"{r['concurrency']:>5} {r['completed']:>4}/{r['requests']:<4} {r['output_tok_s']:>10.1f} "
                     f"{fmt(r['tok_s_per_user']):>10} {fmt(r['p99_tpot_ms']):>9} {fmt(r['p99_ttft_ms']):>9} "
                     f"{fmt(here.get('output_tok_s')):>10} {fmt(r1.get('output_tok_s')):>10}  {published}"
                     + ("  (cut at --max-seconds)" if r["cut"] else ""))
    seed = result.get("seed")
    if seed:
        lines.append(f"seed: {seed['command']}: {seed['rounds_completed']} rounds, {seed['output_tok_s']:.1f} output "
                     f"tok/s (planner here {fmt(seed['planner_here'].get('output_tok_s'))}, R1 8x H200 "
                     f"{fmt(seed['planner_r1_8xh200'].get('output_tok_s'))}): {seed['verdict']}")
        lines += [f"  {c['status']:<12} {c['target']:<34} measured {fmt(c['value'], '.4g')}"
                  + (f" ({c['note']})" if c["note"] else "") for c in seed["checks"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON result, rewritten after every measurement")
    parser.add_argument("--layers", type=int, default=None, help="cut R1 to K layers (3 dense + K-3 MoE) for a dry run")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: every visible GPU)")
    parser.add_argument("--dp-attention", action="store_true", help="data-parallel MLA attention over the ranks")
    parser.add_argument("--concurrency", default="1,32,256,1024", help="comma list of closed-loop concurrencies")
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=1000)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="time limit of each concurrency level")
    parser.add_argument("--batch", type=int, default=32, help="seed command: requests per round")
    parser.add_argument("--seq", type=int, default=2048, help="seed command: prompt tokens")
    parser.add_argument("--repeat", type=int, default=100, help="seed command: rounds")
    parser.add_argument("--seed-output-len", type=int, default=DEFAULT_OUTPUT_LEN,
                        help="seed command: output tokens (the bench's default, which the seed command uses)")
    parser.add_argument("--seed-max-seconds", type=float, default=1200.0, help="time limit of the seed command")
    parser.add_argument("--smoke", action="store_true", help="tiny DeepSeek-V3 on the CPU (gloo, TP 2): seconds")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes become the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    args.tp = args.tp or max(torch.cuda.device_count(), 1)
    if args.layers is not None and args.layers < 2:
        parser.error("--layers must be >= 2 (a dense layer and a MoE layer at least)")

    out = Path(args.out)
    began = time.perf_counter()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    result: dict = {**header(sys.argv), "commit": commit(), "gpus": gpus, "num_gpus": len(gpus), "tp": args.tp,
                    "dp_attention": args.dp_attention, "layers": args.layers, "smoke": args.smoke,
                    "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                       "NVSHMEM_DISABLE_NVLS")},
                    "published": PUBLISHED, "decode": []}

    def save() -> None:
        result["wall_s"] = time.perf_counter() - began
        out.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        raw = model_config(args.layers, args.smoke)
        result["model"] = {k: raw.get(k) for k in ("num_hidden_layers", "first_k_dense_replace", "n_routed_experts",
                                                   "vocab_size", "hidden_size", "quantization_config")}
        save()
        asyncio.run(run(args, write_config_dir(Path(tmp), "r1", raw), result, save))
    save()
    print(table(result), flush=True)
    print(f"wall {result['wall_s']:.0f} s; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
