"""`r1deploy bench` / `deepseek-benchmark`: flags only; the run itself is in benchmark.py.

The seed guide's command works as written: `deepseek-benchmark --model r1 --batch 32 --seq 2048
--repeat 100` = 100 rounds of 32 concurrent requests with 2048 prompt tokens, after warm-up.
"""

from __future__ import annotations

import argparse
import os

from r1deploy.bench.slo import PROFILES
from r1deploy.plan.engines import ENGINE_NAMES

EPILOG = """\
metrics (vLLM-compatible): TTFT = first token-bearing chunk - send; TPOT = (E2E - TTFT) / (output
tokens - 1); ITL = every gap between streamed chunks; E2E = last chunk - send; mean/median/p90/p99.
seed profile: GPU utilisation >= 95 %, P99 TPOT (per-token latency) <= 100 ms, P99 TTFT <= 30 ms,
no OOM, allocator fragmentation <= 5 %. A target that cannot be measured here is NOT MEASURED and
fails the run. Exit 0 only when every target passes (or --no-fail).
examples:
  deepseek-benchmark --model r1 --batch 32 --seq 2048 --repeat 100 --url http://gpu-host:8000
  r1deploy bench --model r1-distill-qwen-1.5b --load-format dummy --batch 4 --seq 128 --repeat 3
  r1deploy bench --engine ./r1-4layers --load-format dummy --offload experts --gpu-weight-budget 20 --batch 1
  r1deploy bench --model r1 --load-format dummy --tp 8 --dp-attention --concurrency 256 --input-len 1000 --output-len 1000
  r1deploy bench --model r1-distill-llama-70b --load-format dummy --offload layers --gpu-weight-budget 60 --batch 1
  r1deploy bench --url http://localhost:8000 --rate 4 --burstiness 0.5 --num-requests 200 --out runs/a
  r1deploy bench compare runs/a/report.json runs/b/report.json"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test a server or the in-process engine",
                       description="Load-test any OpenAI-compatible server (--url) or the in-process engine, "
                                   "report TTFT/TPOT/ITL/E2E, throughput, goodput, GPU telemetry and an SLO verdict.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target(p)
    _add_workload(p)
    _add_arrivals(p)
    _add_report(p)
    p.set_defaults(func=_run)
    commands = p.add_subparsers(dest="bench_command", required=False, parser_class=type(p),
                                metavar="{compare}")
    c = commands.add_parser("compare", help="two run reports side by side")
    c.add_argument("reports", nargs=2, metavar="REPORT.json")
    c.set_defaults(func=_compare)


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--model", help="preset name or alias (r1 = deepseek-r1), model directory or file; "
                                   "with --url, the served model's name")
    g.add_argument("--url", help="an OpenAI-compatible server, e.g. http://localhost:8000 (ours, vLLM, SGLang)")
    g.add_argument("--engine", nargs="?", const="", metavar="MODEL",
                   help="the in-process engine (the default without --url); MODEL as --model, "
                        "the embedded model when none. With --url, an engine name (vllm, sglang, trtllm, r1deploy) "
                        "says what serves there: planned vs measured uses its profile, as --plan-engine")
    g.add_argument("--api", choices=("completions", "chat"), default=None,
                   help="endpoint (default: chat for --workload reasoning, else completions)")
    g.add_argument("--api-key", default=os.environ.get("R1DEPLOY_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="bearer key (default: $R1DEPLOY_API_KEY or $OPENAI_API_KEY)")
    g.add_argument("--served-model-name", help="model name to send (default: --model if served, else the "
                                               "server's only model)")
    g.add_argument("--tokenizer", help="tokenizer directory for exact prompt lengths against a server")
    g.add_argument("--device", help="in-process: cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", help="in-process: float32, bfloat16 or float16")
    g.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="in-process: dummy = random weights at the model's real shape")
    g.add_argument("--offload", choices=("experts", "layers"), default=None,
                   help="in-process: experts = keep a MoE model's routed experts in pinned host memory, a GPU slot "
                        "cache in front (a model directory); layers = stream the decoder layers beyond "
                        "--gpu-weight-budget from pinned host memory through a ring of GPU slots. The report adds "
                        "the store's hits, misses, bytes moved and stall time")
    g.add_argument("--gpu-weight-budget", type=float, default=None, metavar="GB",
                   help="with --offload experts: GPU memory for expert slots; layers: all weights on the GPU")
    g.add_argument("--host-weight-budget", type=float, default=None, metavar="GB",
                   help="with --offload: pinned host memory for the offloaded weights (default: all of them)")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="in-process: split the model over N ranks, one worker process per GPU (NCCL; gloo on the "
                        "CPU), as `r1deploy serve --tp N`; DeepSeek models hold E/N routed experts per rank")
    g.add_argument("--dp-attention", action="store_true",
                   help="in-process, with --tp N, DeepSeek (MLA) models: each rank runs attention for its own "
                        "requests with its own latent KV cache (N x the KV capacity), as `serve --dp-attention`")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='in-process: speculative decoding as `serve` takes it, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 3}\'; the report adds acceptance per position, mean accepted '
                        "length and draft/verify time (for a --url server they come from its /metrics)")
    g.add_argument("--plan-engine", choices=ENGINE_NAMES, default=None,
                   help="predict planned-vs-measured with this engine's profile (e.g. vllm for a vLLM --url); "
                        "default: the planner's datasheet roofline")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=("fixed", "uniform", "sharegpt", "prefix", "reasoning"), default=None,
                   help="default: sharegpt with --dataset, else fixed")
    g.add_argument("--input-len", "--seq", dest="input_len", type=int, default=1024,
                   help="prompt tokens per request (--seq: the seed guide's name)")
    g.add_argument("--output-len", type=int, default=None,
                   help="output tokens per request (default 128; ShareGPT: the recorded reply's length)")
    g.add_argument("--input-len-range", metavar="MIN:MAX", help="uniform workload prompt lengths")
    g.add_argument("--output-len-range", metavar="MIN:MAX", help="uniform workload output lengths")
    g.add_argument("--dataset", help="ShareGPT-format JSON file")
    g.add_argument("--prefix-groups", type=int, default=4, help="prefix workload: groups sharing a prefix")
    g.add_argument("--prefix-len", type=int, default=512, help="prefix workload: shared prefix tokens")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ignore EOS so output lengths are exact)")
    g.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals: same seed, same run")


def _add_arrivals(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("arrivals (default: --batch 8 --repeat 4)")
    g.add_argument("--batch", type=int, default=None, help="requests sent at once per round")
    g.add_argument("--repeat", type=int, default=None, help="rounds (after --warmup)")
    g.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    g.add_argument("--rate", type=float, help="open loop: requests per second")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    g.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    g.add_argument("--num-requests", type=int, default=100, help="requests for --concurrency / --rate")
    g.add_argument("--sweep-rates", metavar="R1,R2,...", help="run each rate; report the highest meeting the SLOs")
    g.add_argument("--sweep-concurrency", metavar="C1,C2,...", help="as --sweep-rates, over concurrencies")
    g.add_argument("--warmup", type=int, default=1, help="warm-up rounds (batch mode) or requests (others)")
    g.add_argument("--duration", help="soak: keep the load on this long (e.g. 72h, 30m, 90s)")
    g.add_argument("--checkpoint-interval", default="5m", help="soak: pause, sample at idle and write a checkpoint "
                                                               "this often")
    g.add_argument("--disconnect-rate", type=float, default=0.0, help="soak: share of requests dropped mid-stream")
    g.add_argument("--abort-rate", type=float, default=0.0, help="soak: share of requests dropped within 50 ms")
    g.add_argument("--mix", type=float, default=0.0, metavar="SHARE",
                   help="soak, --url: share of requests sent not streamed, with n=2, stop strings, a shared "
                        "prefix or a short prompt (see bench/chaos.py)")


def _add_report(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verdict and report")
    g.add_argument("--slo-profile", choices=tuple(PROFILES), default="seed")
    g.add_argument("--slo", metavar="ttft:MS,tpot:MS,e2e:MS",
                   help="P99 limits replacing the profile's; also the per-request goodput limits")
    g.add_argument("--no-fail", action="store_true", help="exit 0 whatever the verdict")
    g.add_argument("--out", help="directory for report.json, requests.csv and report.html")
    g.add_argument("--telemetry-interval", type=float, default=0.5, help="GPU sampling period in seconds")
    g.add_argument("--no-progress", action="store_true", help="no live progress bar")


def _run(args: argparse.Namespace) -> int:
    from r1deploy.bench.main import run

    return run(args)


def _compare(args: argparse.Namespace) -> int:
    from r1deploy.bench.compare import compare

    return compare(*args.reports)
