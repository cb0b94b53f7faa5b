"""N-gram prompt lookup on the embedded SmolLM2 (real weights) on the CPU: echo-heavy prompts (repeat, edit,
extract), greedy, the same engine with and without speculation. Records that the tokens are equal, the
acceptance per draft position, the mean accepted length and the speedup, in one run.

    python3 benchmarks/cpu_ngram_smollm2.py --out benchmarks/results/cpu_ngram_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from r1deploy.engine.llm import LLM
from r1deploy.sampling_params import SamplingParams

PARAGRAPH = ("The river town wakes before dawn. Fishermen push their boats into the grey water, the baker opens "
             "his shutters, and the first bus rattles over the old stone bridge toward the market square.")
TASKS = [
    f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    f"Rewrite this paragraph in the past tense, changing nothing else:\n\n{PARAGRAPH}",
    f"Copy this paragraph and replace 'town' with 'village':\n\n{PARAGRAPH}",
    f"Quote the second sentence of this paragraph:\n\n{PARAGRAPH}",
]


def run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[tuple[int, ...]]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return time.perf_counter() - started, [tuple(o.token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = LLM(dtype="float32")
    prompts = [plain.engine.chat_prompt_ids([{"role": "user", "content": t}]) for t in TASKS]
    result: dict = {"command": f"python3 benchmarks/cpu_ngram_smollm2.py --new-tokens {args.new_tokens} --k {args.k}",
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "model": "embedded SmolLM2-135M-Instruct (GGUF, float32)", "requests": len(prompts),
                    "batch": "one request at a time (batch-1 latency, where speculation pays)"}
    rows = []
    for prompt, task in zip(prompts, TASKS, strict=True):
        plain_s, plain_tokens = run(plain, [prompt], args.new_tokens)
        rows.append({"task": task.split(":")[0], "plain_s": plain_s, "plain_tokens": plain_tokens[0]})
    spec = LLM(dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": args.k,
                                                    "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    for row, prompt in zip(rows, prompts, strict=True):
        spec_s, spec_tokens = run(spec, [prompt], args.new_tokens)
        row.update(spec_s=spec_s, equal_tokens=spec_tokens[0] == row.pop("plain_tokens"),
                   tokens=len(spec_tokens[0]), speedup=row["plain_s"] / spec_s)
    stats = spec.engine.spec_stats
    result["per_task"] = rows
    result["all_tokens_equal"] = all(r["equal_tokens"] for r in rows)
    result["speedup_total_time"] = sum(r["plain_s"] for r in rows) / sum(r["spec_s"] for r in rows)
    result["draft_tokens"] = stats.num_draft_tokens
    result["accepted_tokens"] = stats.num_accepted_tokens
    result["acceptance_rate"] = stats.num_accepted_tokens / max(1, stats.num_draft_tokens)
    result["acceptance_per_position"] = [a / max(1, stats.num_drafts) for a in stats.accepted_per_position]
    result["mean_accepted_per_verify_step"] = stats.num_accepted_tokens / max(1, stats.num_drafts)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(f"{r['task'][:48]:<48} plain {r['plain_s']:.2f} s  ngram {r['spec_s']:.2f} s  x{r['speedup']:.2f}  "
              f"equal={r['equal_tokens']}")
    print(f"total x{result['speedup_total_time']:.2f}; acceptance {result['acceptance_rate']:.2f} "
          f"per position {[round(a, 2) for a in result['acceptance_per_position']]}")


if __name__ == "__main__":
    main()
