"""`r1deploy generate "prompt"`: stream one answer to the terminal."""

from __future__ import annotations

import argparse
import sys

from r1deploy.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one answer and stream it to the terminal",
                       description="Generate one answer (chat template applied unless --raw). "
                                   "Uses the embedded SmolLM2-135M-Instruct when no model is given.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None, help="Hub id (org/name), HF model directory, .gguf file or preset name")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights at the model's real shape, no checkpoint needed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from r1deploy.engine.engine import LLMEngine
    from r1deploy.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    engine = LLMEngine(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format)
    if engine.tokenizer is None:
        raise UsageError("this model has no tokenizer (dummy weights): use a model directory or GGUF file")
    try:
        use_template = not args.raw and engine.tokenizer.chat_template
        prompt = (engine.chat_prompt_ids([{"role": "user", "content": args.prompt}]) if use_template
                  else args.prompt)
        engine.add_request(prompt, params)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    printed = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            sys.stdout.write(output.text[printed:])
            sys.stdout.flush()
            printed = len(output.text)
    sys.stdout.write("\n")
    return 0
