"""r1deploy's engine on one GPU at a real R1-Distill shape with random bf16 weights, beside the planner.

Correctness first: our logits on a 128-token prompt are compared with transformers' (the same random
weights, loaded by name) and the relative error is recorded before anything is timed. Then, on an
engine built the way `--load-format dummy` builds it: startup (weights, KV pool, CUDA graphs), KV
capacity, TTFT of a 2,048-token prompt, decode at batch 1 and 32 (prompt 128, 256 new tokens; with the
engine's host overhead per step, async scheduling on and off: engine.step_stats()), and
the W1 offline workload (256 requests, prompts uniform in [100, 1024] by random.Random(0), 512 new
tokens, greedy, EOS ignored), the same definitions as ../shared/tools/hf_baseline.py, which the
device command runs right after this script. Writes JSON; prints a short table.

    python3 benchmarks/h200_dense.py --shape r1-distill-qwen-7b --out $OUT/ours_7b.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import statistics
import time

import torch
import transformers

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.engine.engine import LLMEngine
from r1deploy.engine.llm import LLM
from r1deploy.engine_config import EngineConfig
from r1deploy.models.loader import build_model, load_model_weights
from r1deploy.plan.planner import plan_deployment
from r1deploy.presets import resolve_config_path
from r1deploy.sampling_params import SamplingParams

COPY_TBPS, MATMUL_TFLOPS = 4.23, 788.0  # measured on this card (device-to-device copy, 8192^3 bf16 matmul)


def check_against_transformers(shape: str, result: dict) -> None:
    raw = json.loads(resolve_config_path(shape).read_text())
    config = transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items()
                                                                      if k != "model_type"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.02)
    ours, our_config = build_model(raw, torch.bfloat16, torch.device("cuda"))
    load_model_weights(ours, iter(hf.state_dict().items()))
    prompt = torch.randint(0, config.vocab_size, (128,), device="cuda")
    with torch.no_grad():
        ref = hf(prompt[None]).logits[0].float()  # [128, V]
        blocks = 128 // 16
        caches = [torch.zeros(ours.kv_cache_spec.shape(blocks, 16), dtype=torch.bfloat16, device="cuda")
                  for _ in range(our_config.num_hidden_layers)]
        batch = ForwardBatch.build([prompt.tolist()], [0], [list(range(blocks))], 16, "cuda")
        got = ours.compute_logits(ours(batch, caches))
    result["logits_rel_error_vs_transformers"] = float((got - ref).norm() / ref.norm())
    result["argmax_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    del hf, ours, caches
    gc.collect()
    torch.cuda.empty_cache()


def timed_generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return time.perf_counter() - start, outputs


def random_prompts(rng: random.Random, vocab: int, lengths: list[int]) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="r1-distill-qwen-7b")
    parser.add_argument("--only", default="", help="comma list: check,ttft,decode1,decode32,offline")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only
    result: dict = {"shape": args.shape, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    if want("check"):
        check_against_transformers(args.shape, result)
        print(f"logits rel. error vs transformers: {result['logits_rel_error_vs_transformers']:.2e}", flush=True)

    config = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=256, max_num_batched_tokens=8192)
    start = time.perf_counter()
    engine = LLMEngine(args.shape, config=config, device="cuda", load_format="dummy")
    torch.cuda.synchronize()
    result["startup_s"] = time.perf_counter() - start
    result["kv_capacity_tokens"] = engine.kv_capacity_tokens
    llm = LLM.__new__(LLM)
    llm.engine = engine
    params_count = sum(p.numel() for p in engine.loaded.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters())
    result.update(params_B=params_count / 1e9, weights_GB=weight_bytes / 1e9)
    vocab = engine.model_config.vocab_size
    rng = random.Random(1)
    timed_generate(llm, random_prompts(rng, vocab, [64] * 4), 8)  # warm-up (Triton prefill shapes)

    if want("ttft"):
        ttfts = []
        for _ in range(5):
            _, out = timed_generate(llm, random_prompts(rng, vocab, [2048]), 1)
            ttfts.append(out[0].metrics.ttft_s)
        result["ttft_2048_ms"] = statistics.median(ttfts) * 1e3
        result["prefill_tflops"] = 2 * params_count * 2048 / statistics.median(ttfts) / 1e12
    for bs in (1, 32):
        if not want(f"decode{bs}"):
            continue
        runs = [timed_generate(llm, random_prompts(rng, vocab, [128] * bs), 256) for _ in range(3)]
        seconds = statistics.median(r[0] for r in runs[1:])
        result[f"decode_bs{bs}_tok_s"] = bs * 256 / seconds
        itl = [b - a for o in runs[-1][1] for a, b in zip(o.metrics.token_times, o.metrics.token_times[1:])]
        result[f"decode_bs{bs}_median_step_ms"] = statistics.median(itl) * 1e3
        # Python overhead per step (one prefill step per 256 decode steps): host work, of which
        # schedule + inputs + launch, and time blocked on the GPU; then the same with the overlap off.
        # Both modes get the same prompts: their greedy tokens must agree (the overlap's GPU check). Prefix
        # caching is off for the pair, or the second run would prefill only the uncached tail of each prompt,
        # a different (bf16-rounding) computation.
        prompts = random_prompts(rng, vocab, [128] * bs)
        engine.block_manager.enable_prefix_caching = False
        tokens = {}
        for mode, overlap in (("", True), ("_sync", False)):
            engine.async_scheduling = overlap
            engine.reset_step_stats()
            mode_seconds, mode_outputs = timed_generate(llm, prompts, 256)
            tokens[mode] = [list(o.token_ids) for o in mode_outputs]
            stats = engine.step_stats()
            for key in ("host", "launch", "wait"):
                result[f"decode_bs{bs}{mode}_{key}_ms_per_step"] = stats[f"{key}_ms_per_step"]
            result[f"decode_bs{bs}{mode}_run_tok_s"] = bs * 256 / mode_seconds
        engine.async_scheduling = engine.config.async_scheduling
        engine.block_manager.enable_prefix_caching = engine.config.enable_prefix_caching
        result[f"decode_bs{bs}_async_tokens_equal_sync"] = tokens[""] == tokens["_sync"]
        if bs == 1:
            result["decode_bs1_weight_GBps"] = weight_bytes * result["decode_bs1_tok_s"] / 1e9
            result["decode_bs1_pct_of_copy_ceiling"] = 100 * result["decode_bs1_weight_GBps"] / (COPY_TBPS * 1e3)
            graphs = engine.runner.graphs
            if graphs is not None:  # the GPU-only part of a step; the rest of the step is host time
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(50):
                    graphs.graphs[(1, 1)].graph.replay()  # (batch bucket, query length)
                end.record()
                torch.cuda.synchronize()
                result["decode_bs1_graph_replay_ms"] = begin.elapsed_time(end) / 50
        else:
            # Bandwidth bound at batch 32: weights once plus each sequence's KV (mean context 256) per step.
            kv_per_token = engine.runner.model.kv_cache_spec.bytes_per_token(torch.bfloat16)
            step_bytes = weight_bytes + bs * 256 * kv_per_token
            result["decode_bs32_bound_tok_s"] = bs * COPY_TBPS * 1e12 / step_bytes
            result["decode_bs32_pct_of_bound"] = 100 * result["decode_bs32_tok_s"] / result["decode_bs32_bound_tok_s"]

    if want("offline"):
        w1 = random.Random(0)
        lengths = [w1.randint(100, 1024) for _ in range(256)]
        prompts = [[w1.randrange(vocab) for _ in range(n)] for n in lengths]
        seconds, outputs = timed_generate(llm, prompts, 512)
        result["offline_s"] = seconds
        result["offline_out_tok_s"] = sum(len(o.token_ids) for o in outputs) / seconds
        result["offline_in_tokens"] = sum(lengths)
        result["offline_preemptions"] = engine.scheduler.num_preemptions
    result["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30

    plan = plan_deployment(args.shape, "h200", num_gpus=1, concurrency=1, input_len=128, output_len=256)
    result["planner_bs1_tok_s"] = plan["performance"]["output_tokens_per_s"]
    result["planner_ttft_2048_ms"] = plan_deployment(args.shape, "h200", num_gpus=1, concurrency=1,
                                                     input_len=2048, output_len=1)["performance"]["prefill_s"] * 1e3
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for key, value in result.items():
        print(f"{key:>36}: {value:.4g}" if isinstance(value, float) else f"{key:>36}: {value}")


if __name__ == "__main__":
    main()
