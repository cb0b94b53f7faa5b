"""`r1deploy bench`: load-test an OpenAI-compatible server or the in-process engine, with vLLM's
metric definitions, GPU telemetry, an SLO verdict and JSON / CSV / HTML reports.

One job per module: workload (what is sent), arrivals (when), client (HTTP and engine backends,
per-chunk timestamps), record (one request's timestamps), runner (drives a schedule), metrics
(TTFT / TPOT / ITL / E2E, throughput, goodput), slo (targets and verdict), telemetry (NVML,
allocator, RSS), efficiency (MBU / MFU, planned vs measured), target (what can run here), report /
html_report (outputs), sweep, soak, compare, benchmark (one run from flags), cli (flags).
"""
