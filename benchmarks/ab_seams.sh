#!/usr/bin/env bash
# Issue 16's "no speed lost" check: the same benchmarks from two snapshots on one GPU, interleaved
# (before, after, before, after) so drift of the card shows up as spread, not as a difference.
#   [ROUNDS=n] bash benchmarks/ab_seams.sh carry/before . $OUT [quick]
# before/after: directories holding a `git archive` of each commit. Writes $OUT/<label>_<case>_<round>.json;
# benchmarks/ab_compare.py turns them into one results file with the ratios.
set -uo pipefail
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd); out=$3; quick=${4:-}
rounds=${ROUNDS:-2}
[ "$quick" = quick ] && rounds=1
run() {  # label dir case args...
  local label=$1 dir=$2 case=$3; shift 3
  (cd "$dir" && PYTHONPATH="$dir" PYTHONUNBUFFERED=1 timeout 400 python3 "$@" --out "$out/${label}_${case}_${round}.json") \
    > "$out/${label}_${case}_${round}.log" 2>&1 || echo "FAILED: $label $case round $round (see log)"
  tail -n 3 "$out/${label}_${case}_${round}.log"
}
for round in $(seq 1 $rounds); do
  for side in before after; do
    dir=$before; [ $side = after ] && dir=$after
    run $side $dir dense7b benchmarks/h200_dense.py --shape r1-distill-qwen-7b --only decode1,decode32,offline
    [ "$quick" = quick ] && continue
    run $side $dir v2lite benchmarks/h200_dense.py --shape deepseek-v2-lite --only decode1
    run $side $dir r1layers benchmarks/h200_deepseek.py --only layers --dense 3 --moe 4
  done
done
