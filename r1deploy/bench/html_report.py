"""report.html: one self-contained page (plots embedded as base64 PNG) drawn from the JSON report,
so any saved report.json can be re-rendered: latency CDFs, throughput and TTFT over time, GPU
telemetry over time, and a sweep's throughput-latency curve when there is one.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from r1deploy.bench.report import DEFINITIONS


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def latency_cdfs(requests: list[dict[str, Any]]) -> str | None:
    ok = [r for r in requests if r["success"]]
    itl = [b - a for r in ok for a, b in zip(r["chunk_offsets_ms"], r["chunk_offsets_ms"][1:])]
    data = {"TTFT": [r["ttft_ms"] for r in ok], "TPOT": [r["tpot_ms"] for r in ok], "ITL": itl,
            "E2E": [r["e2e_ms"] for r in ok]}
    data = {k: sorted(v for v in values if v is not None) for k, values in data.items()}
    if not any(data.values()):
        return None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (name, values) in zip(axes, data.items()):
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    return _png(fig)


def over_time(requests: list[dict[str, Any]]) -> str | None:
    ok = [r for r in requests if r["success"] and r["chunk_offsets_ms"]]
    if not ok:
        return None
    buckets: Counter[int] = Counter()
    for r in ok:
        per_chunk = r["output_tokens"] / len(r["chunk_offsets_ms"])
        for offset in r["chunk_offsets_ms"]:
            buckets[int(r["start_s"] + offset / 1e3)] += per_chunk
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 3.2))
    seconds = range(max(buckets) + 1)
    left.plot(list(seconds), [buckets.get(s, 0) for s in seconds], drawstyle="steps-post")
    left.set_title("output tokens/s over time")
    left.set_xlabel("s since start")
    right.scatter([r["start_s"] for r in ok], [r["ttft_ms"] for r in ok], s=6)
    failed = [r for r in requests if not r["success"]]
    if failed:
        right.scatter([r["start_s"] for r in failed], [0] * len(failed), s=12, marker="x", c="red", label="failed")
        right.legend()
    right.set_title("TTFT by send time")
    right.set_xlabel("s since start")
    right.set_ylabel("ms")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def telemetry_plot(series: list[dict[str, Any]]) -> str | None:
    panels = [(k, label) for k, label in (("gpu_util_pct", "GPU utilisation %"), ("gpu_mem_used_bytes", "GPU memory GiB"),
                                          ("power_w", "power W"), ("kv_blocks_used", "KV blocks used"),
                                          ("rss_bytes", "RSS GiB"))
              if any(row.get(k) is not None for row in series)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        rows = [r for r in series if r.get(key) is not None]
        scale = 2**30 if "GiB" in label else 1
        ax.plot([r["t_s"] for r in rows], [r[key] / scale for r in rows])
        ax.set_title(label)
        ax.set_xlabel("s since start")
        ax.grid(alpha=0.3)
    return _png(fig)


def sweep_plot(points: list[dict[str, Any]]) -> str | None:
    rows = [p for p in points if p["summary"].get("p99_tpot_ms") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["summary"]["output_throughput"] for p in rows], [p["summary"]["p99_tpot_ms"] for p in rows], "o-")
    for p in rows:
        ax.annotate(f"{p['load']:g}", (p["summary"]["output_throughput"], p["summary"]["p99_tpot_ms"]))
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("P99 TPOT ms")
    ax.set_title("throughput vs latency (labels: load)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _table(rows: list[tuple[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:,.3f}" if isinstance(v, float) else html.escape(str(v))
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows) + "</table>"


def render(report: dict[str, Any]) -> str:
    summary, slo = report["summary"], report["slo"]
    tel = report.get("telemetry", {})
    config = report["config"]
    parts = [(f"<h1>r1deploy bench</h1><p>{html.escape(str(config.get('target')))}: "
             f"{html.escape(str(config.get('schedule')))}</p>"), "<h2>SLO verdict</h2><ul>"]
    for c in slo["checks"]:
        value = "-" if c["value"] is None else f"{c['value']:.4g}"
        note = f" ({html.escape(c['note'])})" if c["note"] else ""
        parts.append(f"<li class='{c['status'].split()[0].lower()}'><b>{c['status']}</b> "
                     f"{html.escape(c['target'])}: measured {value}{note}</li>")
    parts.append(f"</ul><p><b>{'PASS' if slo['passed'] else 'FAIL'}</b></p><h2>Summary</h2>")
    parts.append(_table([(k, v) for k, v in summary.items() if v is not None and k != "errors"]
                        + [(f"errors: {k}", v) for k, v in (summary.get("errors") or {}).items()]))
    if tel.get("gpu_reason"):
        parts.append(f"<p><i>{html.escape(tel['gpu_reason'])}</i></p>")
    eff = report.get("efficiency") or {}
    parts.append("<p>GPU utilisation counts time any kernel ran, not how busy the GPU was; MBU and MFU "
                 f"say how much bandwidth and compute the model used: MBU {eff.get('mbu_pct')}, "
                 f"MFU {eff.get('mfu_pct')} {html.escape(eff.get('reason') or '')}</p>")
    planned = [(f"{k}: planned / measured", f"{v['planned']:.4g} / {v['measured']:.4g}")
               for k, v in (eff.get("planned") or {}).items() if v.get("planned") is not None and v.get("measured")]
    if planned:
        parts.append(f"<h2>Planned ({html.escape(str(eff.get('planned_for')))}) vs measured</h2>" + _table(planned))
    offload = report.get("expert_offload")
    if offload:
        parts.append(f"<h2>Expert offload (since the {html.escape(str(offload.get('counted_from')))})</h2>"
                     + _table([(k, v) for k, v in offload.items() if k != "counted_from" and v is not None]))
    plots = [("Latency CDFs", latency_cdfs(report["requests"])),
             ("Throughput and TTFT over time", over_time(report["requests"])),
             ("GPU and memory telemetry", telemetry_plot(tel.get("series") or [])),
             ("Sweep", sweep_plot((report.get("sweep") or {}).get("points") or []))]
    for title, png in plots:
        if png:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{png}'>")
    parts.append("<h2>Definitions</h2>" + _table(list(DEFINITIONS.items())))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto}td,th{padding:2px 8px;text-align:left}"
             ".pass{color:green}.fail{color:#b00}.not{color:#a60}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>r1deploy bench</title>" \
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"


def write_html(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report), encoding="utf-8")
