"""`r1deploy up [MODEL]`: the whole loop on this host. Inspect it (doctor), plan for what is there (or refuse),
start `serve` with the plan's flags, wait until ready, run the plan's workload through `bench`, print planned vs
measured with the SLO verdict; the server keeps running, or stops with --once. Without a GPU: the CPU."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from r1deploy.errors import UsageError

DEFAULT_PORT = 8000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="doctor, plan, serve and benchmark on this host in one command",
                       description="Inspect this host, plan MODEL for it (the embedded SmolLM2 when none; the CPU "
                                   "when there is no GPU), start `r1deploy serve` with the plan's flags, wait until "
                                   "ready, benchmark the plan's workload and print planned vs measured with the SLO "
                                   "verdict. Exit code: 0 when the benchmark ran and met the SLOs given.")
    p.add_argument("model", nargs="?", default=None, help="local checkpoint directory (default: the embedded model)")
    p.add_argument("--once", action="store_true", help="stop the server after the report (default: keep serving)")
    p.add_argument("--host", default="127.0.0.1", help="address serve binds (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    w = p.add_argument_group("workload (planned and benchmarked)")
    w.add_argument("--input-len", type=int, default=256, help="prompt tokens per request (default 256)")
    w.add_argument("--output-len", type=int, default=64, help="output tokens per request (default 64)")
    w.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    w.add_argument("--num-requests", type=int, default=16, help="requests measured (default 16)")
    w.add_argument("--slo-ttft-ms", type=float, help="P99 time to first token the plan and verdict use")
    w.add_argument("--slo-tpot-ms", type=float, help="P99 time per output token the plan and verdict use")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for the model to load")
    p.add_argument("--out", help="directory for plan.json, serve.log and the bench report (default: a new temp dir)")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len", "concurrency", "num_requests"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")


def run(args: argparse.Namespace) -> int:
    from r1deploy.deploy.hostplan import plan_here
    from r1deploy.doctor.checks import run_checks
    from r1deploy.doctor.host import collect_host
    from r1deploy.doctor.report import summarize
    from r1deploy.doctor.requirements import requirements_from_plan

    _check(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="r1deploy-up-"))
    out.mkdir(parents=True, exist_ok=True)
    host = collect_host(Path.cwd(), read_test_mib=0)
    gpus = host.gpu.gpus
    print(f"up: host {host.hostname}: {host.cpu.logical_cores} CPUs, {host.memory.total_bytes / 2**30:.0f} GiB RAM, "
          + (f"{len(gpus)}x {gpus[0].name}" if gpus else "no GPU"), flush=True)
    slo = {k: getattr(args, k) for k in ("slo_ttft_ms", "slo_tpot_ms") if getattr(args, k) is not None}
    local = plan_here(args.model, host, input_len=args.input_len, output_len=args.output_len,
                      concurrency=args.concurrency, **slo)
    (out / "plan.json").write_text(json.dumps(local.plan, indent=2, default=str))
    counts = summarize(run_checks(host, requirements_from_plan(local.plan, "the plan") if gpus else None))
    print(f"up: doctor: {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail "
          "(details: r1deploy doctor)", flush=True)
    print(f"up: plan: {local.plan['deployment']['layout']} on {local.device_note}; wrote {out / 'plan.json'}",
          flush=True)
    command = serve_command(local, args.host, args.port)
    print(f"up: starting {' '.join(command[2:])} (log: {out / 'serve.log'})", flush=True)
    with open(out / "serve.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
        if not wait_ready(server, base, args.ready_timeout, out / "serve.log"):
            return 1
        report = run_bench(args, base, local, out)
        passed = print_comparison(local, report)
        if not args.once:
            print(f"up: serving on {base}/v1 (pid {server.pid}); Ctrl-C stops it", flush=True)
            server.wait()
        return 0 if passed else 1
    finally:
        stop(server)


def serve_command(local: Any, host: str, port: int) -> list[str]:
    """`python -m r1deploy serve` with the plan's flags (the same line `plan --emit` writes)."""
    from r1deploy.deploy.spec import target_from_plan

    args = target_from_plan(local.plan, model_path=local.model_dir, port=port).serve_args(host)
    if local.device == "cpu":
        args += ["--device", "cpu"]
    return [sys.executable, "-m", "r1deploy", *args[1:]]


def wait_ready(server: subprocess.Popen[str], base: str, timeout_s: float, log: Path) -> bool:
    """Poll /health/ready with a progress line; False (and the log's tail) if serve exits or times out."""
    import httpx
    from rich.console import Console

    console = Console(stderr=True)
    start = time.monotonic()
    with console.status("up: loading the model") as status, httpx.Client(base_url=base, timeout=5) as client:
        while True:
            elapsed = time.monotonic() - start
            if server.poll() is not None or elapsed > timeout_s:
                why = f"serve exited with status {server.returncode}" if server.returncode is not None else \
                    f"serve was not ready after {timeout_s:g} s"
                tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
                print(f"up: error: {why}; the end of {log}:\n{tail}", file=sys.stderr, flush=True)
                return False
            try:
                if client.get("/health/ready").status_code == 200:
                    print(f"up: ready after {elapsed:.0f} s", flush=True)
                    return True
            except httpx.TransportError:
                pass
            status.update(f"up: loading the model ({elapsed:.0f} s, /health/ready not yet 200)")
            time.sleep(0.5)


def run_bench(args: argparse.Namespace, base: str, local: Any, out: Path) -> dict[str, Any]:
    """The plan's workload through `r1deploy bench --url` (fixed lengths, closed loop); its report.json."""
    from r1deploy.bench import cli as bench_cli
    from r1deploy.bench.main import run as bench_run

    slo = ",".join(f"{k}:{getattr(args, f'slo_{k}_ms'):g}" for k in ("ttft", "tpot")
                   if getattr(args, f"slo_{k}_ms") is not None)
    argv = ["bench", "--url", base, "--tokenizer", local.model_dir, "--api", "completions",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--concurrency", str(args.concurrency), "--num-requests", str(args.num_requests),
            "--slo-profile", "none", "--no-fail", "--no-progress", "--out", str(out / "bench")]
    parser = argparse.ArgumentParser(prog="r1deploy")
    bench_cli.register(parser.add_subparsers(dest="command", required=True))
    bench_args = parser.parse_args(argv + (["--slo", slo] if slo else []))
    bench_run(bench_args)
    return json.loads((out / "bench" / "report.json").read_text())


def comparison_rows(plan: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    perf = plan["performance"]
    return [("TTFT p50 (ms)", perf["ttft_s"] * 1e3, summary.get("median_ttft_ms")),
            ("TPOT p50 (ms)", perf["tpot_s"] * 1e3, summary.get("median_tpot_ms")),
            ("output tokens/s", perf["output_tokens_per_s"], summary.get("output_throughput"))]


def print_comparison(local: Any, report: dict[str, Any]) -> bool:
    """Planned vs measured and the SLO verdict; True when every request succeeded and every SLO given held."""
    from rich.console import Console
    from rich.table import Table

    summary, wl = report["summary"], local.plan["workload"]
    table = Table("", "planned", "measured", "measured / planned", title_justify="left",
                  title=f"planned vs measured: {wl['input_len']} in / {wl['output_len']} out, "
                        f"{wl['concurrency']} concurrent, {summary['completed']} requests")
    for name, planned, measured in comparison_rows(local.plan, summary):
        ratio = f"{measured / planned:.2f}x" if planned and measured is not None else "-"
        table.add_row(name, f"{planned:,.1f}", "-" if measured is None else f"{measured:,.1f}", ratio)
    console = Console(highlight=False, soft_wrap=False, width=max(Console().width, 100))
    console.print(table)
    checks = report["slo"]["checks"]
    ok = summary["failed"] == 0 and report["slo"]["passed"]
    for check in checks:
        shown = "-" if check["value"] is None else f"{check['value']:.4g}"
        console.print(f"SLO {check['status']}: {check['target']} (measured {shown})")
    verdict = "PASS" if ok else "FAIL"
    reason = "" if checks else " (no SLO given: --slo-ttft-ms / --slo-tpot-ms)"
    failed = f", {summary['failed']} requests failed" if summary["failed"] else ""
    console.print(f"up: verdict {verdict}{reason}{failed}")
    return ok


def stop(server: subprocess.Popen[str]) -> None:
    """SIGTERM (serve drains, then exits), then SIGKILL if it lingers."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    print(f"up: server stopped (exit status {server.returncode})", flush=True)
