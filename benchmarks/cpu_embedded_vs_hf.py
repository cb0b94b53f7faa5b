"""Time r1deploy's engine and transformers on the embedded SmolLM2-135M-Instruct, on this CPU, in one run.

Workloads: 1 and 16 concurrent requests, chat-templated prompts, greedy, a fixed number of new
tokens (EOS ignored). transformers runs the same prompts through `generate` (left-padded batch).
Writes JSON with the command, machine, versions and date.

    python benchmarks/cpu_embedded_vs_hf.py --out benchmarks/results/cpu_embedded_vs_hf.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import transformers

from r1deploy import LLM, SamplingParams
from r1deploy.models.loader import embedded_model_dir

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about autumn.", "List three prime numbers and explain why they are prime.",
    "What is the difference between a list and a tuple in Python?", "Describe the water cycle.",
    "Who wrote Pride and Prejudice?", "Give me a recipe for pancakes.",
]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def time_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    ttfts = [o.metrics.ttft_s for o in outputs]
    return {"seconds": elapsed, "output_tokens": generated, "output_tokens_per_s": generated / elapsed,
            "mean_ttft_s": sum(ttfts) / len(ttfts)}


def time_hf(model_dir: str, prompts: list[list[int]], new_tokens: int, pad_id: int) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - width) * len(prompts)
    return {"seconds": elapsed, "output_tokens": generated, "output_tokens_per_s": generated / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    llm = LLM(None, device="cpu", dtype="float32")
    model_dir = embedded_model_dir()
    tokenizer = llm.tokenizer
    prompts = [llm.engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    time_ours(llm, prompts[:1], 8)  # warm-up
    results = []
    for concurrency in (1, 16):
        batch = (prompts * 2)[:concurrency]
        ours = time_ours(llm, batch, args.new_tokens)
        hf = time_hf(str(model_dir), batch, args.new_tokens, pad_id)
        results.append({"concurrency": concurrency, "new_tokens": args.new_tokens, "r1deploy": ours,
                        "transformers": hf, "speedup": ours["output_tokens_per_s"] / hf["output_tokens_per_s"]})
        print(f"concurrency {concurrency:>2}: r1deploy {ours['output_tokens_per_s']:8.1f} tok/s   "
              f"transformers {hf['output_tokens_per_s']:8.1f} tok/s   x{results[-1]['speedup']:.2f}")
    report = {
        "benchmark": "embedded SmolLM2-135M-Instruct, CPU, greedy, EOS ignored",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
