"""Collect ab_seams.sh's JSON files into one result: each metric before and after, per round, and the ratio
of the medians (after / before; for times, before / after), so > 1 means the new commit is faster.

    python3 benchmarks/ab_compare.py OUT_DIR --before COMMIT --after COMMIT --machine TEXT --out FILE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

# (case, key, higher is better)
METRICS = [
    ("dense7b", "decode_bs1_tok_s", True), ("dense7b", "decode_bs32_tok_s", True),
    ("dense7b", "offline_out_tok_s", True), ("v2lite", "decode_bs1_tok_s", True),
    ("r1layers", "per_layer.decode_bs1_step_ms.dense_layer_ms", False),
    ("r1layers", "per_layer.decode_bs1_step_ms.moe_layer_ms", False),
    ("r1layers", "per_layer.decode_bs32_step_ms.dense_layer_ms", False),
    ("r1layers", "per_layer.decode_bs32_step_ms.moe_layer_ms", False),
    ("r1layers", "per_layer.decode_bs1_step_ms.r1_61_layers_ms", False),
    ("r1layers", "per_layer.decode_bs32_step_ms.r1_61_layers_ms", False),
]


def lookup(data: dict, dotted: str) -> float | None:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return float(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--machine", required=True)
    parser.add_argument("--command", default="bash benchmarks/ab_seams.sh carry/before . $OUT")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = Path(args.directory)
    rows, gpu = [], None
    for case, key, higher in METRICS:
        values: dict[str, list[float]] = {"before": [], "after": []}
        for side in values:
            for path in sorted(folder.glob(f"{side}_{case}_*.json")):
                data = json.loads(path.read_text())
                gpu = gpu or data.get("gpu")
                value = lookup(data, key)
                if value is not None:
                    values[side].append(value)
        if not values["before"] or not values["after"]:
            continue
        before, after = statistics.median(values["before"]), statistics.median(values["after"])
        ratio = after / before if higher else before / after
        rows.append({"case": case, "metric": key, "before": values["before"], "after": values["after"],
                     "speed_ratio_after_over_before": ratio, "within_3pct": ratio >= 0.97})
    result = {"command": args.command, "machine": args.machine, "gpu": gpu,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "before_commit": args.before, "after_commit": args.after, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['case']:>9} {r['metric']:<48} before {statistics.median(r['before']):10.3f} "
              f"after {statistics.median(r['after']):10.3f}  speed x{r['speed_ratio_after_over_before']:.3f}")


if __name__ == "__main__":
    main()
