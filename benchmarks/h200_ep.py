"""Expert-parallel token dispatch on N H200s (NCCL): one DeepSeek-R1 MoE block at full width (hidden 7168, 256
routed experts of width 2048, 8 per token, 1 shared expert; FP8 128 x 128 block weights, random), timed under the
three schemes of r1deploy/layers/moe.DeepseekMoE for t tokens per rank, t in 1, 8, 32, 128, 512:

  tp        TP all-reduce: every rank holds all N x t tokens, runs its experts (and its slice of the shared
            expert) on all of them, one all-reduce
  allgather --dp-attention: each rank holds its t tokens; all-gather, its experts on all N x t, reduce-scatter
  a2a       --dp-attention --moe-a2a: each token-expert pair goes only to its expert's rank and back (all-to-all)

The three first run the same tokens and must agree (relative error of each rank's rows against allgather's);
then each is timed with CUDA events, the median of 20 calls after 3 of warm-up, the slowest rank's median
reported. Writes one JSON (command, GPUs, versions, date, results); prints a table (ms).

    PYTHONPATH=$PWD python3 benchmarks/h200_ep.py --out $OUT/h200_ep.json            # all visible GPUs
    PYTHONPATH=$PWD python3 benchmarks/h200_ep.py --smoke --out /tmp/ep_smoke.json   # CPU, gloo, 2 ranks, tiny
"""

import os

# Before torch or NCCL start (here and in every rank spawned below, which inherit the environment):
# shared hosts must not use NVLink multicast (NVLS) or multicast symmetric memory.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton

from r1deploy.config import read_hf_config
from r1deploy.core.deepseek_config import DeepseekConfig
from r1deploy.distributed.group import free_port, init_group, leave_group
from r1deploy.layers.moe import DeepseekMoE
from r1deploy.plan.collectives import _timed_ms
from r1deploy.presets import resolve_config_path
from r1deploy.quant.fp8_block import FP8_DTYPE
from r1deploy.quant.methods import LinearQuant

TOKENS = (1, 8, 32, 128, 512)
SCHEMES = ("tp", "allgather", "a2a")
FP8_BLOCK = (128, 128)  # R1's weight_block_size
SMOKE_BLOCK = (16, 16)  # --smoke: tiles the toy shared expert's 32 rows split into whole over 2 ranks
# --smoke: R1's router and layout at toy widths (16 experts in 4 groups, 4 per token), fp32 on the CPU.
SMOKE = {"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
         "num_experts_per_tok": 4}
WARMUP, ITERS = 3, 20


@torch.no_grad()
def randomize_(moe: DeepseekMoE, rank: int, block: tuple[int, int]) -> None:
    """O(1) activations: the gate and shared expert the same on every rank (one seed), each rank's experts its
    own; FP8 weights N(0, 1) with scales 1/sqrt(fan-in); no router bias (balanced random routing)."""
    for seed, local in ((0, False), (1 + rank, True)):
        torch.manual_seed(seed)
        for name, param in moe.named_parameters():
            if name.startswith("experts.") != local:
                continue
            if name.endswith("e_score_correction_bias"):
                param.zero_()
            elif param.dtype == FP8_DTYPE:
                param.copy_(torch.randn(param.shape, device=param.device).clamp_(-4, 4))
            elif name.endswith("scale_inv"):  # [.., rows, K tiles]
                param.fill_((param.shape[-1] * block[1]) ** -0.5)
            else:
                param.copy_(torch.randn(param.shape, device=param.device) / param.shape[-1] ** 0.5)


def build(config: DeepseekConfig, tp, block: tuple[int, int]) -> dict[str, DeepseekMoE]:
    """The three schemes' blocks over the same weights: allgather and a2a share every tensor; tp shares the
    experts and the gate and holds its slice of the shared expert (FP8 too, as the TP build does)."""
    groups = {"tp": dataclasses.replace(tp, dp_attention=False, moe_all_to_all=False),
              "allgather": dataclasses.replace(tp, dp_attention=True, moe_all_to_all=False),
              "a2a": dataclasses.replace(tp, dp_attention=True, moe_all_to_all=True)}
    quant = LinearQuant(fp8_block=block)  # FP8 shared expert linears and routed experts
    with tp.device:
        blocks = {name: DeepseekMoE(config, group, quant=quant).eval() for name, group in groups.items()}
    ref = blocks["allgather"]
    randomize_(ref, tp.rank, block)
    blocks["a2a"].load_state_dict(ref.state_dict(), assign=True)
    routed = {k: v for k, v in ref.state_dict().items() if not k.startswith("shared_experts.")}
    blocks["tp"].load_state_dict(routed, strict=False, assign=True)
    shared, sliced = ref.shared_experts, blocks["tp"].shared_experts
    for name in ("gate_up_proj", "down_proj"):  # the whole layer's tensors (FP8: with scales) through the slice's loaders
        whole = getattr(shared, name)
        for param_name, param in getattr(sliced, name).named_parameters():
            tensor = getattr(whole, param_name)
            if name == "gate_up_proj":  # gate rows (or scale rows) first, then up's
                for shard, half in zip(("gate", "up"), tensor.chunk(2), strict=True):
                    param.weight_loader(param, half, shard)
            else:
                param.weight_loader(param, tensor)
    return blocks


def rank_main(rank: int, size: int, port: int, smoke: bool, out: str) -> None:
    device_type = "cpu" if smoke else "cuda"
    tp = init_group(rank, size, "127.0.0.1", port, 300.0, device_type)
    try:
        raw = read_hf_config(resolve_config_path("deepseek-r1"))
        config = DeepseekConfig.from_hf({**raw, **SMOKE, "torch_dtype": "float32"} if smoke else raw)
        torch.set_default_dtype(config.torch_dtype)
        blocks = build(config, tp, SMOKE_BLOCK if smoke else FP8_BLOCK)
        results = []
        with torch.inference_mode():
            for t in TOKENS:
                torch.manual_seed(100 + rank)  # every rank its own tokens
                mine = torch.randn(t, config.hidden_size, device=tp.device)  # [t, H]
                counts = [t] * size
                everyone = tp.all_gather_rows(mine, counts)  # [N t, H]: tp's replicated input
                calls = {"tp": lambda everyone=everyone: blocks["tp"](everyone),
                         "allgather": lambda mine=mine, counts=counts: blocks["allgather"](mine, counts),
                         "a2a": lambda mine=mine, counts=counts: blocks["a2a"](mine, counts)}
                ref = calls["allgather"]()
                outs = {"tp": calls["tp"]()[rank * t : (rank + 1) * t], "a2a": calls["a2a"]()}
                row = {"tokens_per_rank": t}
                for name, got in outs.items():  # the worst rank's relative error against allgather
                    err = torch.tensor([((got.float() - ref.float()).norm() / ref.float().norm()).item()])
                    dist.all_reduce(err, op=dist.ReduceOp.MAX, group=tp.control_group)
                    row[f"rel_err_{name}"] = err.item()
                for name in SCHEMES:
                    _timed_ms(tp.device, calls[name], WARMUP)
                    dist.barrier(group=tp.control_group)  # start together: no peer's lateness in the first call
                    ms = torch.tensor([statistics.median(_timed_ms(tp.device, calls[name], ITERS))])
                    dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=tp.control_group)  # the slowest rank
                    row[f"{name}_ms"] = ms.item()
                results.append(row)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        leave_group()


def table(rows: list[dict]) -> str:
    lines = [f"{'tokens/rank':>11} " + "".join(f"{name + ' ms':>14}" for name in SCHEMES)
             + f"{'err tp':>10}{'err a2a':>10}"]
    for r in rows:
        lines.append(f"{r['tokens_per_rank']:>11} " + "".join(f"{r[name + '_ms']:>14.3f}" for name in SCHEMES)
                     + f"{r['rel_err_tp']:>10.1e}{r['rel_err_a2a']:>10.1e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ranks", type=int, default=0, help="GPUs (one rank each; default: all visible)")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 ranks, a tiny block: checks the script")
    args = parser.parse_args()
    size = 2 if args.smoke else args.ranks or torch.cuda.device_count()
    if size < 2:
        parser.error(f"expert parallelism needs >= 2 ranks, got {size}")
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = str(Path(tmp, "rows.json"))
        mp.spawn(rank_main, args=(size, free_port("127.0.0.1"), args.smoke, rows_file), nprocs=size)
        rows = json.loads(Path(rows_file).read_text())
    # bf16 activations; tp's shared-expert slice runs bf16 weights where the others run W8A8 FP8 on GPU.
    tolerance = 1e-5 if args.smoke else 5e-2
    cuda = torch.cuda.is_available() and not args.smoke
    result = {"command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "smoke": args.smoke,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpus": [torch.cuda.get_device_name(i) for i in range(size)] if cuda else [], "ranks": size,
              "torch": torch.__version__, "triton": triton.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
              "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
              "agree_tolerance": tolerance,
              "agree": all(r[f"rel_err_{s}"] <= tolerance for r in rows for s in ("tp", "a2a")),
              "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(rows))
    if not result["agree"]:
        sys.exit(f"the schemes disagree beyond {tolerance:g} (relative error columns)")


if __name__ == "__main__":
    main()
