"""`r1deploy serve`: the OpenAI-compatible server on uvicorn, with a drain on SIGTERM."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import sys
from typing import TYPE_CHECKING

from r1deploy.errors import UsageError
from r1deploy.models.hub import resolve_model_source
from r1deploy.models.model_names import path_like
from r1deploy.server.options import add_vllm_options, generation_options
from r1deploy.server.state import REASONING_PARSERS, Phase, ServerSettings, ServerState

if TYPE_CHECKING:
    from r1deploy.engine_config import OffloadConfig

API_KEY_ENV = "R1DEPLOY_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve /v1/completions, /v1/chat/completions and /v1/models over one engine. "
                                   "Uses the embedded SmolLM2-135M-Instruct when no model is given.")
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face Hub id (org/name), HF model directory, .gguf file or preset name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="split <think> output into reasoning_content (default: deepseek-r1 when the "
                        "vocabulary has </think>)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file, or the template itself, used instead of the model's own")
    p.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                   help='template kwargs for every request, e.g. \'{"thinking": true}\' (requests may override '
                        "the allow-listed ones: thinking, enable_thinking)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights at the model's real shape, no checkpoint needed")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default=None,
                   help="fp8: float8_e4m3 KV cache (half the bytes of bf16; Llama/Qwen2 models)")
    p.add_argument("--attention-backend", choices=("torch", "triton"), default=None,
                   help="attention kernels: triton (default on CUDA) or torch (plain PyTorch, the reference; "
                        "default on the CPU; no CUDA graphs)")
    p.add_argument("--offload", choices=("experts", "layers"), default=None,
                   help="experts: keep a MoE model's experts in GPU slots / pinned host memory / the checkpoint on "
                        "disk; layers: keep the decoder layers beyond --gpu-weight-budget in pinned host memory and "
                        "stream them through a ring of GPU slots (no CUDA graphs)")
    p.add_argument("--gpu-weight-budget", type=float, default=None, metavar="GB",
                   help="with --offload experts: GPU memory for expert slots; with --offload layers: all weights "
                        "on the GPU (non-layer weights, resident layers and the 2-slot ring)")
    p.add_argument("--host-weight-budget", type=float, default=None, metavar="GB",
                   help="with --offload: pinned host memory for the offloaded weights (default: all of them; "
                        "layers beyond it are memory-mapped from disk)")
    p.add_argument("--cpu-kv-cache-bytes", type=int, default=None, help="KV pool budget when running on the CPU")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM spells it: \'{"method": "ngram", "num_speculative_tokens": 3, '
                        '"prompt_lookup_max": 4}\', or "method": "mtp" (DeepSeek-V3/R1\'s MTP layer, k = 1..3) '
                        '(drafts verified in one forward of 1 + k tokens; exact)')
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel ranks over all nodes: one worker process per GPU (NCCL), or per CPU rank "
                        "(gloo); the ranks talk over loopback (one node) or --master-addr's network, which must "
                        "stay private (docs/distributed.md)")
    p.add_argument("--dp-attention", action="store_true",
                   help="with --tp N, DeepSeek (MLA) models: each rank runs attention for its own requests with whole "
                        "heads and its own latent KV cache (N x the KV capacity); routed experts stay split over "
                        "the ranks, tokens all-gathered around each MoE layer (no CUDA graphs)")
    p.add_argument("--moe-a2a", action="store_true",
                   help="with --dp-attention: each MoE layer sends every token only to the ranks holding its "
                        "routed experts and back (two all-to-alls, DeepEP-style) instead of all-gathering all tokens "
                        "to every rank and reduce-scattering the sums: fewer bytes and less expert work per rank. "
                        "On two H200s (R1 MoE block, FP8) it was slower up to 128 tokens per rank (3.3 vs 2.7 ms "
                        "at 1) and even with all-gather at 512 (7.1 vs 7.2 ms); it is meant for more ranks and "
                        "larger batches (benchmarks/results/h200_ep.json)")
    p.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="with --tp N on GPUs: every all-reduce through NCCL; by default those up to 1 MiB (decode) "
                        "use torch's symmetric memory (one-shot over NVLink P2P: 7 vs 12 us at 7 KiB on two H200s)")
    p.add_argument("--nnodes", type=int, default=None,
                   help="nodes the --tp ranks span (torchrun's meaning; default 1, or the launcher's: torchrun, "
                        "LeaderWorkerSet and Slurm variables are read, flags win; docs/deploy.md)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's index (default 0, or the launcher's); node 0 runs rank 0 and the HTTP server, "
                        "the others only their ranks and exit when rank 0 shuts down")
    p.add_argument("--nproc-per-node", type=int, default=0, help="ranks (GPUs) on each node (default: --tp / --nnodes)")
    p.add_argument("--master-addr", default=None,
                   help="node 0's address on the private rank network; rank 0 hosts the rendezvous there "
                        "(default 127.0.0.1, or the launcher's)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port on --master-addr (default: a free one, or the launcher's; required with "
                        "--nnodes > 1)")
    p.add_argument("--numa-bind", choices=("auto", "on", "off"), default="auto",
                   help="bind each rank's threads and host memory to its GPU's NUMA node (NVML topology); auto: "
                        "when the host has several NUMA nodes")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a tensor-parallel collective may take before the engine fails (default 300)")
    p.add_argument("--dist-init-timeout", type=float, default=None,
                   help="seconds every rank has to join the rendezvous (default 300)")
    p.add_argument("--max-queue", "--max-waiting", dest="max_queue", type=int, default=ServerSettings.max_queue,
                   help="requests admitted beyond the --max-num-seqs running ones; beyond both, new ones get "
                        "429 with Retry-After")
    p.add_argument("--max-body-bytes", type=int, default=ServerSettings.max_body_bytes,
                   help="largest request body accepted; larger ones get 413")
    p.add_argument("--client-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a client must send each request (headers and body) within this long, and a stream write "
                        "it does not read may stall this long; then its connection is closed (408 for a late body)")
    p.add_argument("--drain-timeout", type=float, default=ServerSettings.drain_timeout_s,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated CORS origins (default: none, and no CORS headers at all)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_vllm_options(p)
    p.set_defaults(func=run)


def offload_config(args: argparse.Namespace) -> OffloadConfig | None:
    """--offload experts|layers with its budgets; UsageError for a budget without --offload or vice versa."""
    from r1deploy.engine_config import OffloadConfig

    if args.offload and args.gpu_weight_budget is None:
        raise UsageError(f"--offload {args.offload} needs --gpu-weight-budget GB")
    if (args.gpu_weight_budget is not None or args.host_weight_budget is not None) and not args.offload:
        raise UsageError("--gpu-weight-budget and --host-weight-budget need --offload experts|layers")
    if not args.offload:
        return None
    try:
        return OffloadConfig(args.gpu_weight_budget, args.host_weight_budget, target=args.offload)
    except ValueError as exc:
        raise UsageError(f"--offload: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from r1deploy.engine.engine import LLMEngine
    from r1deploy.engine_config import EngineConfig, SpeculativeConfig
    from r1deploy.server.app import create_app
    from r1deploy.server.chat_template import load_chat_template, load_default_kwargs
    from r1deploy.server.client_timeouts import ClientTimeoutProtocol
    from r1deploy.server.draining import DrainingServer

    engine_options = {name: getattr(args, name) for name in
                      ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                       "cpu_kv_cache_bytes", "kv_cache_dtype", "attention_backend")
                      if getattr(args, name) is not None}
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    from r1deploy.distributed import launcher_env

    layout, notes = launcher_env.resolve({k: getattr(args, k) for k in launcher_env.DEFAULTS}, os.environ)
    args = argparse.Namespace(**{**vars(args), **layout})
    for note in notes:
        print(f"r1deploy serve: {note}", file=sys.stderr, flush=True)
    args.model = resolve_model_source(args.model, revision=args.revision, download_dir=args.download_dir,
                                      load_format=args.load_format)
    try:
        from r1deploy.distributed.nodes import MultiNodeConfig
        from r1deploy.distributed.worker import precheck
        precheck(args.model, args.tp, args.dp_attention)  # a --tp that cannot split the model fails here
        parallel = {"tensor_parallel_size": args.tp, "nnodes": args.nnodes, "node_rank": args.node_rank,
                    "nproc_per_node": args.nproc_per_node, "master_addr": args.master_addr,
                    "master_port": args.master_port, "dp_attention": args.dp_attention,
                    "moe_all_to_all": args.moe_a2a, "custom_all_reduce": not args.disable_custom_all_reduce,
                    "numa_bind": args.numa_bind}
        if args.dist_timeout is not None:
            parallel["timeout_s"] = args.dist_timeout
        if args.dist_init_timeout is not None:
            parallel["init_timeout_s"] = args.dist_init_timeout
        if args.served_model_name is not None and path_like(args.served_model_name):
            raise ValueError(f"--served-model-name {args.served_model_name!r}: {path_like(args.served_model_name)}")
        if args.client_timeout <= 0:
            raise ValueError(f"--client-timeout must be > 0 seconds, got {args.client_timeout:g}")
        offload = offload_config(args)
        speculative = None if args.speculative_config is None else SpeculativeConfig.of(args.speculative_config)
        config = EngineConfig(**engine_options, **generation_options(args), parallel=MultiNodeConfig(**parallel),
                              offload=offload, speculative=speculative)
        origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
        settings = ServerSettings(served_model_name=args.served_model_name, api_key=api_key,
                                  reasoning_parser=args.reasoning_parser, max_queue=args.max_queue,
                                  max_body_bytes=args.max_body_bytes, drain_timeout_s=args.drain_timeout,
                                  metrics_public=args.metrics_public, allowed_origins=origins,
                                  metrics_prefix=args.metrics_prefix, sse_keepalive_s=args.sse_keepalive,
                                  chat_template=args.chat_template and load_chat_template(args.chat_template),
                                  default_chat_template_kwargs=load_default_kwargs(args.default_chat_template_kwargs))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.node_rank > 0:  # no engine and no HTTP here: this node's ranks follow rank 0's steps
        from r1deploy.distributed.executor import run_node

        return run_node(args.model, config, dtype=args.dtype, device=args.device, load_format=args.load_format)

    from r1deploy.distributed.numa import bind_rank, device_type

    # Before any thread starts: threads inherit the CPU set and memory policy of the one that starts them.
    bind_rank(args.numa_bind, 0, device_type(args.device), "r1deploy serve")

    def load() -> LLMEngine:
        return LLMEngine(args.model, config=config, dtype=args.dtype, device=args.device, load_format=args.load_format)

    def ready(state: ServerState) -> None:
        print(examples(args.host, args.port, state.model_name, api_key is not None), flush=True)

    def failed(exc: BaseException) -> None:
        print(f"r1deploy serve: error: {exc}", file=sys.stderr, flush=True)
        server.should_exit = True

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, load, ready, failed)
    state: ServerState = app.state.server
    http = functools.partial(ClientTimeoutProtocol, client_timeout_s=args.client_timeout)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5, http=http), state)
    print(f"r1deploy serve: loading {args.model or 'the embedded model'}; "
          f"http://{_display_host(args.host)}:{args.port}/health/ready turns 200 when ready", flush=True)
    server.run()
    return 1 if state.phase is Phase.FAILED else 0


def _display_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def examples(host: str, port: int, model: str, with_key: bool) -> str:
    """Ready-to-paste curl and openai-python calls; the key is referenced by its variable, never printed."""
    base = f"http://{_display_host(host)}:{port}/v1"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if with_key else ""
    key = f'os.environ["{API_KEY_ENV}"]' if with_key else '"none"'
    # JSON string literals are Python string literals too, and keep the shell quoting to one pair.
    python = (f"import os; from openai import OpenAI; client = OpenAI(base_url={json.dumps(base)}, api_key={key}); "
              f"print(client.chat.completions.create(model={json.dumps(model)}, "
              'messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)')
    return (f"r1deploy serve: ready on {base} (model {model!r})\n"
            f"  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}\n"
            f"  python -c {shlex.quote(python)}")
