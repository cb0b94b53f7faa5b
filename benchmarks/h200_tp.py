"""Tensor parallelism on two H200s (NCCL), beside the planner: all-reduce bus bandwidth by message size,
R1-Distill-Qwen-7B at TP=1 vs TP=2 and R1-Distill-Llama-70B at TP=2 (random bf16 weights, the real shapes).

Sections (--only, comma list; default all):
  allreduce  NCCL all-reduce bus bandwidth, 1 KiB..256 MiB in powers of 4, 2 ranks, median of 20 after
             warm-up timed with CUDA events (r1deploy.plan.collectives, what `doctor --allreduce` runs),
             beside the bandwidth the planner assumes (catalog NVLink x intra-node link efficiency + latency)
  tp7b       r1-distill-qwen-7b at TP=1 and TP=2: batch-1 decode (prompt 128, 256 new tokens, greedy, EOS
             ignored; target TP=2 >= 1.6x TP=1) and the W1 offline workload (256 requests, prompts
             random.Random(0).randint(100, 1024), 512 new tokens); startup time, CUDA graphs used or not,
             which all-reduce the TP engine used; with --no-custom-all-reduce also TP=2 with NCCL only
             ("tp2_nccl": every all-reduce on NCCL, none on symmetric memory) for comparison
  tp70b      r1-distill-llama-70b at TP=2: batch-1 decode against the two-card roofline (2 x 4.23 TB/s over
             the weight bytes) and W1 cut to --tp70b-requests requests (the first ones of W1's list)
Each engine configuration runs in its own process group (a clean GPU, and a hang or crash is killed
after its time limit without losing the other sections); results are written after every measurement.
The workloads and helpers are h200_dense.py's (one GPU), imported. Writes one JSON; prints a table.

    PYTHONPATH=$PWD python3 benchmarks/h200_tp.py --out $OUT/h200_tp.json
    PYTHONPATH=$PWD python3 benchmarks/h200_tp.py --smoke --out /tmp/tp_smoke.json   # CPU, gloo, tiny Llama
"""

import os

# Before torch or NCCL start (here and in every process spawned below, which inherit the environment):
# shared hosts must not use NVLink multicast (NVLS) or multicast symmetric memory.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # h200_dense.py lives beside this script
from h200_dense import COPY_TBPS, random_prompts, timed_generate  # noqa: E402

from r1deploy.engine.engine import LLMEngine  # noqa: E402
from r1deploy.engine.llm import LLM  # noqa: E402
from r1deploy.engine_config import EngineConfig, ParallelConfig  # noqa: E402
from r1deploy.plan.catalog import Catalog  # noqa: E402
from r1deploy.plan.collectives import measure_allreduce_sizes  # noqa: E402
from r1deploy.plan.planner import plan_deployment  # noqa: E402
from r1deploy.plan.roofline import Efficiency  # noqa: E402

W1_REQUESTS, W1_NEW_TOKENS = 256, 512
BS1_PROMPT, BS1_NEW_TOKENS = 128, 256
TP2_SPEEDUP_TARGET = 1.6
# A tiny Llama for --smoke (CPU, gloo): the code paths of the real run in seconds.
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": "float32", "tie_word_embeddings": False}


# ---- one engine configuration, in its own process (--one) ----

def run_config(cfg: dict, out: Path) -> None:
    """Start the engine, time batch-1 decode and the W1-style offline run, writing `out` after each."""
    result: dict = {"model": cfg["model"], "tp": cfg["tp"]}

    def save() -> None:
        out.write_text(json.dumps(result))

    parallel = ParallelConfig(tensor_parallel_size=cfg["tp"],
                              custom_all_reduce=cfg["custom_all_reduce"])  # False: NCCL only (tp2_nccl)
    config = EngineConfig(max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192, parallel=parallel)
    start = time.perf_counter()
    engine = LLMEngine(cfg["engine_model"], config=config, device=cfg["device"], load_format="dummy")
    result["startup_s"] = time.perf_counter() - start
    try:
        graphs = engine.runner.graphs  # rank 0's; every rank captures the same buckets
        tp = engine.runner.tp  # rank 0's group; every rank chose the same all-reduce
        result.update(cuda_graphs=graphs is not None, graph_buckets=len(graphs.buckets) if graphs else 0,
                      all_reduce=tp.all_reduce_backend if tp is not None else None,
                      kv_capacity_tokens=engine.kv_capacity_tokens,
                      rank0_weights_GB=sum(p.numel() * p.element_size()
                                           for p in engine.loaded.model.parameters()) / 1e9)
        save()
        llm = LLM.__new__(LLM)  # the offline API over the engine built above, as h200_dense.py does
        llm.engine = engine
        vocab = engine.model_config.vocab_size
        rng = random.Random(1)
        timed_generate(llm, random_prompts(rng, vocab, [64] * 4), 8)  # warm-up (Triton prefill shapes)

        runs = [timed_generate(llm, random_prompts(rng, vocab, [BS1_PROMPT]), cfg["bs1_new_tokens"])
                for _ in range(3)]
        seconds = statistics.median(r[0] for r in runs[1:])
        times = runs[-1][1][0].metrics.token_times
        result.update(decode_bs1_tok_s=cfg["bs1_new_tokens"] / seconds,
                      decode_bs1_median_step_ms=statistics.median(b - a for a, b in zip(times, times[1:])) * 1e3)
        save()

        w1 = random.Random(0)
        lengths = [w1.randint(100, 1024) for _ in range(W1_REQUESTS)]
        prompts = random_prompts(w1, vocab, lengths[:cfg["requests"]])  # W1's prompts, in W1's order
        seconds, outputs = timed_generate(llm, prompts, cfg["new_tokens"])
        result.update(offline_requests=len(prompts), offline_new_tokens=cfg["new_tokens"], offline_s=seconds,
                      offline_out_tok_s=sum(len(o.outputs[0].token_ids) for o in outputs) / seconds,
                      offline_in_tokens=sum(lengths[:cfg["requests"]]),
                      offline_preemptions=engine.scheduler.num_preemptions)
        save()
    finally:
        engine.shutdown()


def run_isolated(cfg: dict, timeout_s: float) -> dict:
    """run_config in a fresh process group; on a timeout the whole group (its TP workers too) is killed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result.json")
        command = [sys.executable, __file__, "--one", json.dumps(cfg), "--out", str(out)]
        print(f"== {cfg['model']} TP={cfg['tp']}", flush=True)
        process = subprocess.Popen(command, start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group this call started, workers included
            process.wait()
            code = None
        result = json.loads(out.read_text()) if out.exists() else {"model": cfg["model"], "tp": cfg["tp"]}
    if code != 0:
        result["error"] = f"killed after the {timeout_s:g}s limit" if code is None else f"exit status {code}"
    return result


# ---- the planner beside each measurement ----

def planned(model: str, tp: int, concurrency: int, input_len: int, output_len: int) -> dict:
    plan = plan_deployment(model, "h200", num_gpus=tp, tp=tp, concurrency=concurrency, input_len=input_len,
                           output_len=output_len)
    return {"output_tok_s": plan["performance"]["output_tokens_per_s"], "tpot_ms": plan["performance"]["tpot_s"] * 1e3,
            "weights_bytes": plan["memory"]["weights_bytes"]}


def engine_section(model: str, tps: list[int], requests: int, args: argparse.Namespace, timeout_s: float,
                   nccl_only: bool = False) -> dict:
    """One run per TP size (keys tp1, tp2, ...); nccl_only: TP=2 once more with custom_all_reduce=False."""
    lengths = [random.Random(0).randint(100, 1024) for _ in range(W1_REQUESTS)][:requests]
    mean_prompt = round(sum(lengths) / len(lengths))
    new_tokens = 16 if args.smoke else W1_NEW_TOKENS
    bs1_new = 16 if args.smoke else BS1_NEW_TOKENS
    section: dict = {}
    runs = [(f"tp{tp}", tp, True) for tp in tps] + ([("tp2_nccl", 2, False)] if nccl_only else [])
    for key, tp, custom in runs:
        cfg = {"model": model, "engine_model": args.tiny_dir or model, "tp": tp, "device": args.device,
               "requests": requests, "new_tokens": new_tokens, "bs1_new_tokens": bs1_new,
               "custom_all_reduce": custom}
        result = run_isolated(cfg, timeout_s)
        bs1 = planned(model, tp, 1, BS1_PROMPT, BS1_NEW_TOKENS)
        result["planner_bs1_tok_s"] = bs1["output_tok_s"]
        # The bandwidth roofline: every card streams its share of the weights once per token.
        result["bs1_roofline_tok_s"] = tp * COPY_TBPS * 1e12 / bs1["weights_bytes"]
        if "decode_bs1_tok_s" in result:
            result["decode_bs1_pct_of_roofline"] = 100 * result["decode_bs1_tok_s"] / result["bs1_roofline_tok_s"]
        # W1 is a closed batch, not a steady state: the planner sees it as `requests` in flight, mean prompt.
        result["planner_offline_out_tok_s"] = planned(model, tp, requests, mean_prompt, W1_NEW_TOKENS)["output_tok_s"]
        section[key] = result
    if {1, 2} <= set(tps) and all("decode_bs1_tok_s" in section[k] for k in ("tp1", "tp2")):
        speedup = section["tp2"]["decode_bs1_tok_s"] / section["tp1"]["decode_bs1_tok_s"]
        section["tp2_vs_tp1_decode_bs1"] = speedup
        section["tp2_vs_tp1_target"] = TP2_SPEEDUP_TARGET
        section["tp2_vs_tp1_meets_target"] = speedup >= TP2_SPEEDUP_TARGET
    if all("decode_bs1_tok_s" in section.get(k, {}) for k in ("tp2", "tp2_nccl")):
        section["tp2_vs_tp2_nccl_decode_bs1"] = (section["tp2"]["decode_bs1_tok_s"]
                                                 / section["tp2_nccl"]["decode_bs1_tok_s"])
    if requests < W1_REQUESTS:
        section["note"] = (f"offline: the first {requests} of W1's {W1_REQUESTS} requests (to keep the section "
                           "within its time budget); not directly comparable with a full W1 figure")
    return section


def allreduce_section(args: argparse.Namespace) -> list[dict]:
    sizes = [4**k for k in range(5, 9 if args.smoke else 15)]  # 1 KiB .. 64 KiB (smoke) or 256 MiB
    backend = "gloo" if args.smoke else "nccl"
    h200 = Catalog.load().get("h200")
    eff = Efficiency()
    link = h200.intranode_bytes_s * eff.intranode_link  # what the planner's roofline.collectives assumes
    rows = []
    for r in measure_allreduce_sizes(2, sizes, backend):
        ring = 2 * (r.world_size - 1) / r.world_size * r.size_bytes
        planned_s = ring / link + eff.intranode_latency_s
        rows.append({"bytes": r.size_bytes, "backend": backend, "median_us": r.median_s * 1e6,
                     "bus_GBps": r.bus_bytes_per_s / 1e9, "planner_us": planned_s * 1e6,
                     "planner_bus_GBps": ring / planned_s / 1e9})
    return rows


# ---- the run ----

def machine() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    return {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "transformers": transformers.__version__,
            "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}}


def table(result: dict) -> str:
    lines = []
    for row in result.get("allreduce", []):
        lines.append(f"allreduce {row['bytes']:>10,d} B  {row['median_us']:9.1f} us  {row['bus_GBps']:7.1f} GB/s bus"
                     f"  (planner {row['planner_bus_GBps']:6.1f} GB/s)")
    for name in ("tp7b", "tp70b"):
        for key, r in result.get(name, {}).items():
            if not isinstance(r, dict):
                lines.append(f"{name} {key}: {r}")
                continue
            get = lambda k: f"{r[k]:.4g}" if k in r else "-"  # noqa: E731
            lines.append(f"{name} {key}: startup {get('startup_s')} s, graphs {r.get('cuda_graphs', '-')}, "
                         f"all-reduce {r.get('all_reduce', '-')}, "
                         f"bs1 {get('decode_bs1_tok_s')} tok/s (planner {get('planner_bs1_tok_s')}, roofline "
                         f"{get('bs1_roofline_tok_s')}), step {get('decode_bs1_median_step_ms')} ms, offline "
                         f"{get('offline_out_tok_s')} tok/s (planner {get('planner_offline_out_tok_s')})"
                         + (f"  ERROR {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma list: allreduce,tp7b,tp70b (default: all)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp70b-requests", type=int, default=128,
                        help="requests of the 70B offline run (W1 has 256; fewer keep the section near 4 minutes)")
    parser.add_argument("--no-custom-all-reduce", action="store_true",
                        help="tp7b: also run TP=2 with every all-reduce on NCCL (tp2_nccl), to compare")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny Llama: checks the script, not speed")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's configuration (run_isolated)
    args = parser.parse_args()
    if args.one is not None:
        cfg = json.loads(args.one)
        if cfg["device"] == "cpu":  # h200_dense's timer synchronises CUDA; the CPU has nothing to wait for
            torch.cuda.synchronize = lambda *_: None
        run_config(cfg, Path(args.out))
        return

    only = set(filter(None, args.only.split(","))) or {"allreduce", "tp7b", "tp70b"}
    unknown = only - {"allreduce", "tp7b", "tp70b"}
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}")
    args.device = "cpu" if args.smoke else "cuda"
    began = time.perf_counter()
    result: dict = {"command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "smoke": args.smoke,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **machine()}
    out = Path(args.out)

    def save() -> None:
        result["wall_s"] = time.perf_counter() - began
        out.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        args.tiny_dir = None
        if args.smoke:
            args.tiny_dir = tmp
            Path(tmp, "config.json").write_text(json.dumps(TINY_LLAMA))
        if "allreduce" in only:
            result["allreduce"] = allreduce_section(args)
            save()
        if "tp7b" in only:
            result["tp7b"] = engine_section("r1-distill-qwen-7b", [1, 2], 8 if args.smoke else W1_REQUESTS, args,
                                            timeout_s=180, nccl_only=args.no_custom_all_reduce)
            save()
        if "tp70b" in only:
            result["tp70b"] = engine_section("r1-distill-llama-70b", [2], 8 if args.smoke else args.tp70b_requests,
                                             args, timeout_s=330)
            save()
    save()
    print(table(result), flush=True)
    print(f"wall {result['wall_s']:.0f} s; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
