#!/usr/bin/env bash
# DeepSeek-R1 671B on one 8x H200 node: random FP8 weights at the real shapes (made on the GPUs, no checkpoint),
# TP 8 with the routed experts split 32 per GPU (EP 8). One in-process run of benchmarks/h200_r1_full.py: startup,
# KV capacity, decode at concurrency 1/32/256/1024 (1000 in / 1000 out), the seed command with its SLO verdict,
# the planner and the published numbers beside each (docs/benchmarks.md).
#
#   bash scripts/r1_x8.sh [OUT_DIR]            # the full run, 8 GPUs (at most ~70 min: the time limits below)
#   DRY=2 bash scripts/r1_x8.sh [OUT_DIR]      # scaled-down dry run on 2 GPUs (~6 minutes)
#   DRY=4 bash scripts/r1_x8.sh [OUT_DIR]      # the same on 4 GPUs
# DP_ATTENTION=1 adds --dp-attention (SGLang-style data-parallel MLA: 8x the KV capacity, no CUDA graphs).
set -euo pipefail
cd "$(dirname "$0")/.."

# Shared hosts: no NVLink multicast (NVLS), no multicast symmetric memory, in NCCL, torch and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-runs/r1_x8_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
dp=$([[ ${DP_ATTENTION:-0} == 1 ]] && echo --dp-attention || true)

case ${DRY:-0} in
  0)  # the target run
    python3 benchmarks/h200_r1_full.py --tp 8 $dp --concurrency 1,32,256,1024 --input-len 1000 \
        --output-len 1000 --max-seconds 600 --batch 32 --seq 2048 --repeat 100 --seed-max-seconds 1200 \
        --out "$OUT/h200_r1_full.json" 2>&1 | tee "$OUT/h200_r1_full.log" ;;
  # Dry runs: R1 cut to K layers (3 dense + K-3 MoE) so the weights take <= ~60% of each card, the rest for KV.
  # An FP8 MoE layer is ~11.3 GB of routed experts + ~0.2 GB; embedding and lm_head ~1.9 GB (bf16) each.
  # 2 GPUs: 17 layers = 14 MoE, ~167 GB, ~84 GB per card. 4 GPUs: 33 layers = 30 MoE, ~351 GB, ~88 GB per card.
  2|4)
    layers=$([[ $DRY == 2 ]] && echo 17 || echo 33)
    python3 benchmarks/h200_r1_full.py --tp "$DRY" --layers "$layers" $dp --concurrency 1,32,256 \
        --input-len 256 --output-len 128 --max-seconds 45 --repeat 5 --seed-max-seconds 60 \
        --out "$OUT/h200_r1_dry_tp$DRY.json" 2>&1 | tee "$OUT/h200_r1_dry_tp$DRY.log" ;;
  *) echo "DRY must be 0, 2 or 4" >&2; exit 2 ;;
esac

# The same model served over HTTP and benchmarked from outside (another shell; the ranks on this node):
#   r1deploy serve r1 --load-format dummy --tp 8 --max-num-seqs 1024 --host 127.0.0.1 --port 8000
#   r1deploy bench --url http://127.0.0.1:8000 --model r1 --sweep-concurrency 1,32,256,1024 --num-requests 1024 \
#       --input-len 1000 --output-len 1000 --slo-profile none --out "$OUT/http_sweep"
#   deepseek-benchmark --url http://127.0.0.1:8000 --model r1 --batch 32 --seq 2048 --repeat 100 --out "$OUT/http_seed"
# (add --dp-attention to serve for data-parallel attention: 8x the KV capacity, no CUDA graphs)
