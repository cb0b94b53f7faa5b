"""FP8 KV cache accuracy on a trained model: the embedded SmolLM2-135M-Instruct on this CPU, vs random weights.

The H200 check (benchmarks/results/h200_quant_fp8kv.json) ran random weights at the R1-Distill-Qwen-7B shape
and found FP8 KV vs bf16 KV logits relative error 0.28, teacher-forced argmax agreement 0.45. This asks
whether that is the random model or the cache. Models: the embedded SmolLM2-135M-Instruct (Llama, 30 layers,
3 KV heads x 64) with its trained weights, and the same config with random weights (load_format="dummy",
weights.dummy's N(0, 0.02)); each in fp32 and bf16 (model dtype; the reference KV cache is that dtype).
The FP8 cache is float8_e4m3fn with the engine's default per-layer scales of 1.0 (layers/attention.py).

Per model, dtype and prompt (8 English chat prompts through the tokenizer's chat template, ~30-200 tokens),
on a fresh paged cache (h200_quant.greedy_with_cache, the engine's model forward and CPU attention):
  (a) teacher-forced: the reference cache's greedy continuation (64 tokens) fed through an FP8 cache: logits
      relative error ||fp8 - ref|| / ||ref|| over all positions, argmax agreement, mean KL(ref || fp8) of the
      next-token distributions, and, where the argmaxes disagree, the reference's top-1 minus top-2
      probability (a small margin = a near-tie that any perturbation flips);
  (b) free-running: the FP8 cache's own greedy 64 tokens vs the reference's: positionwise agreement and the
      first divergence.
Baseline for scale (fp32 models): the same teacher-forced metrics with a bf16 cache under the fp32 model,
i.e. what merely rounding K/V to bf16 does. Also per-layer |K| / |V| maxima of the trained model (FP8 e4m3
saturates at 448 with scale 1.0; values below 2^-6 fall into e4m3's subnormals) and an end-to-end check
that the engine (LLM(kv_cache_dtype="fp8")) produces the harness's FP8 greedy tokens.

    PYTHONPATH=$PWD python benchmarks/cpu_fp8_kv_smollm2.py --out benchmarks/results/cpu_fp8_kv_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_embedded_vs_hf import cpu_model  # the benchmarks folder is not a package
from h200_quant import greedy_with_cache

from r1deploy import LLM, SamplingParams
from r1deploy.attention.torch_backend import TorchAttentionBackend
from r1deploy.kernels.kv_quant import FP8_KV_DTYPE
from r1deploy.models.loader import load_model

FP8_MIN_NORMAL = 2.0**-6
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    ("Write a short story about a robot who learns to paint. Give the robot a name, describe its first attempt "
     "at painting a sunset, and end with what it learns about patience."),
    "What is the difference between a list and a tuple in Python? Give an example of when you would use each.",
    ("Summarize the following text in two sentences: The Industrial Revolution began in Great Britain in the "
     "late 18th century and spread to Europe and North America over the following decades. It marked a shift "
     "from hand production to machines, new chemical and iron production processes, the increasing use of "
     "steam power and water power, and the rise of the factory system. Textiles were the dominant industry in "
     "terms of employment, value of output and capital invested. The revolution brought rapid population "
     "growth and urbanisation, but also harsh working conditions, child labour and pollution, which in time "
     "led to new labour laws, trade unions and public health reforms."),
    "Give me a recipe for pancakes, with a list of ingredients and numbered steps.",
    ("I am planning a three-day trip to Rome in the spring. I like history, food and walking, but I do not "
     "like crowds. Suggest an itinerary for each day, with one museum or monument in the morning, a "
     "neighbourhood to walk in the afternoon and a kind of local dish to try in the evening."),
    "Why is the sky blue? Explain it simply for a ten-year-old.",
]


def top2_margin(probs: torch.Tensor) -> torch.Tensor:
    """probs [N, V] -> top-1 minus top-2 probability, [N]."""
    top = probs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class KVStats:
    """Per-layer max |K| / |V| and the share of K / V elements below e4m3's smallest normal, recorded by wrapping
    the attention call of the Llama layers (the K / V the cache receives, after rotary)."""

    def __init__(self, num_layers: int) -> None:
        self.amax = [[0.0, 0.0] for _ in range(num_layers)]
        self.small = [[0, 0] for _ in range(num_layers)]
        self.count = [0] * num_layers
        self.calls = 0
        self.num_layers = num_layers
        self.original = TorchAttentionBackend.forward  # the CPU's attention backend

    def __enter__(self) -> KVStats:  # noqa: PYI034
        def wrapped(backend, q, k, v, kv_cache, metadata, *args, **kwargs):
            layer = self.calls % self.num_layers
            self.calls += 1
            for j, x in enumerate((k, v)):
                x = x.detach().float().abs()
                self.amax[layer][j] = max(self.amax[layer][j], float(x.max()))
                self.small[layer][j] += int((x < FP8_MIN_NORMAL).sum())
            self.count[layer] += k.numel()
            return self.original(backend, q, k, v, kv_cache, metadata, *args, **kwargs)

        TorchAttentionBackend.forward = wrapped
        return self

    def __exit__(self, *exc: object) -> None:
        TorchAttentionBackend.forward = self.original

    def summary(self) -> dict[str, Any]:
        k_amax, v_amax = [a[0] for a in self.amax], [a[1] for a in self.amax]
        k_small = [s[0] / c for s, c in zip(self.small, self.count)]
        v_small = [s[1] / c for s, c in zip(self.small, self.count)]
        return {"k_amax_per_layer": k_amax, "v_amax_per_layer": v_amax, "k_amax_max": max(k_amax),
                "v_amax_max": max(v_amax), "saturates_at_scale_1": max(k_amax + v_amax) > 448.0,
                "k_share_below_fp8_min_normal": statistics.mean(k_small),
                "v_share_below_fp8_min_normal": statistics.mean(v_small)}


def teacher_forced(ref: torch.Tensor, test: torch.Tensor) -> dict[str, Any]:
    """ref, test: logits [N, V] (all prompts' positions concatenated)."""
    ref, test = ref.double(), test.double()
    ref_logp, test_logp = ref.log_softmax(-1), test.log_softmax(-1)
    ref_p = ref_logp.exp()
    kl = (ref_p * (ref_logp - test_logp)).sum(-1)
    agree = ref.argmax(-1) == test.argmax(-1)
    margin = top2_margin(ref_p)
    dis = margin[~agree]
    return {"positions": ref.shape[0], "logits_rel_error": float((test - ref).norm() / ref.norm()),
            "argmax_agreement": float(agree.double().mean()), "mean_kl_nats": float(kl.mean()),
            "max_kl_nats": float(kl.max()), "disagreements": int((~agree).sum()),
            "ref_margin_at_disagreement_median": float(dis.median()) if dis.numel() else None,
            "ref_margin_at_disagreement_max": float(dis.max()) if dis.numel() else None,
            "ref_margin_all_median": float(margin.median()),
            "ref_top1_prob_median": float(ref_p.max(-1).values.median())}


def run_case(name: str, loaded: Any, prompts: list[list[int]], new: int, baseline_kv: torch.dtype | None,
             stats: KVStats | None) -> dict[str, Any]:
    model, config = loaded.model, loaded.config
    dtype = next(model.parameters()).dtype
    steps = new - 1  # the prefill's token plus `steps` decode steps = `new` tokens, `new` logit rows
    refs, fp8s, bases, free = [], [], [], []
    start = time.perf_counter()
    for prompt in prompts:
        if stats is not None:
            with stats:
                ref_tokens, ref_logits = greedy_with_cache(model, config, prompt, steps, "cpu", dtype)
        else:
            ref_tokens, ref_logits = greedy_with_cache(model, config, prompt, steps, "cpu", dtype)
        _, fp8_logits = greedy_with_cache(model, config, prompt, steps, "cpu", FP8_KV_DTYPE, forced=ref_tokens)
        fp8_tokens, _ = greedy_with_cache(model, config, prompt, steps, "cpu", FP8_KV_DTYPE)
        refs.append(ref_logits)
        fp8s.append(fp8_logits)
        if baseline_kv is not None:
            bases.append(greedy_with_cache(model, config, prompt, steps, "cpu", baseline_kv, forced=ref_tokens)[1])
        first = first_divergence(ref_tokens, fp8_tokens)
        free.append({"prompt_tokens": len(prompt), "positionwise": sum(a == b for a, b in zip(ref_tokens, fp8_tokens))
                     / len(ref_tokens), "first_divergence": first, "identical": first == len(ref_tokens),
                     "ref_tokens": ref_tokens, "fp8_tokens": fp8_tokens})
    ref_all = torch.cat(refs)
    case = {"model": name, "dtype": str(dtype).removeprefix("torch."), "new_tokens": new,
            "teacher_forced": teacher_forced(ref_all, torch.cat(fp8s)),
            "teacher_forced_per_prompt": [teacher_forced(r, f) for r, f in zip(refs, fp8s)],
            "free_running": {"positionwise_mean": statistics.mean(f["positionwise"] for f in free),
                             "first_divergence_per_prompt": [f["first_divergence"] for f in free],
                             "identical_prompts": sum(f["identical"] for f in free), "prompts": len(free),
                             "per_prompt": free}}
    if bases:
        case["baseline_teacher_forced"] = {"kv_dtype": str(baseline_kv).removeprefix("torch."),
                                           **teacher_forced(ref_all, torch.cat(bases))}
    case["seconds"] = time.perf_counter() - start
    t, f = case["teacher_forced"], case["free_running"]
    print(f"{name:>8} {case['dtype']:>8}: rel.err {t['logits_rel_error']:.3e}  argmax {t['argmax_agreement']:.3f}  "
          f"KL {t['mean_kl_nats']:.2e}  free {f['positionwise_mean']:.3f} first-div {f['first_divergence_per_prompt']}"
          f"  ({case['seconds']:.0f} s)", flush=True)
    return case


def engine_check(prompt: list[int], harness_tokens: list[int], new: int) -> dict[str, Any]:
    """The engine's own FP8-KV greedy output (fp32, CPU) against the harness's FP8 free-running tokens."""
    llm = LLM(None, device="cpu", dtype="float32", kv_cache_dtype="fp8")
    cache_dtype = str(llm.engine.runner.kv_caches[0].dtype).removeprefix("torch.")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))[0]
    tokens = list(out.token_ids)
    return {"engine_kv_cache_dtype": cache_dtype, "tokens_equal_harness": tokens == harness_tokens,
            "first_divergence": first_divergence(tokens, harness_tokens)}


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'model':<8}{'dtype':>9}{'rel.err':>10}{'argmax':>8}{'mean KL':>10}{'#dis':>6}{'margin@dis':>11}"
          f"{'top1 p':>8}{'free agree':>11}{'identical':>10}  first divergence per prompt")
    for c in report["cases"]:
        t, f = c["teacher_forced"], c["free_running"]
        m = t["ref_margin_at_disagreement_median"]
        print(f"{c['model']:<8}{c['dtype']:>9}{t['logits_rel_error']:>10.2e}{t['argmax_agreement']:>8.3f}"
              f"{t['mean_kl_nats']:>10.2e}{t['disagreements']:>6}{'-' if m is None else f'{m:.3f}':>11}"
              f"{t['ref_top1_prob_median']:>8.3f}{f['positionwise_mean']:>11.3f}"
              f"{f['identical_prompts']:>5}/{f['prompts']:<4}  {f['first_divergence_per_prompt']}")
        if "baseline_teacher_forced" in c:
            b = c["baseline_teacher_forced"]
            m = b["ref_margin_at_disagreement_median"]
            print(f"{'':<8}{'(bf16 KV)':>9}{b['logits_rel_error']:>10.2e}{b['argmax_agreement']:>8.3f}"
                  f"{b['mean_kl_nats']:>10.2e}{b['disagreements']:>6}{'-' if m is None else f'{m:.3f}':>11}")
    s = report["trained_kv_stats"]
    print(f"\ntrained model K/V ({s['dtype']}): max |K| {s['k_amax_max']:.1f}, max |V| {s['v_amax_max']:.2f}, "
          f"share below e4m3 min normal K {s['k_share_below_fp8_min_normal']:.3f} V "
          f"{s['v_share_below_fp8_min_normal']:.3f}; engine check: {report.get('engine_check')}")
    print("margin@dis: median reference top-1 minus top-2 probability where the argmaxes disagree; top1 p: median "
          "reference top-1 probability")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=len(QUESTIONS))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    report: dict[str, Any] = {
        "benchmark": "FP8 (e4m3, scale 1.0) vs model-dtype KV cache, embedded SmolLM2-135M-Instruct (trained) and "
                     "the same config with random weights, CPU, greedy",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "cases": [],
    }
    prompts: list[list[int]] = []
    for dtype in args.dtypes.split(","):
        trained = load_model(None, dtype=dtype)
        if not prompts:
            tok = trained.tokenizer
            texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS[: args.prompts]]
            prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            report["prompt_tokens"] = [len(p) for p in prompts]
            print(f"prompt lengths {report['prompt_tokens']}", flush=True)
        stats = KVStats(trained.config.num_hidden_layers) if "trained_kv_stats" not in report else None
        baseline = torch.bfloat16 if dtype == "float32" else None
        case = run_case("trained", trained, prompts, args.new_tokens, baseline, stats)
        report["cases"].append(case)
        if stats is not None:
            report["trained_kv_stats"] = stats.summary()
            report["trained_kv_stats"]["dtype"] = dtype
        if dtype == "float32" and "engine_check" not in report:
            report["engine_check"] = engine_check(prompts[0], case["free_running"]["per_prompt"][0]["fp8_tokens"],
                                                  args.new_tokens)
        del trained
        random_model = load_model(None, dtype=dtype, load_format="dummy")
        save(report, args.out)
        report["cases"].append(run_case("random", random_model, prompts, args.new_tokens, baseline, None))
        del random_model
        save(report, args.out)
    report["seconds"] = time.perf_counter() - start
    save(report, args.out)
    print_table(report)
    print(f"total {report['seconds']:.0f} s")


def save(report: dict[str, Any], path: str | None) -> None:
    """Written after every case, so a cut-short run keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
