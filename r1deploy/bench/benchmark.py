"""One benchmark run from parsed flags: target -> workload -> schedule -> records -> summary,
telemetry, efficiency -> SLO verdict -> console, JSON, CSV, HTML. Returns the exit code.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from r1deploy.bench import efficiency, planlink, report, spec_report, workload
from r1deploy.bench.arrivals import Concurrency, Rate, Rounds, Schedule
from r1deploy.bench.client import Backend, EngineBackend, HttpBackend
from r1deploy.bench.metrics import Summary, summarize
from r1deploy.bench.record import RequestRecord
from r1deploy.bench.runner import run as run_schedule
from r1deploy.bench.slo import Check, all_pass, goodput_limits, verdict
from r1deploy.bench.target import load_engine
from r1deploy.bench.telemetry import Telemetry, scrape_metrics, torch_memory_stats
from r1deploy.bench.workload import HFTokenizer, PromptMaker, RequestSpec
from r1deploy.errors import UsageError
from r1deploy.plan.engines import ENGINE_NAMES

DEFAULT_OUTPUT_LEN = 128
DEFAULT_BATCH, DEFAULT_REPEAT = 8, 4
MAX_SERIES_ROWS = 2000


@dataclass(frozen=True)
class Setup:
    backend: Backend
    maker: PromptMaker
    telemetry: Telemetry
    plan: dict[str, Any] | None
    description: str
    expert_store: Any = None  # --offload experts: the engine's TieredExpertStore (stats(), reset_stats())
    spec_counters: spec_report.SpecCounters | None = None  # speculative decoding's counters (engine or /metrics)


@dataclass(frozen=True)
class Measured:
    """One measured phase: its records, start, duration and derived numbers."""

    records: tuple[RequestRecord, ...]
    t0: float
    summary: Summary
    telemetry: dict[str, Any]
    checks: tuple[Check, ...]
    expert_offload: dict[str, Any] | None = None  # --offload experts: the store's counters over this phase
    speculative: dict[str, Any] | None = None  # speculative decoding over this phase (acceptance, draft/verify time)


def _validate(args: argparse.Namespace) -> None:
    if args.url and args.engine in ENGINE_NAMES:  # --url with the served engine's name: plan with its profile
        if args.plan_engine and args.plan_engine != args.engine:
            raise UsageError(f"--engine {args.engine} and --plan-engine {args.plan_engine} name different engines")
        args.plan_engine, args.engine = args.engine, None
    if args.url and args.engine is not None:
        raise UsageError("give --url (a server) or --engine (in-process), not both")
    if args.url and (args.tp != 1 or args.dp_attention):
        raise UsageError("--tp and --dp-attention split the in-process engine; for a server, start it with "
                         "`r1deploy serve --tp N [--dp-attention]` and benchmark it with --url")
    if args.tp < 1:
        raise UsageError(f"--tp must be >= 1, got {args.tp}")
    if args.engine and args.model and args.engine != args.model:
        raise UsageError("--engine MODEL and --model name different models; give one")
    modes = [name for name, value in (("--batch/--repeat", args.batch or args.repeat),
                                      ("--concurrency", args.concurrency), ("--rate", args.rate),
                                      ("--sweep-rates", args.sweep_rates),
                                      ("--sweep-concurrency", args.sweep_concurrency)) if value]
    if len(modes) > 1:
        raise UsageError(f"choose one arrival mode, not {' and '.join(modes)}")
    if args.duration and (args.rate or args.sweep_rates or args.sweep_concurrency):
        raise UsageError("--duration (soak) runs a closed loop: use it with --batch or --concurrency")
    for name in ("input_len", "num_requests", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}")
    if args.output_len is not None and args.output_len < 1:
        raise UsageError("--output-len must be >= 1")
    if args.telemetry_interval <= 0:
        raise UsageError("--telemetry-interval must be > 0")
    offload = getattr(args, "offload", None)
    budgets = [f for f in ("gpu_weight_budget", "host_weight_budget") if getattr(args, f, None) is not None]
    if budgets and not offload:
        raise UsageError(f"--{budgets[0].replace('_', '-')} needs --offload experts")
    if offload and args.url:
        raise UsageError("--offload runs the in-process engine; for a server, start it with "
                         "`r1deploy serve --offload experts` (its /metrics has the expert-cache counters)")
    if args.url and getattr(args, "speculative_config", None):
        raise UsageError("--speculative-config sets up the in-process engine; for a server, start it with "
                         "`r1deploy serve --speculative-config JSON` (the report reads its /metrics)")
    if offload and getattr(args, "gpu_weight_budget", None) is None:
        raise UsageError("--offload experts needs --gpu-weight-budget GB")


def schedule_from(args: argparse.Namespace) -> Schedule:
    try:
        if args.concurrency:
            return Concurrency(args.concurrency, args.num_requests)
        if args.rate:
            return Rate(args.rate, args.num_requests, args.burstiness, args.max_concurrency)
        return Rounds(args.batch or DEFAULT_BATCH, args.repeat or DEFAULT_REPEAT)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _workload_kind(args: argparse.Namespace) -> str:
    kind = args.workload or ("sharegpt" if args.dataset else "fixed")
    if kind == "sharegpt" and not args.dataset:
        raise UsageError("--workload sharegpt needs --dataset FILE.json")
    if kind == "uniform" and not (args.input_len_range and args.output_len_range):
        raise UsageError("--workload uniform needs --input-len-range MIN:MAX and --output-len-range MIN:MAX")
    return kind


def _range(text: str, flag: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected MIN:MAX in tokens") from None
    if not sep or lo < 1 or hi < lo:
        raise UsageError(f"{flag} {text!r}: expected 1 <= MIN <= MAX")
    return lo, hi


def make_specs(args: argparse.Namespace, maker: PromptMaker, n: int, rng: random.Random) -> list[RequestSpec]:
    kind = _workload_kind(args)
    output_len = args.output_len or DEFAULT_OUTPUT_LEN
    if kind == "fixed":
        return workload.fixed(maker, n, args.input_len, output_len, rng)
    if kind == "uniform":
        return workload.uniform(maker, n, _range(args.input_len_range, "--input-len-range"),
                                _range(args.output_len_range, "--output-len-range"), rng)
    if kind == "prefix":
        return workload.prefix_groups(maker, n, args.prefix_groups, args.prefix_len, args.input_len,
                                      output_len, rng)
    if kind == "reasoning":
        return workload.reasoning(maker, n, args.output_len or 1024, rng)
    return workload.sharegpt(maker, Path(args.dataset), n, args.output_len, rng)


def _api(args: argparse.Namespace) -> str:
    return args.api or ("chat" if args.workload == "reasoning" else "completions")


def _tokenizer(path: str | None) -> workload.Tokenizer | None:
    if path is None or not Path(path).expanduser().is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(Path(path).expanduser()), trust_remote_code=False)
        return HFTokenizer(tokenizer)
    except (OSError, ValueError):
        return None  # a directory without tokenizer files: counts come from the server's usage


async def _http_target(args: argparse.Namespace) -> Setup:
    if args.tokenizer and _tokenizer(args.tokenizer) is None:
        raise UsageError(f"--tokenizer {args.tokenizer}: no tokenizer could be loaded from it")
    tokenizer = _tokenizer(args.tokenizer or args.model)
    backend = HttpBackend(args.url, _api(args), args.served_model_name or args.model, args.api_key,
                          tokenizer, args.ignore_eos, args.timeout)
    try:
        backend.model = await backend.preflight()
    except UsageError:
        await backend.close()
        raise
    telemetry = Telemetry(args.telemetry_interval, memory=scrape_metrics(backend.base, args.api_key),
                          memory_reason="the server's /metrics has no allocator reserved/allocated bytes",
                          remote_process=True)
    plan = planlink.plan(args.model, **_plan_workload(args), **_plan_engine(args)) if args.model else None
    return Setup(backend, PromptMaker(tokenizer=tokenizer), telemetry, plan,
                  f"{args.url} ({_api(args)}, model {backend.model})",
                  spec_counters=spec_report.server_counters(backend.base, args.api_key))


def _plan_workload(args: argparse.Namespace) -> dict[str, Any]:
    """The run's shape in the planner's terms, so planned-vs-measured compares like with like."""
    concurrency = args.batch or args.concurrency or args.max_concurrency or DEFAULT_BATCH
    return {"input_len": args.input_len, "output_len": args.output_len or DEFAULT_OUTPUT_LEN,
            "concurrency": concurrency}


def _plan_engine(args: argparse.Namespace) -> dict[str, Any]:
    """--plan-engine: the engine profile (plan/engines/*.json) the planned-vs-measured section predicts."""
    return {"engine": args.plan_engine} if getattr(args, "plan_engine", None) else {}


def engine_target(args: argparse.Namespace, context_len: int, max_seqs: int) -> Setup:
    """The in-process engine (on --tp ranks) behind a backend, with its prompt maker, telemetry and plan."""
    model = args.engine or args.model or None
    engine = load_engine(model, args.device, args.dtype, args.load_format, max_seqs, context_len,
                         _plan_workload(args), offload=_offload_config(args), tp=args.tp,
                         dp_attention=args.dp_attention, speculative=_speculative_config(args))
    tok = engine.tokenizer
    text_workload = _workload_kind(args) in ("sharegpt", "reasoning")
    # Token-id prompts for synthetic workloads: exact lengths with or without a tokenizer.
    maker = (PromptMaker(tokenizer=HFTokenizer(tok)) if text_workload and tok is not None
             else PromptMaker(vocab_size=engine.model_config.vocab_size))
    backend = EngineBackend(engine, chat=_api(args) == "chat", reasoning=args.workload == "reasoning",
                            ignore_eos=args.ignore_eos)
    telemetry = Telemetry(args.telemetry_interval, memory=torch_memory_stats,
                          kv_blocks=lambda: float(engine.block_manager.num_used_blocks),
                          memory_reason="no CUDA allocator in this process (CPU run)")
    # The plan at the run's layout, so planned-vs-measured (MBU, MFU) compares like with like.
    layout = {"num_gpus": args.tp, "tp": args.tp, "dp_attention": args.dp_attention} if args.tp > 1 else {}
    plan = planlink.plan(model, **_plan_workload(args), **layout, **_plan_engine(args)) if model else None
    store = engine.loaded.model.offload_store
    description = f"in-process engine ({model or 'embedded model'}"
    if args.tp > 1:
        description += f", TP {args.tp}" + (" with DP attention" if args.dp_attention else "")
    if store is not None:
        description += f", experts offloaded: {store.num_gpu_slots} GPU slots"
    return Setup(backend, maker, telemetry, plan, description + ")", expert_store=store,
                 spec_counters=spec_report.engine_counters(engine))


def _speculative_config(args: argparse.Namespace) -> Any:
    if not getattr(args, "speculative_config", None):
        return None
    from r1deploy.engine_config import SpeculativeConfig

    try:
        return SpeculativeConfig.of(args.speculative_config)
    except ValueError as exc:
        raise UsageError(f"--speculative-config: {exc}") from None


def _offload_config(args: argparse.Namespace) -> Any:
    if not getattr(args, "offload", None):
        return None
    from r1deploy.engine_config import OffloadConfig

    try:
        return OffloadConfig(args.gpu_weight_budget, args.host_weight_budget, target=args.offload)
    except ValueError as exc:
        raise UsageError(f"--offload: {exc}") from None


def expert_offload_section(store: Any, summary: Summary, counted_from: str) -> dict[str, Any]:
    """The expert store's counters for the report (what /metrics exports as r1deploy_expert_cache_*),
    plus per-output-token rates."""
    st = store.stats()
    out_tokens = summary.flat().get("total_output_tokens") or 0
    section: dict[str, Any] = {
        "counted_from": counted_from, "hits": st.hits, "misses": st.misses, "hit_rate": st.hit_rate,
        "host_hits": st.host_hits, "disk_reads": st.disk_reads, "bytes_to_device": st.bytes_to_device,
        "bytes_from_disk": st.bytes_from_disk, "evictions": st.evictions, "prefetches": st.prefetches,
        "prefetch_hits": st.prefetch_hits, "prefetch_dropped": st.prefetch_dropped,
        "cpu_computes": st.cpu_computes, "stall_s": st.stall_s, "gpu_slots": st.gpu_slots,
        "host_slots": st.host_slots, "pinned_bytes": st.pinned_bytes,
    }
    section["bytes_to_device_per_output_token"] = st.bytes_to_device / out_tokens if out_tokens else None
    section["stall_ms_per_output_token"] = 1e3 * st.stall_s / out_tokens if out_tokens else None
    return section


def measured_values(summary: Summary, tel: dict[str, Any], records: list[RequestRecord]) -> dict[str, float | None]:
    def p99(name: str) -> float | None:
        return summary.latency(name, "p99")

    request_ooms = sum(1 for r in records if not r.success and "out of memory" in (r.error or "").lower())
    return {
        "p99_ttft_ms": p99("ttft"), "p99_tpot_ms": p99("tpot"), "p99_e2e_ms": p99("e2e"), "p99_itl_ms": p99("itl"),
        "gpu_util_mean_pct": tel.get("gpu_util_mean_pct"),
        "fragmentation_max_pct": tel.get("fragmentation_max_pct"),
        "oom_count": float(request_ooms + (tel.get("allocator_ooms") or 0)),
    }


def _missing(tel: dict[str, Any]) -> dict[str, str]:
    none = "no successful request"
    return {"gpu_util_mean_pct": tel.get("gpu_reason") or "", "fragmentation_max_pct": tel.get("memory_reason") or "",
            "p99_ttft_ms": none, "p99_tpot_ms": none + " with > 1 output token", "p99_e2e_ms": none,
            "p99_itl_ms": none + " with > 1 chunk"}


def _caveats(tel: dict[str, Any]) -> dict[str, str]:
    if tel.get("allocator_ooms") is None:
        return {"oom_count": "from request errors; no allocator counter here"}
    return {}


def _progress(total: int | None, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=not enabled)


async def measure(target: Setup, specs: list[RequestSpec], schedule: Schedule, args: argparse.Namespace,
                  targets: tuple, records: list[RequestRecord], stop_at: float | None = None,
                  on_done: Callable[[RequestRecord], None] | None = None) -> Measured:
    """Run one phase with telemetry on; `records` fills as requests finish (kept on interrupt)."""
    target.telemetry.samples.clear()
    if target.expert_store is not None:  # count the measured phase only (not load, warm-up or earlier points)
        target.expert_store.reset_stats()
    spec_before = target.spec_counters() if target.spec_counters is not None else None
    t0 = time.monotonic()
    target.telemetry.start(t0)
    try:
        t0 = await run_schedule(target.backend, specs, schedule, records, on_done, args.seed, stop_at)
    finally:
        target.telemetry.stop()
    duration = time.monotonic() - t0
    return finish(target, records, t0, duration, targets, counted_from="start of the measured phase",
                  spec_before=spec_before)


def finish(target: Setup, records: list[RequestRecord], t0: float, duration: float, targets: tuple,
           counted_from: str = "start of the engine", spec_before: Any = None) -> Measured:
    """spec_before: speculative decoding's counters at counted_from (None: since the engine started)."""
    tel = target.telemetry.summary()
    summary = summarize(records, duration, goodput_limits(targets))
    checks = verdict(targets, measured_values(summary, tel, records), _missing(tel), _caveats(tel))
    offload = (None if target.expert_store is None
               else expert_offload_section(target.expert_store, summary, counted_from))
    spec = None if target.spec_counters is None else spec_report.section(spec_before, target.spec_counters(),
                                                                          counted_from)
    return Measured(tuple(records), t0, summary, tel, tuple(checks), offload, spec)


def build_report(args: argparse.Namespace, target: Setup, m: Measured, schedule_text: str,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    config.update(target=target.description, schedule=schedule_text, api=_api(args),
                  workload=_workload_kind(args))
    tel = dict(m.telemetry, series=series(target.telemetry.samples, m.t0))
    eff = efficiency.compute(m.summary, target.plan, target.telemetry.nvml.names)
    sections: dict[str, Any] = {"efficiency": eff}
    if m.expert_offload is not None:
        sections["expert_offload"] = m.expert_offload
    if m.speculative is not None:
        sections["speculative"] = m.speculative
    return report.build(config, m.summary, m.records, m.t0, args.slo_profile, m.checks, tel,
                        {**sections, **(extra or {})})


def series(samples: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """Telemetry over time for the report's plots: offsets from the run start, GPU values averaged."""
    rows = []
    stride = max(1, len(samples) // MAX_SERIES_ROWS)  # a 72 h soak at 0.5 s would be 500k rows
    for s in samples[::stride]:
        gpus = s["gpus"]
        util = [g["util_pct"] for g in gpus if g.get("util_pct") is not None]
        mem = [g["mem_used_bytes"] for g in gpus if g.get("mem_used_bytes") is not None]
        power = [g["power_w"] for g in gpus if g.get("power_w") is not None]
        rows.append({"t_s": round(s["t"] - t0, 3), "gpu_util_pct": sum(util) / len(util) if util else None,
                     "gpu_mem_used_bytes": sum(mem) if mem else None, "power_w": sum(power) if power else None,
                     "reserved_bytes": s["reserved_bytes"], "allocated_bytes": s["allocated_bytes"],
                     "kv_blocks_used": s["kv_blocks_used"], "rss_bytes": s["rss_bytes"]})
    return rows


def emit(args: argparse.Namespace, rep: dict[str, Any], checks: tuple[Check, ...]) -> int:
    """Print the summary, write the files, and turn the verdict into the exit code."""
    report.print_summary(rep, checks, Console(highlight=False))
    if args.out:
        out = Path(args.out)
        report.write_json(rep, out / "report.json")
        report.write_csv(rep, out / "requests.csv")
        from r1deploy.bench.html_report import write_html

        write_html(rep, out / "report.html")
        print(f"wrote {out / 'report.json'}, {out / 'requests.csv'}, {out / 'report.html'}")
    passed = all_pass(checks)
    print("verdict: PASS" if passed else "verdict: FAIL" + (" (--no-fail: exit 0)" if args.no_fail else ""))
    return 0 if passed or args.no_fail else 1
